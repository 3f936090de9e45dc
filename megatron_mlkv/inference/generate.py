"""Fast generation: a preallocated cache of the m owner layers' K/V and a one-token decode step that
a CUDA graph replays.

    from megatron_mlkv.inference.generate import generate
    out = generate(model, input_ids, max_new_tokens=48)              # greedy, (b, s + 48)
    out = generate(model, ids, 48, attention_mask=mask, do_sample=True, top_k=50)

    decoder = StaticDecoder(model, batch_size, max_len)              # the parts, for a serving loop
    logits = decoder.prefill(input_ids, attention_mask)
    tokens = decoder.greedy(logits.argmax(-1), 47)                   # (b, 48), the choice in the graph
    logits = decoder.step(tokens[:, -1])                             # or any tokens (b,): -> next logits

Why it is fast, and where the saved KV memory goes:
- `StaticKVCache` holds `keys`/`values` of shape (m, b, g, max_len, d_k), allocated once in the
  model's dtype and written in place; no step re-materialises the cache (no `torch.cat`).
- the decode step reads its inputs from fixed tensors (token, position, padding, mask) and advances
  the position itself, so on CUDA it is captured once in a `torch.cuda.CUDAGraph` and replayed: the
  kernels of a step cost one launch per token.
- decode attention puts the h/g query heads that share a KV head in the rows of one attention
  problem (q (b, g, h/g, d_k) over K/V (b, g, L, d_k)), so each shared K/V head is read once and
  never expanded to h heads.
- on CUDA (attention="triton") the step is few kernels (`megatron_mlkv.inference.kernels`): rotary, cache
  write, split-sequence attention and the MLP's GELU in one launch; residual sums with their layer
  norms in another; a parallel-residual layer's four matrix products as two, the norms folded in
  (`FoldedLayer`), triton kernels themselves at up to 64 rows. 50 kernels a step for Pythia-160M,
  against ~200 with attention="sdpa".
- greedy decoding (`StaticDecoder.greedy`, `generate` without sampling or eos) chooses the next
  token inside the captured step and feeds it to the next one: replays follow each other with
  nothing in between.
- prefill runs the model's own forward on chunks of batch rows (about `prefill_chunk_tokens` tokens
  each), so its activations stay small next to the cache, and projects only the last position onto
  the vocabulary.

Limits: the model must be an `MLKVTransformer` (any layout). Left padding (attention_mask with 0s at
the start of rows) is supported; right padding is not. With "sdpa" and "matmul", decode attends
over the whole preallocated buffer with masked-out positions (about s + max_new_tokens per step, the
minimum when the buffer is full); the triton kernel reads only the filled positions. `eos_token_id`
pads finished rows with it but does not stop early (that needs a host sync per step). The logits
`StaticDecoder.step` returns are overwritten by the next step on CUDA.

Why one file of ~570 lines: the cache, the decode step (plain and with the folded layers the
kernels need) and `generate` change together whenever the step does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MLKVConfig
from ..model import MLKVTransformer, rotary_cos_sin
from . import kernels


class StaticKVCache:
    """K/V of the m owner layers, preallocated: `keys` (k, b, g, max_len, d_k) and `values` (m, ...),
    where k = `MLKVConfig.cached_key_slots` (m, plus the unrotated keys of `unrotated_shared_keys`).

    It is also a `cache` for `MLKVTransformer.forward` (the interface of transformers' DynamicCache):
    `update(k, v, slot)` writes after the slot's current length and returns the slot's K/V so far;
    a zero-width `v` writes keys only (the unrotated key slots).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: list[int] | None = None):
        self.keys, self.values = keys, values
        self.lengths = list(lengths) if lengths is not None else [0] * keys.shape[0]

    @classmethod
    def allocate(
        cls,
        config: MLKVConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> StaticKVCache:
        """An empty cache for `batch_size` rows of up to `max_len` tokens."""
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        # zeros, not empty: decode attends over the whole buffer with masked positions, and a masked
        # position's weight 0 times an uninitialised NaN would still be NaN
        keys = torch.zeros(config.cached_key_slots, *shape, dtype=dtype, device=device)
        return cls(keys, torch.zeros(config.layout.kv_layers, *shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes of the cache tensors: 2·b·max_len·m·g·d_k·dtype size (`MLKVConfig.cache_elements`)."""
        return self.keys.nbytes + self.values.nbytes

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, k: torch.Tensor, v: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (b, g, s, d_k) after slot's current length; returns its K/V (b, g, length, d_k)."""
        start, end = self.lengths[slot], self.lengths[slot] + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} tokens; writing {k.shape[2]} after {start} "
                f"overflows it: allocate a larger max_len"
            )
        self.keys[slot, :, :, start:end] = k
        self.lengths[slot] = end
        if v.shape[-1] == 0:
            return self.keys[slot, :, :, :end], v
        self.values[slot, :, :, start:end] = v
        return self.keys[slot, :, :, :end], self.values[slot, :, :, :end]


def sdpa_attention(q, k, v, bias):
    """q (b, g, r, d_k), the r = h/g query heads of each KV head as rows, over k, v (b, g, L, d_k)
    with an additive bias (b, 1, 1, L) -> (b, g, r, d_k)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def matmul_attention(q, k, v, bias):
    """The same as `sdpa_attention` with two batched matrix products (softmax in float32)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    return torch.matmul(scores.float().softmax(-1).to(v.dtype), v)


DECODE_ATTENTION = {"sdpa": sdpa_attention, "matmul": matmul_attention, "triton": None}


def default_attention(config: MLKVConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """'triton' (the fused kernels of `megatron_mlkv.inference.kernels`) where they run, else 'sdpa'. On CPU
    (triton's interpreter) only in float32: the interpreter's half-precision matrix products are wrong."""
    power_of_two = config.head_dim & (config.head_dim - 1) == 0
    runs = kernels.available(device) and (device.type == "cuda" or dtype == torch.float32)
    return "triton" if runs and power_of_two and config.head_dim >= 16 else "sdpa"


class StaticDecoder:
    """The decoding state of one batch: a `StaticKVCache`, the step's fixed input tensors and, on
    CUDA, the captured step.

    `prefill(input_ids, attention_mask)` fills the cache and returns the last position's logits
    (b, vocab); `step(tokens)` appends one token per row and returns the next logits (b, vocab).

    `attention`: "triton" (default on CUDA when triton is installed: `default_attention`) runs each
    layer's rotary, cache write and attention as one kernel that splits long caches over the GPU,
    and each residual sum with the layer norms that read it as another (`megatron_mlkv.inference.kernels`);
    "sdpa" and "matmul" are plain PyTorch (the CPU path).
    """

    def __init__(
        self,
        model: MLKVTransformer,
        batch_size: int,
        max_len: int,
        cuda_graph: bool | None = None,
        attention: str | None = None,
    ):
        param = next(model.parameters())
        attention = attention or default_attention(model.config, param.device, param.dtype)
        if attention not in DECODE_ATTENTION:
            raise ValueError(f"attention={attention!r}: expected one of {sorted(DECODE_ATTENTION)}")
        self.model, self.config = model, model.config
        self.cache = StaticKVCache.allocate(model.config, batch_size, max_len, param.dtype, param.device)
        device = param.device
        self.token = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # cache index of the next token
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # left padding per row
        # additive mask over the cache (0 visible, -inf not), rows 16-element aligned as the fused
        # attention kernels want them
        width = -(-max_len // 16) * 16
        self.bias = torch.full((batch_size, 1, 1, width), float("-inf"), dtype=param.dtype, device=device)[
            ..., :max_len
        ]
        self.attention_name, self.attention = attention, DECODE_ATTENTION[attention]
        self.fused = attention == "triton"
        self.splits = None  # decode_attention's sequence splits (None: chosen for the GPU)
        self.counters = torch.zeros(batch_size * model.config.num_kv_heads, dtype=torch.int32, device=device)
        # cos and sin of every cache position, sin's first half negated: rotate_half(x) * sin equals
        # cat(x2, x1) * that (one gather a step instead of recomputing the frequencies)
        cfg, half = model.config, model.config.rotary_dim // 2
        cos, sin = rotary_cos_sin(
            torch.arange(max_len, device=device)[None],
            cfg.rotary_dim,
            cfg.rotary_emb_base,
            param.dtype,
            cfg.rope_scaling,
        )
        sin[..., :half] = -sin[..., :half]
        self.rotary = torch.stack([cos[0, 0], sin[0, 0]])  # (2, max_len, rotary_dim)
        # the fused path's parallel-residual layers take two matrix products (`FoldedLayer`); the
        # other layers one for q (k, v) whose weights are the owners' three concatenated. Both are
        # copies of the layer weights, small next to the cache
        self.folded = [FoldedLayer.of(block) if self.fused else None for block in model.layers]
        self.projections = [
            None if f else fused_projection(block.attention) for block, f in zip(model.layers, self.folded)
        ]
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        self.graphs, self.outputs = {}, {}  # captured steps and their logits, by `greedy`
        # tokens by cache index, written by greedy steps; allocated with the cache, as a block taken
        # later from the cached allocator's free memory (the prefill's logits) would keep that
        # segment from the CUDA graph's pool: at the largest batches the graph would not fit
        self.history = self.token.new_zeros(batch_size, max_len + 1)
        self.length = 0  # tokens in the cache, tracked on the host so the loop never synchronises

    @property
    def batch_size(self) -> int:
        return self.token.shape[0]

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, chunk_tokens: int = 32768
    ) -> torch.Tensor:
        """Run the prompt (b, s), left-padded where attention_mask (b, s) is 0; -> logits (b, vocab)."""
        b, s = input_ids.shape
        if b != self.batch_size or s >= self.cache.max_len:
            raise ValueError(
                f"prompt of shape {tuple(input_ids.shape)} does not fit this decoder: batch "
                f"{self.batch_size}, at most {self.cache.max_len - 1} prompt tokens"
            )
        rows = max(1, chunk_tokens // s)
        logits = self.bias.new_empty(b, self.model.embed_out.out_features)
        for start in range(0, b, rows):
            mask = None if attention_mask is None else attention_mask[start : start + rows]
            positions = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
            cache = StaticKVCache(self.cache.keys[:, start : start + rows], self.cache.values[:, start : start + rows])
            hidden = self.model.hidden_states(input_ids[start : start + rows], positions, mask, cache=cache)
            logits[start : start + rows] = self.model.embed_out(hidden[:, -1])
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.bias.fill_(float("-inf"))
        self.bias[:, 0, 0, :s].masked_fill_(real, 0.0)
        self.pad.copy_(s - real.sum(-1))
        self.position.fill_(s)
        self.cache.lengths = [s] * len(self.cache.lengths)
        self.length = s
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (b,) at the current position; -> logits (b, vocab) of the next token."""
        self.token.copy_(tokens)
        return self._advance(greedy=False)

    @torch.no_grad()
    def greedy(self, token: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding with the choice inside the step (and its CUDA graph): append token (b,),
        then `steps` times append the most likely next token. -> (b, steps + 1): token and the
        tokens chosen, the last of which is not yet in the cache."""
        if steps > self.cache.max_len - self.length:
            raise ValueError(
                f"{steps} steps after {self.length} tokens overflow the cache of {self.cache.max_len} tokens"
            )
        start = self.length
        self.history[:, start] = token
        self.token.copy_(token)
        for _ in range(steps):
            self._advance(greedy=True)
        return self.history[:, start : start + steps + 1].clone()

    def _advance(self, greedy: bool) -> torch.Tensor:
        if self.length >= self.cache.max_len:
            raise ValueError(f"the cache is full ({self.cache.max_len} tokens)")
        self.length += 1
        if not self.cuda_graph:
            return self._step(greedy)
        self.capture(greedy)
        self.graphs[greedy].replay()
        return self.outputs[greedy]

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The captured `step` (None before the first)."""
        return self.graphs.get(False)

    @torch.no_grad()
    def capture(self, greedy: bool = False) -> None:
        """Record the step (or the greedy step) in a CUDA graph (once). Warm-up runs first on a side
        stream, as CUDA graphs require; it writes only where the next real step writes, and the
        token, position and mask are restored."""
        if greedy in self.graphs or not self.cuda_graph:
            return
        saved = [(t, t.clone()) for t in (self.token, self.position, self.bias)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(greedy)
        torch.cuda.current_stream().wait_stream(stream)
        for t, value in saved:
            t.copy_(value)
        del saved
        torch.cuda.empty_cache()  # the warm-up's blocks cannot serve the graph's private pool
        self.graphs[greedy] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graphs[greedy]):
            self.outputs[greedy] = self._step(greedy)

    def _step(self, greedy: bool = False) -> torch.Tensor:
        """The token in `self.token` at cache index `self.position` -> logits (b, vocab); advances.
        greedy: also the most likely next token into `self.token` and `self.history`."""
        if self.fused:
            return self._fused_step(greedy)
        logits = self._plain_step()
        if greedy:
            self._choose(logits)
        return logits

    def _choose(self, logits: torch.Tensor) -> None:
        """After a step (the position advanced): its greedy token into `token` and `history`."""
        torch.argmax(logits, -1, out=self.token)
        self.history.index_copy_(1, self.position, self.token[:, None])

    def _plain_step(self) -> torch.Tensor:
        """`_step` in PyTorch operations (attention "sdpa" or "matmul")."""
        model = self.model
        x = model.embed_in(self.token)  # (b, d)
        cos, sin = self.rotary[:, self.position - self.pad, None]  # each (b, 1, rotary_dim)
        self.bias.index_fill_(-1, self.position, 0.0)  # the new token is visible from now on
        for block, (weight, bias) in zip(model.layers, self.projections):
            attn = self._attention(block.attention, weight, bias, block.input_layernorm(x), cos, sin)
            if block.use_parallel_residual:
                x = block.mlp(block.post_attention_layernorm(x)) + attn + x
            else:
                x = attn + x
                x = block.mlp(block.post_attention_layernorm(x)) + x
        self.position += 1
        return model.embed_out(model.final_layer_norm(x))

    def _attention(self, attn, weight, bias, x, cos, sin):
        """One token per row, x (b, d) -> (b, d). One projection gives q (and k, v in owner layers,
        which write them to the cache first); the layers an owner serves read the same cache slot."""
        cfg = self.config
        b, h, g, dk, rot = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim
        proj = F.linear(x, weight, bias).view(b, -1, dk)  # (b, h [+ 2g], d_k): q heads [, k heads, v heads]
        self._write_unrotated_keys(attn, proj[:, h : h + g])
        rotated = proj[:, : h + g if attn.owns_kv else h, :rot]  # q and k, rotated in place
        halves_swapped = torch.cat((rotated[..., rot // 2 :], rotated[..., : rot // 2]), -1)
        rotated.mul_(cos).addcmul_(halves_swapped, sin)
        keys, values = self._keys(attn), self.cache.values[attn.cache_slot]  # (b, g, L, d_k)
        if attn.owns_kv:
            keys.index_copy_(2, self.position, proj[:, h : h + g, None])
            values.index_copy_(2, self.position, proj[:, h + g :, None])
        q = proj[:, :h].view(b, g, h // g, dk)  # query head i -> group i // (h/g), row i % (h/g)
        return attn.dense(self.attention(q, keys, values, self.bias).reshape(b, h * dk))

    def _keys(self, attn) -> torch.Tensor:
        """The keys (b, g, L, d_k) layer `attn` attends with: its owner's slot, or under
        `unrotated_shared_keys` a served layer's unrotated slot."""
        slot = attn.cache_slot if attn.owns_kv or attn.unrotated_slot is None else attn.unrotated_slot
        return self.cache.keys[slot]

    def _write_unrotated_keys(self, attn, k: torch.Tensor) -> None:
        """Under `unrotated_shared_keys`, an owner's new keys k (b, g, d_k), not yet rotated, into the
        slot its served layers read (before the step rotates them)."""
        if attn.owns_kv and attn.unrotated_slot is not None:
            self.cache.keys[attn.unrotated_slot].index_copy_(2, self.position, k[:, :, None])

    def _fused_step(self, greedy: bool) -> torch.Tensor:
        """`_step` with the triton kernels. A parallel-residual layer is one matrix product for
        (k, v,) q and the MLP's first layer, the attention kernel (which also merges the splits of the
        sequence), and one product for the attention's output projection and the MLP's second layer
        (`_folded_layer`); an `add_norm` kernel before each layer adds up the residual and normalises.
        Greedy steps choose the next token from maxima the output product leaves per column tile."""
        model = self.model
        x, rows = model.embed_in.weight, self.token  # the first add_norm gathers the embeddings
        pending = ()  # outputs still to be added to x
        for block, projection, folded in zip(model.layers, self.projections, self.folded):
            if folded is not None:
                x, (normed,) = kernels.add_norm(x, pending, block.input_layernorm.eps, rows)
                pending, rows = self._folded_layer(block, folded, normed), None
                continue
            norms = [block.input_layernorm] + [block.post_attention_layernorm] * block.use_parallel_residual
            x, normed = kernels.add_norm(x, pending, norms, rows)
            rows = None
            out = block.attention.dense(self._attend(block.attention, F.linear(normed[0], *projection)))
            if block.use_parallel_residual:
                pending = (out, block.mlp(normed[1]))
            else:
                x, (h_mlp,) = kernels.add_norm(x, (out,), [block.post_attention_layernorm])
                pending = (block.mlp(h_mlp),)
        _, (x,) = kernels.add_norm(x, pending, [model.final_layer_norm], rows, advance=self.position)
        head = model.embed_out
        if not kernels.runs_linear(x):
            logits = head(x)
            if greedy:
                self._choose(logits)
            return logits
        if not greedy:
            return kernels.linear(x, head.weight, head.bias, tiles=kernels.LINEAR_HEAD)
        logits, maxima = kernels.linear(x, head.weight, head.bias, argmax=True, tiles=kernels.LINEAR_HEAD)
        kernels.pick(maxima, self.token, self.history, self.position)
        return logits

    def _folded_layer(self, block, folded: FoldedLayer, normed: torch.Tensor) -> tuple[torch.Tensor]:
        """A parallel-residual layer of the fused step; -> its residual update, an `add_norm` addend.

        The first product gives hidden = [k v | q | MLP hidden] (k, v in owner layers), with the
        MLP's GELU applied as `kernels.linear` writes it (else by the attention kernel). Attention
        writes its output over q, so the second product reads [attention output | activation] in
        place."""
        hd = self.config.num_heads * self.config.head_dim
        q0 = folded.proj_width - hd
        gelu = folded.gelu and kernels.runs_linear(normed) and (folded.gelu, folded.proj_width)
        hidden = kernels.linear(normed, folded.w_in, folded.b_in, gelu=gelu or None)
        act = hidden[:, folded.proj_width :]
        if folded.gelu is None:
            act.copy_(block.mlp.act(act))
        activation = (folded.gelu, act, act) if folded.gelu and not gelu else None
        self._attend(block.attention, hidden, hidden[:, q0 : q0 + hd], activation, kv_first=True)
        return (kernels.linear(hidden[:, q0:], folded.w_out, folded.b_out, deep=True),)

    def _attend(
        self, attn, proj: torch.Tensor, out: torch.Tensor | None = None, activation=None, kv_first: bool = False
    ) -> torch.Tensor:
        """decode_attention of one layer over its cache slot; proj (b, >= (h [+ 2g])·d_k), its k columns
        first when `kv_first`, else after q."""
        g, dk = self.config.num_kv_heads, self.config.head_dim
        k0 = 0 if kv_first else self.config.num_heads * dk
        self._write_unrotated_keys(attn, proj[:, k0 : k0 + g * dk].view(-1, g, dk))
        return kernels.decode_attention(
            proj,
            self._keys(attn),
            self.cache.values[attn.cache_slot],
            self.rotary,
            self.position,
            self.pad,
            self.config.num_heads,
            attn.owns_kv,
            self.splits,
            out,
            activation,
            self.counters,
            kv_first,
        )


class FoldedLayer(NamedTuple):
    """A parallel-residual layer as two matrix products over its normalised input n (no scale, shift):
    n @ w_in.T + b_in gives [k, v,] q (proj_width columns) and the MLP's hidden layer, the two layer
    norms' scales and shifts folded in; [attention output, activation] @ w_out.T + b_out is the
    layer's whole residual update. gelu: the MLP activation's `gelu_mode` (None: not a GELU)."""

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    proj_width: int
    gelu: str | None

    @classmethod
    @torch.no_grad()
    def of(cls, block) -> FoldedLayer | None:
        """None when the block does not fit: sequential residual, norms of different eps, no biases."""
        attn, mlp = block.attention, block.mlp
        ln_attn, ln_mlp = block.input_layernorm, block.post_attention_layernorm
        if not block.use_parallel_residual or ln_attn.eps != ln_mlp.eps or attn.query.bias is None:
            return None

        def fold(weight, bias, norm):  # W (n * w + c) + b = (W diag(w)) n + (W c + b), in float32
            w32 = weight.float()
            return (w32 * norm.weight.float()).to(weight.dtype), (w32 @ norm.bias.float() + bias.float()).to(bias.dtype)

        (w_attn, b_attn), (w_mlp, b_mlp) = (
            fold(*fused_projection(attn), ln_attn),
            fold(mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias, ln_mlp),
        )
        hd = attn.dense.weight.shape[1]  # q's rows; k, v (owners) move before them
        w_attn, b_attn = torch.cat([w_attn[hd:], w_attn[:hd]]), torch.cat([b_attn[hd:], b_attn[:hd]])
        return cls(
            torch.cat([w_attn, w_mlp]),
            torch.cat([b_attn, b_mlp]),
            torch.cat([attn.dense.weight, mlp.dense_4h_to_h.weight], 1),
            attn.dense.bias + mlp.dense_4h_to_h.bias,
            w_attn.shape[0],
            gelu_mode(mlp.act),
        )


def gelu_mode(act) -> str | None:
    """F.gelu's `approximate` ("none", "tanh") when act is a GELU, else None."""
    if getattr(act, "func", act) is not F.gelu:
        return None
    return act.keywords.get("approximate", "none") if isinstance(act, functools.partial) else "none"


@torch.no_grad()
def pad_mlp_(model: MLKVTransformer, multiple: int = 64) -> MLKVTransformer:
    """Widen every MLP's hidden layer to a multiple of `multiple` with zero units, in place.

    The function is unchanged (each added unit has zero input weights and biases, act(0) = 0 (SiLU
    and GELU; a gated unit is act(0)·0 = 0), and zero output weights), but GPU matrix products run
    at full speed only on aligned widths, and the parameter-matched widths of converted layouts are
    not (Pythia-160M MLKV-6: 3809). For inference: the state dict no longer matches
    `config.intermediate_size`.
    """

    def widen(linear: nn.Linear, dim: int, pad: int) -> None:
        """`pad` zero rows (dim 0: units out) or columns (dim 1: units in) more for `linear`."""
        linear.weight = nn.Parameter(
            F.pad(linear.weight, (0, pad) if dim else (0, 0, 0, pad)), requires_grad=linear.weight.requires_grad
        )
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(F.pad(linear.bias, (0, pad)), requires_grad=linear.bias.requires_grad)
        if dim:
            linear.in_features += pad
        else:
            linear.out_features += pad

    for block in model.layers:
        mlp = block.mlp
        ins, out = (
            ((mlp.gate_proj, mlp.up_proj), mlp.down_proj)
            if hasattr(mlp, "gate_proj")
            else ((mlp.dense_h_to_4h,), mlp.dense_4h_to_h)
        )
        pad = -out.in_features % multiple
        for linear in ins:
            widen(linear, 0, pad)
        widen(out, 1, pad)
    return model


def fused_projection(attn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of one matrix product giving q, k, v of an owner layer (q alone otherwise)."""
    parts = (attn.query, attn.key, attn.value) if attn.owns_kv else (attn.query,)
    weight = torch.cat([p.weight for p in parts]) if attn.owns_kv else attn.query.weight
    if attn.query.bias is None:
        return weight, None
    return weight, torch.cat([p.bias for p in parts]) if attn.owns_kv else attn.query.bias


def next_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (b, vocab) -> token ids (b,): argmax, or a sample at `temperature` from the `top_k` best."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: MLKVTransformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    prefill_chunk_tokens: int = 32768,
    attention: str | None = None,
) -> torch.Tensor:
    """Greedy (or sampled) continuation: input_ids (b, s) -> (b, s + max_new_tokens).

    attention_mask (b, s) marks real tokens with 1; padding must be on the left. Rows that produced
    `eos_token_id` continue with it. `cuda_graph` defaults to True on CUDA; `attention` as in
    `StaticDecoder`. On GPUs, `pad_mlp_(model)` first speeds up layouts whose MLP width is not a
    multiple of 64.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens} must be at least 1")
    b, s = input_ids.shape
    decoder = StaticDecoder(model, b, s + max_new_tokens - 1, cuda_graph, attention)
    choose = functools.partial(
        next_token, do_sample=do_sample, temperature=temperature, top_k=top_k, generator=generator
    )
    logits = decoder.prefill(input_ids, attention_mask, prefill_chunk_tokens)
    if not do_sample and eos_token_id is None:  # the choice inside the step's graph
        return torch.cat([input_ids, decoder.greedy(choose(logits), max_new_tokens - 1)], dim=1)
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    new = []
    for i in range(max_new_tokens):
        token = choose(logits)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        new.append(token)
        if i + 1 < max_new_tokens:
            logits = decoder.step(token)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
