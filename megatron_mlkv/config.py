"""The model configuration: the hyper-parameters of a decoder family plus the KV sharing layout, validated once.

Two families, chosen by `family`:

    gpt_neox  Pythia/GPT-NeoX: LayerNorm, GELU MLP (dense_h_to_4h, dense_4h_to_h), parallel or
              sequential residual, partial rotary, biases everywhere
    llama     Llama, Qwen2, Mistral, SmolLM: RMSNorm, gated SiLU MLP (gate_proj, up_proj, down_proj),
              sequential residual, full rotary with rope scaling, biases where the config says
              (Qwen2: on q, k and v only), a head dimension that may differ from hidden / heads

The KV layout (`layout.KVLayout`) is the same for both: sharing K/V across layers does not depend on
the parts around it.

This file is copied next to exported checkpoints (transformers remote code): standard library and
relative imports only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import MLKVError
from .layout import KVLayout, LayoutError

ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")
FAMILIES = ("gpt_neox", "llama")
# rope scaling types the model implements, and the parameters each needs besides rope_theta
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# transformers model types of the llama family (the checkpoints conversion reads)
LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral")


class ConfigError(MLKVError):
    """An invalid model configuration; the message names the field."""


@dataclass
class MLKVConfig:
    """A decoder of `family` whose layers may share key/value activations (see `KVLayout`).

    `num_kv_heads` (g) defaults to `num_heads` and `kv_owner` to every layer owning its K/V, which
    is the family's plain model (GPT-NeoX; Llama with multi-head attention).

    `head_size`: d_k when the checkpoint states it (Llama's `head_dim`), else hidden_size / num_heads.
    `attention_bias` is the bias of the query, key and value projections, `attention_out_bias` that
    of the output projection (None: the same). `rope_scaling`: {"rope_type": ..., parameters} of
    `ROPE_TYPES` (None: plain RoPE). `base_model_type`: the transformers model type of the checkpoint
    the model was converted from (gpt_neox, llama, qwen2, mistral), to write it back as one.

    `unrotated_shared_keys` reproduces the reference code of the MLKV paper (pythia-mlkv): an owner
    attends with its rotated keys but hands its keys *before* the rotary embedding to the layers it
    serves, which rotate only their queries. Checkpoints trained that way (the paper's released
    models) are only faithful under that arithmetic. A cache then keeps the unrotated keys of each
    serving owner beside its rotated ones (`cached_key_slots`).
    """

    vocab_size: int = 50304
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_kv_heads: int | None = None
    kv_owner: tuple[int, ...] | None = None
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    unrotated_shared_keys: bool = False
    family: str = "gpt_neox"
    head_size: int | None = None
    attention_out_bias: bool | None = None
    mlp_bias: bool = True
    rope_scaling: dict | None = None
    base_model_type: str | None = None
    layout: KVLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} = {value!r} must be a positive integer")
        if self.family not in FAMILIES:
            raise ConfigError(f"family = '{self.family}' is not supported; allowed: {', '.join(FAMILIES)}")
        if self.family == "llama" and self.use_parallel_residual:
            raise ConfigError("family 'llama' has a sequential residual; use_parallel_residual must be false")
        if self.head_size is not None and (not isinstance(self.head_size, int) or self.head_size < 1):
            raise ConfigError(f"head_size = {self.head_size!r} must be a positive integer")
        if self.head_size is not None and self.head_size * self.num_heads == self.hidden_size:
            self.head_size = None  # the default: one way to say it, so configs compare equal
        if self.head_size is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size = {self.hidden_size} must be divisible by num_heads = {self.num_heads}")
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.base_model_type is None:
            self.base_model_type = self.family  # gpt_neox, or llama (qwen2 and mistral are named by conversion)
        self._check_rope_scaling()
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct = {self.rotary_pct} must be in (0, 1]")
        if self.rotary_dim % 2:
            raise ConfigError(
                f"rotary_pct = {self.rotary_pct} gives {self.rotary_dim} rotary dims of "
                f"head_dim {self.head_dim}; it must be even"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act = '{self.hidden_act}' is not supported; allowed: {', '.join(ACTIVATIONS)}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        self.kv_owner = tuple(range(self.num_layers)) if self.kv_owner is None else tuple(self.kv_owner)
        try:
            self.layout = KVLayout(self.num_layers, self.num_heads, self.num_kv_heads, self.kv_owner)
        except LayoutError as e:
            raise ConfigError(str(e)) from None

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ROPE_TYPES:
            raise ConfigError(
                f"rope scaling '{kind}' is not implemented; implemented: {', '.join(ROPE_TYPES)}; converting "
                f"would change the model's positions"
            )
        missing = [k for k in ROPE_TYPES[kind] if scaling.get(k) is None]
        if missing:
            raise ConfigError(f"rope scaling '{kind}' needs {', '.join(missing)}")
        self.rope_scaling = {"rope_type": kind, **{k: scaling[k] for k in ROPE_TYPES[kind]}}
        if kind == "default":
            self.rope_scaling = None

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def cached_key_slots(self) -> int:
        """Key slots of a cache: the m owners', plus one of unrotated keys per serving owner under
        `unrotated_shared_keys` (`KVLayout.unrotated_key_slot`). Values always take m slots."""
        extra = len(self.layout.serving_owners) if self.unrotated_shared_keys else 0
        return self.layout.kv_layers + extra

    def cache_elements(self, batch: int, seq: int) -> int:
        """Elements a cache of `batch` rows of `seq` tokens holds: `KVLayout.cache_elements` plus the
        unrotated keys of `unrotated_shared_keys`."""
        per_slot = batch * seq * self.num_kv_heads * self.head_dim
        return (self.cached_key_slots + self.layout.kv_layers) * per_slot

    def with_layout(
        self, kv_layers: int | None = None, kv_groups: int | None = None, kv_owner: list[int] | None = None, **changes
    ) -> MLKVConfig:
        """A copy with a new KV layout: uniform (m, g) or an explicit owner map, plus other `changes`."""
        g = self.num_kv_heads if kv_groups is None else kv_groups
        if kv_owner is None:
            m = self.layout.kv_layers if kv_layers is None else kv_layers
            try:
                kv_owner = KVLayout.uniform(self.num_layers, self.num_heads, m, g).kv_owner
            except LayoutError as e:
                raise ConfigError(str(e)) from None
        elif kv_layers is not None and len(set(kv_owner)) != kv_layers:
            raise ConfigError(f"kv_owner has {len(set(kv_owner))} owner layers but kv_layers = {kv_layers}")
        return dataclasses.replace(self, num_kv_heads=g, kv_owner=tuple(kv_owner), **changes)

    @property
    def gated_mlp(self) -> bool:
        """Llama's gate_proj/up_proj/down_proj instead of GPT-NeoX's two matrices."""
        return self.family == "llama"

    def num_parameters(self) -> int:
        """Exact parameter count of the model this config builds (tied embeddings counted once)."""
        d, dk, h, g, inter = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, self.intermediate_size
        qkv_bias, out_bias, mlp_bias = int(self.attention_bias), int(self.attention_out_bias), int(self.mlp_bias)
        attention = (d + qkv_bias) * h * dk + h * dk * d + out_bias * d
        kv = 2 * (d + qkv_bias) * g * dk
        mlp = (3 if self.gated_mlp else 2) * d * inter + mlp_bias * ((2 if self.gated_mlp else 1) * inter + d)
        norm = d if self.family == "llama" else 2 * d  # RMSNorm: a scale; LayerNorm: scale and shift
        per_layer = 2 * norm + attention + mlp
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return embeddings + norm + self.num_layers * per_layer + self.layout.kv_layers * kv

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6·N + 12·l·h·d_k·s, N = matmul weights outside the input embedding.

        N counts the K/V projections of owner layers only, so MLKV's saved compute shows up in MFU.
        """
        d, dk = self.hidden_size, self.head_dim
        attention = 2 * d * self.num_heads * dk
        mlp = (3 if self.gated_mlp else 2) * d * self.intermediate_size
        kv = 2 * d * self.num_kv_heads * dk
        n = self.num_layers * (attention + mlp) + self.layout.kv_layers * kv + d * self.vocab_size
        return 6 * n + 12 * self.num_layers * self.num_heads * dk * seq_len

    # --- transformers config interchange ---

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> MLKVConfig:
        """Read a transformers config into an `MLKVConfig`: `GPTNeoXConfig`, `LlamaConfig`, `Qwen2Config`,
        `MistralConfig`, or one of ours (`configuration_mlkv`)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type in ("gpt_neox", "mlkv_gpt_neox"):
            values = _gpt_neox_values(hf_config)
        elif model_type in (*LLAMA_MODEL_TYPES, "mlkv_llama"):
            values = _llama_values(hf_config)
        else:
            raise ConfigError(
                f"model_type '{model_type}' is not supported; supported: gpt_neox, {', '.join(LLAMA_MODEL_TYPES)}"
            )
        for name in ("attention_dropout", "hidden_dropout"):
            if getattr(hf_config, name, 0.0):
                raise ConfigError(f"{name} = {getattr(hf_config, name)}: dropout is not supported (Pythia uses 0)")
        values.update(overrides)
        return cls(**values)

    def to_hf_kwargs(self) -> dict:
        """Keyword arguments for the transformers config of our family's remote code
        (`configuration_mlkv`): the attribute names of GPTNeoXConfig or LlamaConfig, plus the KV layout."""
        rope = {"rope_type": "default", "rope_theta": self.rotary_emb_base, **(self.rope_scaling or {})}
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            kv_owner=list(self.kv_owner),
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
        )
        if self.family == "llama":
            if self.rotary_pct != 1.0:
                rope["partial_rotary_factor"] = self.rotary_pct
            return dict(
                common,
                num_key_value_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                rms_norm_eps=self.layer_norm_eps,
                attention_out_bias=self.attention_out_bias,
                mlp_bias=self.mlp_bias,
                rope_parameters=rope,
                base_model_type=self.base_model_type,
            )
        return dict(
            common,
            num_kv_heads=self.num_kv_heads,
            rope_parameters={**rope, "partial_rotary_factor": self.rotary_pct},
            layer_norm_eps=self.layer_norm_eps,
            use_parallel_residual=self.use_parallel_residual,
            unrotated_shared_keys=self.unrotated_shared_keys,
        )


def _rope(hf_config) -> dict:
    """{"rope_type", "rope_theta", scaling parameters...} of a transformers config (transformers 5's
    `rope_parameters`, or the older `rope_scaling` and `rope_theta`)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", None))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


def _gpt_neox_values(hf_config) -> dict:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        num_kv_heads=getattr(hf_config, "num_kv_heads", None),
        kv_owner=getattr(hf_config, "kv_owner", None),
        rotary_pct=rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 0.25)),
        rotary_emb_base=rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0)),
        max_position_embeddings=hf_config.max_position_embeddings,
        layer_norm_eps=hf_config.layer_norm_eps,
        use_parallel_residual=hf_config.use_parallel_residual,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=getattr(hf_config, "attention_bias", True),
        hidden_act=hf_config.hidden_act,
        initializer_range=getattr(hf_config, "initializer_range", 0.02),
        unrotated_shared_keys=bool(getattr(hf_config, "unrotated_shared_keys", False)),
        base_model_type="gpt_neox",
    )


