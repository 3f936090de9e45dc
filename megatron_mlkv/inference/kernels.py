"""Triton kernels of the one-token decode step (`megatron_mlkv.inference.generate`, attention="triton").

A decode step of a small model at moderate batch is a few hundred small kernels; its time goes to
their count and to attention kernels that leave most of the GPU idle, not to the bytes it must read.
Four kernels remove most of that:

- `decode_attention`: rotary of the new q (and k), the owner's write of k and v into the cache, and
  attention of the h/g query heads of each KV head over that head's cache in one kernel. The cached
  sequence is split over several programs when batch x KV heads alone would not fill the GPU
  (flash-decoding); the last split of each row and KV head to finish merges them by their
  log-sum-exp. The same launch can apply the MLP's GELU of a parallel-residual layer, which needs
  nothing from attention. An owner attends to its new k, v after its loop over the cache and writes
  them then, so nothing holds the loop's first loads back.
- `add_norm`: the residual sum of the previous layer (x + attention + MLP) and the one or two layer
  norms that read it (or a plain normalisation, when the norms' scales are folded into the next
  weights: `generate.FoldedLayer`), in one pass over the row; it also adds up the split-K partial
  sums of `linear`, gathers the first layer's embedding rows and advances the step's position.
- `linear`: x @ W.T + b for the few rows of a decode step (up to LINEAR_MAX_ROWS), the weights
  streamed once through a software pipeline (cuBLAS spends ~8 us on a 6 MB weight at 64 rows; this
  ~5.5). It can apply the MLP's GELU as it stores; deep weights are split over K for more programs;
  for the output head it can leave each row's largest logit per column tile,
- from which `pick` makes the greedy choice inside the step (no argmax kernel, no copy of the
  token, nothing between two graph replays).

On Hopper and later they use programmatic dependent launch (`PDL`): a kernel may start while the
one before it drains, and waits for it only before reading what it wrote.

All run under TRITON_INTERPRET=1 on CPU tensors, which is how the tests check them without a GPU
(without PDL, which the interpreter does not run).

Why one file of ~640 lines: the four kernels share their tile choices, the programmatic-dependent-
launch protocol and the CPU-interpreter switches, and each is read next to its launcher.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: generate.py falls back to SDPA
    triton = None

# decode_attention's tiles (block of cached tokens, warps, pipeline stages) for a few (h/g <= 4) or
# many query heads per KV head (tuned on an H100, within 1% of the best found: benchmarks/decode_kernels.py --tune);
# TILE, when set, overrides both
FEW_HEADS_TILE = (32, 2, 3)
MANY_HEADS_TILE = (64, 4, 3)
TILE = None
PROGRAMS_PER_SM = 2  # split the sequence until batch x KV heads x splits reaches this many per SM
MIN_SPLIT_LEN = 128
GELU_MODES = {None: 0, "none": 1, "tanh": 2}  # fused activations (F.gelu's `approximate`) as the kernels take them
# linear's tiles (rows, columns, K per step, warps, pipeline stages) and K splits for the shapes in a decode
# step: wide (K = d: q [k v] and the MLP's first layer), deep (the layer's output projections) and the
# output head (K = d, N = vocabulary); LINEAR_MAX_ROWS: more rows than this go to cuBLAS
LINEAR_WIDE = (64, 64, 128, 8, 4, 1)
LINEAR_DEEP = (64, 32, 128, 4, 5, 4)
LINEAR_HEAD = (64, 64, 64, 8, 4, 1)
LINEAR_MAX_ROWS = 64
# programmatic dependent launch (Hopper and later; MLKV-6's step at batch 64 on an H100 0.431 -> 0.407 ms): each kernel
# waits for the one before it (`gdc_wait`) before it reads anything a kernel of the step writes, then
# lets the next one start; those in PDL_KERNELS are launched before the one before them has finished,
# so their start overlaps its drain. Attention is not: launched early, its programs land unevenly on
# the SMs the matrix product before leaves free, and at batch 64 steps took 2-6% longer
PDL = True
PDL_KERNELS = ("add_norm", "linear", "pick")


def pdl(device: torch.device) -> bool:
    """Whether the kernels launch with programmatic dependent launch on this device."""
    return PDL and device.type == "cuda" and _hopper_or_later(device.index)


@functools.lru_cache
def _hopper_or_later(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def available(device: torch.device) -> bool:
    """True where these kernels can run: CUDA with triton, or triton's CPU interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _after_previous(PDL: tl.constexpr):
        """Under PDL: wait for the kernel before this one to finish (and so for all before it, as
        each waited for its own), then let the next one start."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _gelu(z, MODE: tl.constexpr):
        """F.gelu of float32 z; MODE: GELU_MODES' 1 (exact) or 2 (tanh approximation)."""
        if MODE == 1:
            return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))  # tanh(u) = 2 sigmoid(2u) - 1

    @triton.jit
    def _linear_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        stride_ys,
        K_SPLIT,
        act_from,
        amax_ptr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr,
        PRECISION: tl.constexpr,
        ARGMAX: tl.constexpr,
        PDL: tl.constexpr,
    ):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)
        m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        k_end = tl.minimum((split + 1) * K_SPLIT, K)
        _after_previous(PDL)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(split * K_SPLIT, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(
                w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                mask=(n < N)[:, None] & (k < k_end)[None, :],
                other=0.0,
            )
            x = tl.load(
                x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :],
                mask=(m < M)[:, None] & (k < k_end)[None, :],
                other=0.0,
            )
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if HAS_BIAS:
            if split == 0:
                acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        if ACT != 0:  # the MLP's activation, on the columns from act_from
            acc = tl.where((n >= act_from)[None, :], _gelu(acc, ACT), acc)
        y_ptrs = y_ptr + split * stride_ys + m[:, None].to(tl.int64) * stride_ym + n[None, :]
        mask = (m < M)[:, None] & (n < N)[None, :]
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptrs, y, mask=mask)
        if ARGMAX:  # each row's largest stored value in this column tile, and its first column
            y = tl.where(mask, y.to(tl.float32), float("-inf"))
            best = tl.max(y, 1)
            first = tl.min(tl.where(y == best[:, None], n[None, :], 2147483647), 1)
            tiles = tl.num_programs(0)
            tile = amax_ptr + m * 2 * tiles + tl.program_id(0)  # (M, 2, tiles): a row's tiles side by side
            tl.store(tile, best, mask=m < M)
            tl.store(tile + tiles, first.to(tl.float32), mask=m < M)  # exact below 2**24 columns

    @triton.jit
    def _pick_kernel(amax_ptr, T, token_ptr, history_ptr, pos_ptr, stride_h, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
        """Each row's first largest logit from `linear`'s per-tile maxima: the row's next token, also
        written to history[row, pos]."""
        _after_previous(PDL)
        row = tl.program_id(0)
        t = tl.arange(0, BLOCK_T)
        best = tl.full([BLOCK_T], float("-inf"), tl.float32)
        first = tl.full([BLOCK_T], float("inf"), tl.float32)
        for t0 in range(0, T, BLOCK_T):  # each lane keeps its first tile of its largest value
            tile = amax_ptr + row * 2 * T + t0 + t
            v = tl.load(tile, mask=t0 + t < T, other=float("-inf"))
            i = tl.load(tile + T, mask=t0 + t < T, other=float("inf"))
            better = v > best
            best = tl.where(better, v, best)
            first = tl.where(better, i, first)
        top = tl.max(best, 0)
        token = tl.min(tl.where(best == top, first, float("inf")), 0).to(tl.int64)
        tl.store(token_ptr + row, token)
        tl.store(history_ptr + row * stride_h + tl.load(pos_ptr), token)

    @triton.jit
    def _add_norm_kernel(
        x_ptr,
        a_ptr,
        b_ptr,
        x_out_ptr,
        w1_ptr,
        c1_ptr,
        y1_ptr,
        w2_ptr,
        c2_ptr,
        y2_ptr,
        D,
        stride_parts,
        eps1,
        eps2,
        rows_ptr,
        pos_ptr,
        A_PARTS: tl.constexpr,
        B_PARTS: tl.constexpr,
        NORMS: tl.constexpr,
        AFFINE: tl.constexpr,
        RMS: tl.constexpr,
        GATHER: tl.constexpr,
        ADVANCE: tl.constexpr,
        BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        if AFFINE:  # the norms' weights: read before the kernel before this one is done
            w1 = tl.load(w1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            c1 = 0.0 if RMS else tl.load(c1_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if NORMS == 2:
                w2 = tl.load(w2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                c2 = 0.0 if RMS else tl.load(c2_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        _after_previous(PDL)
        src = tl.load(rows_ptr + row).to(tl.int64) if GATHER else row  # GATHER: x is a table (an embedding)
        x = tl.load(x_ptr + src * D + cols, mask=mask, other=0.0).to(tl.float32)
        if ADVANCE:  # the step's position, read by no other program of this kernel
            if row == 0:
                tl.store(pos_ptr, tl.load(pos_ptr) + 1)
        for i in tl.static_range(A_PARTS):  # an addend's split-K partial sums, summed here
            x += tl.load(a_ptr + i * stride_parts + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        for i in tl.static_range(B_PARTS):
            x += tl.load(b_ptr + i * stride_parts + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if A_PARTS + B_PARTS >= 1:  # round the sum as it is stored, and normalise what was stored
            x = x.to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + row * D + cols, x, mask=mask)
            x = x.to(tl.float32)
        elif GATHER:
            tl.store(x_out_ptr + row * D + cols, x.to(x_out_ptr.dtype.element_ty), mask=mask)
        if RMS:  # RMSNorm: x / sqrt(mean(x²) + eps) · w (the shift c is 0)
            diff = tl.where(mask, x, 0.0)
        else:
            diff = tl.where(mask, x - tl.sum(x, 0) / D, 0.0)
        var = tl.sum(diff * diff, 0) / D
        y = diff * tl.rsqrt(var + eps1)
        if AFFINE:
            y = y * w1 + c1
        tl.store(y1_ptr + row * D + cols, y.to(y1_ptr.dtype.element_ty), mask=mask)
        if NORMS == 2:
            y = diff * tl.rsqrt(var + eps2) * w2 + c2
            tl.store(y2_ptr + row * D + cols, y.to(y2_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_attention_kernel(
        proj_ptr,
        k_ptr,
        v_ptr,
        rot_ptr,
        pos_ptr,
        pad_ptr,
        out_ptr,
        part_ptr,
        lse_ptr,
        count_ptr,
        stride_pb,
        stride_ob,
        stride_kb,
        stride_kg,
        stride_kl,
        max_len,
        H,
        G,
        R,
        Q0,
        K0,
        scale,
        act_in_ptr,
        act_out_ptr,
        act_width,
        DK: tl.constexpr,
        ROT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NSPLIT: tl.constexpr,
        OWNS_KV: tl.constexpr,
        PRECISION: tl.constexpr,
        ACT: tl.constexpr,
        ACT_BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        split = tl.program_id(2)
        # read before the kernel before this one is done (PDL): the position (advanced by the step's
        # last add_norm only), the padding and the rotary tables
        pos = tl.load(pos_ptr)  # cache index of the new token, read on the device (graph replays advance it)
        pad = tl.load(pad_ptr + b)
        d = tl.arange(0, DK)
        rotated = d < ROT
        swapped = tl.where(rotated, (d + ROT // 2) % ROT, d)  # rotate_half's partner of each dim
        cos = tl.load(rot_ptr + (pos - pad) * ROT + d, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(rot_ptr + (max_len + pos - pad) * ROT + d, mask=rotated, other=0.0).to(tl.float32)
        dtype = k_ptr.dtype.element_ty
        proj = proj_ptr + b * stride_pb

        # the splits share the cached tokens up to pos evenly, in whole tiles
        split_len = tl.cdiv(tl.cdiv(pos + 1, NSPLIT), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, pos + 1)
        k_base = k_ptr + b * stride_kb + g * stride_kg
        v_base = v_ptr + b * stride_kb + g * stride_kg
        if OWNS_KV:  # the new token is not in the cache yet: the loop stops before it
            end = tl.minimum(end, pos)
        lo = tl.maximum(start, pad // BLOCK_N * BLOCK_N)  # whole tiles of left padding are skipped
        _after_previous(PDL)

        r = tl.arange(0, BLOCK_R)
        q_ptr = proj + (Q0 + g * R + r)[:, None] * DK
        q = tl.load(q_ptr + d[None, :], mask=(r < R)[:, None], other=0.0).to(tl.float32)
        q_half = tl.load(q_ptr + swapped[None, :], mask=(r < R)[:, None], other=0.0).to(tl.float32)
        q = (q * cos[None, :] + q_half * sin[None, :]).to(dtype)

        if ACT != 0:  # this program's share of the row's MLP activation (GELU), the MLP's other half
            cols = (g * NSPLIT + split) * ACT_BLOCK + tl.arange(0, ACT_BLOCK)
            z = tl.load(act_in_ptr + b * stride_pb + cols, mask=cols < act_width, other=0.0).to(tl.float32)
            z = _gelu(z, ACT)
            tl.store(act_out_ptr + b * stride_ob + cols, z.to(act_out_ptr.dtype.element_ty), mask=cols < act_width)

        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, DK], tl.float32)
        for n0 in range(lo, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            valid = (n < end) & (n >= pad)
            k = tl.load(k_base + n[:, None] * stride_kl + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + n[:, None] * stride_kl + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # log2 units
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
            m_i = m_new
        if OWNS_KV:  # the new k (rotated) and v: attended and written to the cache by the split holding pos,
            # after its loop (a store before it would hold the loop's loads back until the rotation is done)
            if (pos >= start) & (pos < start + split_len):
                k_new = tl.load(proj + (K0 + g) * DK + d).to(tl.float32)
                k_half = tl.load(proj + (K0 + g) * DK + swapped).to(tl.float32)
                k_new = (k_new * cos + k_half * sin).to(dtype)
                v_new = tl.load(proj + (K0 + G + g) * DK + d)
                s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp2(m_i - m_new)
                p_new = tl.exp2(s_new - m_new)
                l_i = l_i * alpha + p_new
                acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
                m_i = m_new
                tl.store(k_base + pos * stride_kl + d, k_new)
                tl.store(v_base + pos * stride_kl + d, v_new)

        head = g * R + r
        out_ptrs = out_ptr + b * stride_ob + head[:, None] * DK + d[None, :]
        if NSPLIT == 1:
            out = acc / l_i[:, None]  # the new token is always visible: l_i > 0
            tl.store(out_ptrs, out.to(dtype), mask=(r < R)[:, None])
        else:  # each split leaves its normalised output and log-sum-exp; the last to finish merges
            empty = l_i == 0.0
            row = (b * H + head) * NSPLIT
            tl.store(
                part_ptr + (row + split)[:, None] * DK + d[None, :],
                acc / tl.where(empty, 1.0, l_i)[:, None],
                mask=(r < R)[:, None],
            )
            tl.store(
                lse_ptr + row + split,
                tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i))),
                mask=r < R,
            )
            tl.debug_barrier()  # every thread's stores before the release below
            if tl.atomic_add(count_ptr + b * G + g, 1, sem="acq_rel") == NSPLIT - 1:
                tl.store(count_ptr + b * G + g, 0)  # ready for the next launch
                m = tl.full([BLOCK_R], float("-inf"), tl.float32)
                for i in tl.static_range(NSPLIT):  # the split holding the new token is never empty
                    m = tl.maximum(m, tl.load(lse_ptr + row + i, mask=r < R, other=0.0, cache_modifier=".cg"))
                total = tl.zeros([BLOCK_R], tl.float32)
                merged = tl.zeros([BLOCK_R, DK], tl.float32)
                for i in tl.static_range(NSPLIT):
                    w = tl.exp2(tl.load(lse_ptr + row + i, mask=r < R, other=0.0, cache_modifier=".cg") - m)
                    part = tl.load(
                        part_ptr + (row + i)[:, None] * DK + d[None, :],
                        mask=(r < R)[:, None],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    total += w
                    merged += part * w[:, None]
                tl.store(out_ptrs, (merged / total[:, None]).to(dtype), mask=(r < R)[:, None])


def add_norm(
    x: torch.Tensor,
    addends: tuple[torch.Tensor, ...],
    norms: list[torch.nn.LayerNorm] | float,
    rows: torch.Tensor | None = None,
    advance: torch.Tensor | None = None,
):
    """x (b, d) plus up to two addends, then one or two layer norms of the sum in one kernel.

    An addend is (b, d), or (s, b, d) contiguous: the partial sums of `linear` split over K, added
    up here. Returns (the sum, [norm(sum) for norm in norms]); with no addends the sum is x itself.
    The norms are LayerNorms or RMSNorms (`model.RMSNorm`, which has no shift), not one of each.
    `norms` may instead be an eps: one normalisation without scale and shift (folded into the next
    weights). rows (b,): x is a table (an embedding, (n, d)) and the kernel's x is x[rows] (also
    returned as the sum). advance: a one-element tensor (the decode position) to add 1 to.
    """
    if rows is not None:
        assert x.is_contiguous()
    b, dim = (rows.shape[0], x.shape[1]) if rows is not None else x.shape
    x_out = x.new_empty(b, dim) if addends or rows is not None else x
    affine = not isinstance(norms, float)
    ys = [x.new_empty(b, dim) for _ in (norms if affine else [norms])]
    parts = [t.shape[0] if t.dim() == 3 else 1 for t in addends] + [0, 0]
    assert all(t.is_contiguous() and t.shape[-2:] == (b, dim) for t in addends)
    a, c = (tuple(addends) + (x, x))[:2]
    n1, n2 = (norms[0], norms[-1]) if affine else (None, None)
    rms = affine and getattr(n1, "bias", None) is None
    assert not affine or rms == (getattr(n2, "bias", None) is None), "one kind of norm per kernel"
    w1, c1, eps1 = (n1.weight, x if rms else n1.bias, n1.eps) if affine else (x, x, norms)
    w2, c2, eps2 = (n2.weight, x if rms else n2.bias, n2.eps) if affine else (x, x, norms)
    _add_norm_kernel[(b,)](
        x,
        a,
        c,
        x_out,
        w1,
        c1,
        ys[0],
        w2,
        c2,
        ys[-1],
        dim,
        b * dim,
        eps1,
        eps2,
        x if rows is None else rows,
        x if advance is None else advance,
        A_PARTS=parts[0],
        B_PARTS=parts[1],
        NORMS=len(ys),
        AFFINE=affine,
        RMS=rms,
        GATHER=rows is not None,
        ADVANCE=advance is not None,
        BLOCK=triton.next_power_of_2(dim),
        **_pdl_args(x.device, "add_norm"),
        num_warps=4,
    )
    return x_out, ys


def _pdl_args(device: torch.device, kind: str) -> dict:
    """Every kernel waits and lets the next start; those of PDL_KERNELS also start early themselves
    (`launch_pdl` only where it is on: triton before 3.4 does not know it)."""
    on = pdl(device)
    return dict(PDL=on, **({"launch_pdl": True} if on and kind in PDL_KERNELS else {}))


def runs_linear(x: torch.Tensor) -> bool:
    """Whether `linear` runs its kernel for x (else cuBLAS)."""
    return x.shape[0] <= LINEAR_MAX_ROWS and available(x.device)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    deep: bool = False,
    gelu: tuple[str, int] | None = None,
    argmax: bool = False,
    tiles: tuple | None = None,
):
    """x @ weight.T + bias for x (b, k) with few rows (a decode step); weight (n, k), rows
    contiguous, is streamed once. Wide shapes (deep=False) give (b, n) in x's dtype; gelu
    (approximate, c) applies F.gelu to the columns from c on; argmax: also return each row's largest
    value and its first column per column tile (b, 2, t), for `pick`. Deep ones (k >> n: too few
    column tiles to fill the GPU) are split over k and give the float32 partial sums (s, b, n), bias
    in the first, for `add_norm` to add up. tiles: instead of LINEAR_WIDE or LINEAR_DEEP. Where
    `runs_linear` is False: cuBLAS, whose (b, n) stands for a single partial (no gelu or argmax)."""
    b, k = x.shape
    n = weight.shape[0]
    if not runs_linear(x):
        assert gelu is None and not argmax
        y = torch.nn.functional.linear(x, weight, bias)
        return y[None] if deep else y
    assert x.stride(-1) == 1 and weight.stride(-1) == 1 and not (deep and (gelu or argmax))
    block_m, block_n, block_k, warps, stages, splits = tiles or (LINEAR_DEEP if deep else LINEAR_WIDE)
    block_m = min(block_m, max(16, triton.next_power_of_2(b)))
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_split)
    grid = (triton.cdiv(n, block_n), splits, triton.cdiv(b, block_m))
    y = torch.empty(splits, b, n, dtype=torch.float32, device=x.device) if deep else x.new_empty(b, n)
    maxima = torch.empty(b, 2, grid[0], dtype=torch.float32, device=x.device) if argmax else y
    act, act_from = gelu or (None, n)
    _linear_kernel[grid](
        x,
        weight,
        x if bias is None else bias,
        y,
        b,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        n,
        b * n,
        k_split,
        act_from,
        maxima,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        HAS_BIAS=bias is not None,
        ACT=GELU_MODES[act],
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ARGMAX=argmax,
        **_pdl_args(x.device, "linear"),
        num_warps=warps,
        num_stages=stages,
    )
    return (y, maxima) if argmax else y


def pick(maxima: torch.Tensor, token: torch.Tensor, history: torch.Tensor, position: torch.Tensor) -> None:
    """Greedy choice from `linear(..., argmax=True)`'s per-tile maxima (b, 2, t): each row's first
    largest logit into token (b,) and history[:, position] (history (b, L), int64)."""
    b, _, t = maxima.shape
    assert token.dtype == history.dtype == torch.int64 and history.stride(1) == 1
    _pick_kernel[(b,)](
        maxima,
        t,
        token,
        history,
        position,
        history.stride(0),
        BLOCK_T=256,
        **_pdl_args(token.device, "pick"),
        num_warps=4,
    )


def num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """How many pieces decode_attention cuts the sequence into so the GPU has enough programs."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = math.ceil(PROGRAMS_PER_SM * sms / (batch * kv_heads))
    return max(1, min(want, math.ceil(max_len / MIN_SPLIT_LEN)))


def decode_attention(
    proj: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rotary: torch.Tensor,
    position: torch.Tensor,
    pad: torch.Tensor,
    num_heads: int,
    owns_kv: bool,
    splits: int | None = None,
    out: torch.Tensor | None = None,
    activation: tuple[str, torch.Tensor, torch.Tensor] | None = None,
    counters: torch.Tensor | None = None,
    kv_first: bool = False,
) -> torch.Tensor:
    """Attention of one new token per row over a static cache; -> (b, h·d_k), written into `out` if given.

    proj (b, >= (h [+ 2g])·d_k), rows contiguous: the un-rotated q heads, then (owner layers) the new k
    and v heads; with kv_first, k and v heads come first. `out` may be proj's q columns (each q head
    is read before its output is written). keys, values (b, g, L, d_k): one cache slot; owners also
    write the new k, v there at `position`. rotary (2, L, rotary_dim): cos and sin (first half
    negated) per position. position (1,): the new token's cache index; pad (b,): left padding per row
    (positions before it are not attended; the rotary angle is position - pad). Query head i reads
    KV head i // (h/g).
    activation (approximate, x, y): also y = gelu(x, approximate) for x, y (b, n) with the row
    strides of proj and out (the MLP's half of a parallel-residual layer, in the same launch).
    counters: >= b·g int32 zeros, where the splits of each (row, KV head) count their finish (the
    last one merges them; it leaves the counter at 0 again, so one buffer serves every launch that
    runs after another on a stream). Default: new zeros.
    """
    b, g, max_len, dk = keys.shape
    h = num_heads
    r = h // g
    rot = rotary.shape[-1]
    out = proj.new_empty(b, h * dk) if out is None else out
    assert keys.stride(-1) == 1 and proj.stride(-1) == 1 and out.stride(-1) == 1 and rotary.is_contiguous()
    block_n, warps, stages = TILE or (FEW_HEADS_TILE if r <= 4 else MANY_HEADS_TILE)
    block_n = min(block_n, max(16, 16384 // (dk * keys.element_size())))  # K, V tiles fit shared memory
    splits = splits or num_splits(b, g, max_len, keys.device)
    part = lse = out  # unused when one split
    if splits > 1:
        part = torch.empty(b, h, splits, dk, dtype=torch.float32, device=proj.device)
        lse = torch.empty(b, h, splits, dtype=torch.float32, device=proj.device)
        counters = torch.zeros(b * g, dtype=torch.int32, device=proj.device) if counters is None else counters
        assert counters.dtype == torch.int32 and counters.numel() >= b * g
    act, act_in, act_out = activation or (None, out, out)
    if activation is not None:
        assert act_in.stride() == (proj.stride(0), 1) and act_out.stride() == (out.stride(0), 1)
    precision = "ieee" if keys.dtype == torch.float32 else "tf32"
    _decode_attention_kernel[(b, g, splits)](
        proj,
        keys,
        values,
        rotary,
        position,
        pad,
        out,
        part,
        lse,
        out if counters is None else counters,
        proj.stride(0),
        out.stride(0),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        max_len,
        h,
        g,
        r,
        2 * g if kv_first and owns_kv else 0,
        0 if kv_first else h,
        dk**-0.5 * math.log2(math.e),
        act_in,
        act_out,
        act_in.shape[1],
        DK=dk,
        ROT=rot,
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_N=block_n,
        NSPLIT=splits,
        OWNS_KV=owns_kv,
        PRECISION=precision,
        ACT=GELU_MODES[act],
        ACT_BLOCK=triton.next_power_of_2(triton.cdiv(act_in.shape[1], g * splits)),
        **_pdl_args(proj.device, "attention"),
        num_warps=warps,
        num_stages=stages,
    )
    return out