def _llama_values(hf_config) -> dict:
    """Llama, Qwen2, Mistral (and our mlkv_llama): what differs is where the biases are and which
    attention variants the config may switch on, each refused here since the model has none."""
    model_type = hf_config.model_type
    base_type = getattr(hf_config, "base_model_type", None) or model_type
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", window is not None) and window is not None:
        if window < hf_config.max_position_embeddings:
            raise ConfigError(
                f"sliding_window = {window} < max_position_embeddings = {hf_config.max_position_embeddings}: "
                f"sliding-window attention is not implemented"
            )
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ConfigError(f"layer_types {sorted(layer_types)}: only full attention is implemented")
    if model_type == "mlkv_llama":
        qkv_bias, out_bias = hf_config.attention_bias, getattr(hf_config, "attention_out_bias", None)
    elif model_type == "qwen2":
        qkv_bias, out_bias = True, False  # Qwen2Attention: biased q, k, v; unbiased o_proj
    else:
        qkv_bias = out_bias = bool(getattr(hf_config, "attention_bias", False))
    rope = _rope(hf_config)
    theta = rope.pop("rope_theta")
    heads = hf_config.num_attention_heads
    return dict(
        family="llama",
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        intermediate_size=hf_config.intermediate_size,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        kv_owner=getattr(hf_config, "kv_owner", None),
        head_size=getattr(hf_config, "head_dim", None),
        rotary_pct=rope.pop("partial_rotary_factor", 1.0),
        rotary_emb_base=10000.0 if theta is None else float(theta),
        rope_scaling=rope,
        max_position_embeddings=hf_config.max_position_embeddings,
        layer_norm_eps=hf_config.rms_norm_eps,
        use_parallel_residual=False,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        attention_out_bias=out_bias,
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        hidden_act=hf_config.hidden_act,
        initializer_range=getattr(hf_config, "initializer_range", 0.02),
        base_model_type=base_type,
    )


# The Pythia suite's shapes (EleutherAI/pythia-*): l layers, d hidden, h heads, 4d MLP, partial rotary 0.25.
PYTHIA_SHAPES = {
    "pythia-70m": dict(num_layers=6, hidden_size=512, num_heads=8),
    "pythia-160m": dict(num_layers=12, hidden_size=768, num_heads=12),
    "pythia-410m": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "pythia-1b": dict(num_layers=16, hidden_size=2048, num_heads=8),
    "pythia-1.4b": dict(num_layers=24, hidden_size=2048, num_heads=16),
    "pythia-2.8b": dict(num_layers=32, hidden_size=2560, num_heads=32),
}


# Llama-family shapes (their config.json): the released models' values, random weights for benchmarks
LLAMA_SHAPES = {
    # meta-llama/Llama-3.2-1B: 16 layers, 32 query heads over 8 KV heads, Llama-3 rope scaling, tied
    "llama-3.2-1b": dict(
        num_layers=16,
        hidden_size=2048,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=131072,
        rotary_emb_base=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=True,
    ),
    # HuggingFaceTB/SmolLM-135M: 30 layers, 9 query heads over 3 KV heads, tied
    "smollm-135m": dict(
        num_layers=30,
        hidden_size=576,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=2048,
        rotary_emb_base=10000.0,
        tie_word_embeddings=True,
    ),
}
LLAMA_DEFAULTS = dict(
    family="llama",
    use_parallel_residual=False,
    rotary_pct=1.0,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    layer_norm_eps=1e-5,
)


def preset(name: str, **changes) -> MLKVConfig:
    """The base config of a released shape, with optional field `changes`: a Pythia shape (e.g.
    'pythia-160m', MHA) or a Llama-family one ('llama-3.2-1b', 'smollm-135m': their own GQA)."""
    key = name.lower().split("/")[-1].removesuffix("-deduped")
    if key in LLAMA_SHAPES:
        values = {**LLAMA_DEFAULTS, **LLAMA_SHAPES[key]}
    elif key in PYTHIA_SHAPES:
        shape = PYTHIA_SHAPES[key]
        values = dict(vocab_size=50304, intermediate_size=4 * shape["hidden_size"], **shape)
    else:
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join([*PYTHIA_SHAPES, *LLAMA_SHAPES])}")
    values.update(changes)
    return MLKVConfig(**values)
