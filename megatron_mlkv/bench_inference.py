"""Inference benchmark: KV cache bytes, peak memory, maximum batch and decode tokens/s per layout.

The paper's protocol: a KV cache pre-filled with `context` tokens (random ids: no tokenizer needed),
then `new_tokens` one-token decode steps; tokens/s = batch · new_tokens / decode time (prefill not
included; it is reported as `prefill_s`). Without explicit batch sizes the batch doubles until out of
memory (then two bisection steps refine the maximum), bounded by `max_batch`.

Each record also carries the memory-bandwidth bound of the decode step: the bytes a step must read
(every weight once, the input embedding only for the batch's rows; every layer reads its owner's
K/V, `l · 2 · b · n · g · d_k` elements at the mean length n) over the device-to-device copy
bandwidth measured in the same run (bytes read plus bytes written). `fraction_of_bound` is tokens/s
over that bound.

Engines: "mlkv-fast" (`megatron_mlkv.generate.StaticDecoder`: static cache, CUDA graph, the triton
decode kernels where they run; each record's `attention` says which), and the baseline twice:
"transformers" (`GPTNeoXForCausalLM.generate` with its default DynamicCache) and "transformers-static"
(`cache_implementation="static"`: its static cache and, on GPUs, its compiled decode step).

Every measurement is the second run of its exact shape (batch, context, new tokens): the first warms
up the engine (compilation, CUDA graph capture, library handles, the allocator) and is discarded,
its time kept as `warmup_s`. Prefill and decode are timed apart the same way for every engine: the
prefill forward alone, then decoding (for transformers: `generate`'s time less a prefill forward).
Ratios against transformers (`vs_transformers`) take the faster of its two engines at each batch.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import MLKVConfig, preset
from .configuration_mlkv import MLKVGPTNeoXConfig
from .convert import paper_variants, target_config
from .generate import StaticDecoder, pad_mlp_
from .hf import output_cache
from .layout import KVLayout, LayoutError
from .model import MLKVTransformer


class BenchError(ValueError):
    """A benchmark request that cannot run; the message names the option."""


@dataclass
class Candidate:
    """One model to benchmark: its name, KV layout, engine and a loader (called once, lazily)."""

    name: str
    layout: KVLayout
    head_dim: int
    engine: str
    load: Callable[[], nn.Module]


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def parse_layouts(spec: str, num_layers: int, num_heads: int) -> list[tuple[str, int, int]]:
    """'mha,mlkv-6,4:3' -> [(name, m, g)]: 'mha', the paper's variant names for this shape
    (`convert.paper_variants`), 'all' (MHA and the eight variants) or an explicit 'm:g'."""
    try:
        known = {"mha": (num_layers, num_heads), **{n: (m, g) for n, m, g in paper_variants(num_layers, num_heads)}}
    except ValueError:
        known = {"mha": (num_layers, num_heads)}
    out = []
    for item in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if item == "all":
            pairs = list(known.values())
        elif item in known:
            pairs = [known[item]]
        elif item.count(":") == 1 and all(p.isdigit() for p in item.split(":")):
            pairs = [tuple(int(p) for p in item.split(":"))]
        else:
            raise BenchError(f"--layouts: '{item}' is not a layout; allowed: {', '.join(known)}, all, or m:g")
        for m, g in pairs:
            try:
                layout = KVLayout.uniform(num_layers, num_heads, m, g)
            except LayoutError as e:
                raise BenchError(f"--layouts: '{item}': {e}") from None
            out.append((layout.name, m, g))
    return out


def from_folder(path: str, dtype: torch.dtype, device: torch.device) -> Candidate:
    """An exported MLKV folder (`megatron_mlkv.hf.export_pretrained`), MLP padded (`pad_mlp_`)."""
    from .hf import load_pretrained

    if not (Path(path) / "config.json").is_file():
        raise BenchError(f"--model {path}: no config.json; expected a folder written by launch/convert.py")
    cfg = MLKVGPTNeoXConfig.from_pretrained(path).model_config()
    return Candidate(
        str(path),
        cfg.layout,
        cfg.head_dim,
        "mlkv-fast",
        lambda: pad_mlp_(load_pretrained(path, dtype).to(device).eval()),
    )


def random_model(config: MLKVConfig, dtype: torch.dtype, device: torch.device) -> MLKVTransformer:
    """A randomly initialised model, built directly on `device`, MLP padded (`pad_mlp_`)."""
    with torch.device(device):
        return pad_mlp_(MLKVTransformer(config).to(dtype).eval())


def from_shape(shape: str, layouts: str, dtype: torch.dtype, device: torch.device) -> list[Candidate]:
    """Randomly initialised models of a Pythia shape in each layout (MLP widened as by conversion)."""
    base = preset(shape)
    out = []
    for name, m, g in parse_layouts(layouts, base.num_layers, base.num_heads):
        cfg = target_config(base, m, g)
        out.append(
            Candidate(
                f"{shape}:{name.lower()}",
                cfg.layout,
                cfg.head_dim,
                "mlkv-fast",
                lambda cfg=cfg: random_model(cfg, dtype, device),
            )
        )
    return out


def gpt_neox_config(config: MLKVConfig):
    """The transformers `GPTNeoXConfig` of an MHA `MLKVConfig`."""
    from transformers import GPTNeoXConfig

    kwargs = config.to_hf_kwargs()
    kwargs.pop("num_kv_heads"), kwargs.pop("kv_owner")
    return GPTNeoXConfig(**kwargs)


def to_gpt_neox(model: MLKVTransformer):
    """An MHA `MLKVTransformer` as transformers' `GPTNeoXForCausalLM` (same weights, same logits)."""
    from transformers import GPTNeoXForCausalLM

    cfg = model.config
    if cfg.layout.kv_heads_total() != cfg.num_layers * cfg.num_heads:
        raise BenchError(f"only an MHA model maps onto GPTNeoXForCausalLM; this one is {cfg.layout.name}")
    h = cfg.num_heads
    sd = {}
    for name, t in model.state_dict().items():
        if name.startswith("embed_out"):
            sd[name] = t
            continue
        parts = name.split(".")
        if len(parts) > 3 and parts[2] == "attention" and parts[3] in ("query", "key", "value"):
            if parts[3] == "query":  # fuse q, k, v per head as GPT-NeoX lays them out: [h, 3, d_k]
                prefix, kind = ".".join(parts[:3]), parts[4]
                q, k, v = (model.state_dict()[f"{prefix}.{p}.{kind}"] for p in ("query", "key", "value"))
                fused = torch.stack([x.reshape(h, -1, *x.shape[1:]) for x in (q, k, v)], dim=1)
                sd[f"gpt_neox.{prefix}.query_key_value.{kind}"] = fused.reshape(-1, *q.shape[1:])
            continue
        sd[f"gpt_neox.{name}"] = t
    param = next(model.parameters())
    with torch.device(param.device):
        ref = GPTNeoXForCausalLM(gpt_neox_config(cfg)).to(param.dtype)
    head = next(n for n, p in ref.named_parameters(remove_duplicate=False) if p is ref.get_output_embeddings().weight)
    sd[head] = sd.pop("embed_out.weight")  # `embed_out` or `lm_head`, by transformers version
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


TRANSFORMERS = {"transformers": "dynamic", "transformers-static": "static"}  # engine: cache_implementation


def transformers_baseline(
    dtype: torch.dtype,
    device: torch.device,
    hf_model: str | None = None,
    shape: str | None = None,
    mha_folder: str | None = None,
) -> list[Candidate]:
    """transformers' GPTNeoXForCausalLM from a GPT-NeoX folder, a Pythia shape (random weights), or
    an MHA folder of ours converted in memory: one candidate per engine of `TRANSFORMERS`."""
    from transformers import GPTNeoXForCausalLM

    if hf_model:
        cfg = MLKVConfig.from_hf(_read_hf_config(hf_model))
        load = lambda: GPTNeoXForCausalLM.from_pretrained(hf_model, dtype=dtype).to(device).eval()  # noqa: E731
        name = str(hf_model)
    elif shape:
        cfg = preset(shape)

        def load():
            with torch.device(device):
                return GPTNeoXForCausalLM(gpt_neox_config(cfg)).to(dtype).eval()

        name = f"{shape}:mha"
    elif mha_folder:
        from .hf import load_pretrained

        cfg = MLKVGPTNeoXConfig.from_pretrained(mha_folder).model_config()
        load = lambda: to_gpt_neox(load_pretrained(mha_folder, dtype).to(device))  # noqa: E731
        name = str(mha_folder)
    else:
        raise BenchError("--baseline-hf needs --hf-model DIR, --shape NAME, or an MHA folder among --model")
    return [Candidate(name, cfg.layout, cfg.head_dim, engine, load) for engine in TRANSFORMERS]


def _read_hf_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**25)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.nbytes * repeats / (time.perf_counter() - start)


def _embeddings(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(model, MLKVTransformer):
        return model.embed_in.weight, model.embed_out.weight
    return model.get_input_embeddings().weight, model.get_output_embeddings().weight


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (shared tensors counted once)."""
    return sum(p.nbytes for p in {p.data_ptr(): p for p in model.parameters()}.values())


def decode_bytes_per_step(model: nn.Module, layout: KVLayout, head_dim: int, batch: int, mean_len: float) -> int:
    """Bytes one decode step must read: weights once (the input embedding only for `batch` rows,
    unless tied to the output head) and, per layer, its owner's K/V of `mean_len` tokens."""
    emb_in, emb_out = _embeddings(model)
    weights = weight_bytes(model)
    if emb_in.data_ptr() != emb_out.data_ptr():
        weights -= emb_in.nbytes - batch * emb_in[0].nbytes
    kv = layout.num_layers * 2 * batch * mean_len * layout.num_kv_heads * head_dim * emb_in.element_size()
    return int(weights + kv)


def run_fast(
    model: MLKVTransformer,
    batch: int,
    context: int,
    new_tokens: int,
    device: torch.device,
    prefill_chunk_tokens: int = 32768,
) -> dict:
    """Prefill `context` random tokens per row, then `new_tokens` greedy steps with `StaticDecoder`."""
    decoder = StaticDecoder(model, batch, context + new_tokens)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    synchronize(device)
    start = time.perf_counter()
    token = decoder.prefill(ids, chunk_tokens=prefill_chunk_tokens).argmax(-1)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    decoder.capture(greedy=True)  # one-time setup (CUDA graph), outside the timed loop
    synchronize(device)
    start = time.perf_counter()
    decoder.greedy(token, new_tokens)
    synchronize(device)
    return dict(
        kv_cache_bytes=decoder.cache.nbytes,
        prefill_s=prefill_s,
        decode_s=time.perf_counter() - start,
        attention=decoder.attention_name,
    )


def run_transformers(
    model: nn.Module, batch: int, context: int, new_tokens: int, device: torch.device, cache: str = "dynamic"
) -> dict:
    """transformers' `generate` (greedy) with its default DynamicCache (`cache="dynamic"`) or its
    static cache and compiled decoding (`"static"`); decode time = generate's time minus a separately
    timed prefill forward."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    mask = torch.ones_like(ids)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    synchronize(device)
    prefill_s = time.perf_counter() - start
    del out
    start = time.perf_counter()
    static = {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens + 1,
        min_new_tokens=new_tokens + 1,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        **static,
    )
    synchronize(device)
    total = time.perf_counter() - start
    cache = output_cache(out)
    kv = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
    return dict(
        kv_cache_bytes=kv,
        prefill_s=prefill_s,
        decode_s=max(total - prefill_s, 1e-9),
        attention=getattr(model.config, "_attn_implementation", None),
        cache=type(cache).__name__,
    )


def _is_oom(e: BaseException | None) -> bool:
    """An out-of-memory error, also when it surfaces as the cause of another (a failed graph capture)."""
    if e is None:
        return False
    return (
        isinstance(e, torch.OutOfMemoryError)
        or (isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "ALLOC_FAILED")))
        or _is_oom(e.__cause__ or e.__context__)
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(run: Callable[[], dict], device: torch.device) -> dict:
    """Run one benchmark; adds `peak_memory_bytes` (CUDA: above what was allocated before, i.e. the
    weights; CPU: None) and `oom`."""
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    try:
        result = run()
    except Exception as e:  # noqa: BLE001 - only out-of-memory is a result; the rest re-raises
        if not _is_oom(e):
            raise
        result = None
    oom = result is None
    result = result or {}
    result["oom"] = oom
    result["peak_memory_bytes"] = (
        torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" and not oom else None
    )
    _free(device)
    return result


def search_batches(attempt: Callable[[int], dict], max_batch: int, refine: int = 2) -> list[dict]:
    """Double the batch from 1 until `attempt(b)["oom"]` or `max_batch` (tried last if not a power of
    two), then bisect `refine` times between the largest fit and the first OOM."""
    records, fit, oom = [], 0, None
    batch = 1
    while batch <= max_batch and oom is None:
        records.append(attempt(batch))
        fit, oom = (batch, None) if not records[-1]["oom"] else (fit, batch)
        batch = batch * 2 if batch * 2 <= max_batch or batch == max_batch else max_batch
    for _ in range(refine if oom is not None else 0):
        mid = (fit + oom) // 2
        if mid in (fit, oom):
            break
        records.append(attempt(mid))
        fit, oom = (mid, oom) if not records[-1]["oom"] else (fit, mid)
    return records


def bench_candidate(
    cand: Candidate,
    context: int,
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    bandwidth: float,
    batch_sizes: list[int] | None = None,
    max_batch: int | None = None,
    on_record: Callable[[dict], None] = lambda r: None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """All measurements of one model: the given batch sizes, or the search for its maximum."""
    model = cand.load()
    if cand.engine == "mlkv-fast":
        run = run_fast
    else:

        def run(model, batch, context, new_tokens, device):
            return run_transformers(model, batch, context, new_tokens, device, TRANSFORMERS[cand.engine])

    weights = weight_bytes(model)
    size = torch.tensor([], dtype=dtype).element_size()
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def attempt(batch: int) -> dict:
        start = time.perf_counter()
        warmup = measure(lambda: run(model, batch, context, new_tokens, device), device)  # same shape, discarded
        warmup_s = time.perf_counter() - start
        result = warmup if warmup["oom"] else measure(lambda: run(model, batch, context, new_tokens, device), device)
        record = dict(
            model=cand.name,
            layout=cand.layout.name,
            engine=cand.engine,
            kv_heads_total=cand.layout.kv_heads_total(),
            num_layers=cand.layout.num_layers,
            kv_layers=cand.layout.kv_layers,
            num_kv_heads=cand.layout.num_kv_heads,
            head_dim=cand.head_dim,
            dtype=str(dtype).removeprefix("torch."),
            device=device_name,
            batch_size=batch,
            context=context,
            new_tokens=new_tokens,
            kv_cache_bytes=result.get(
                "kv_cache_bytes", cand.layout.cache_elements(batch, context + new_tokens, cand.head_dim) * size
            ),
            peak_memory_bytes=result["peak_memory_bytes"],
            weights_bytes=weights,
            device_memory_bytes=memory,
            oom=result["oom"],
            tokens_per_s=None,
            prefill_s=result.get("prefill_s"),
            decode_s=result.get("decode_s"),
            copy_bandwidth_bytes_per_s=bandwidth,
            attention=result.get("attention"),
            cache=result.get("cache", "StaticDecoder"),
            warmed_up=not result["oom"],
            warmup_s=warmup_s,
        )
        step_bytes = decode_bytes_per_step(model, cand.layout, cand.head_dim, batch, context + (new_tokens + 1) / 2)
        bound = batch * bandwidth / step_bytes
        record.update(bytes_per_step=step_bytes, bandwidth_bound_tokens_per_s=bound, fraction_of_bound=None)
        if not record["oom"]:
            record["tokens_per_s"] = batch * new_tokens / record["decode_s"]
            record["fraction_of_bound"] = record["tokens_per_s"] / bound
        log(_progress(record, time.perf_counter() - start))
        on_record(record)
        return record

    try:
        if batch_sizes:
            return [attempt(b) for b in batch_sizes]
        return search_batches(attempt, max_batch)
    finally:
        model = None  # the weights go before the next candidate loads
        _free(device)


def _progress(r: dict, seconds: float) -> str:
    head = f"{r['model']} [{r['engine']}] b={r['batch_size']}:"
    if r["oom"]:
        return f"{head} out of memory ({seconds:.1f} s)"
    peak = "" if r["peak_memory_bytes"] is None else f", peak {r['peak_memory_bytes'] / 2**30:.2f} GiB"
    return (
        f"{head} {r['tokens_per_s']:,.0f} tokens/s ({r['fraction_of_bound']:.0%} of bound), KV "
        f"{r['kv_cache_bytes'] / 2**30:.3f} GiB{peak}, prefill {r['prefill_s']:.2f} s ({seconds:.1f} s)"
    )


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def _series(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out = {}
    for r in records:
        out.setdefault((r["model"], r["engine"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["batch_size"]) for k, v in out.items()}


def _label(model: str, engine: str, layout: str) -> str:
    """'MLKV-6', 'MHA (transformers)', or 'MLKV-6: <folder>' for a folder."""
    name = layout if engine == "mlkv-fast" else f"{layout} ({engine})"
    return name if ":" in model else f"{name}: {Path(model).name}"


def transformers_best(records: list[dict]) -> dict[int, float]:
    """{batch: tokens/s of the faster transformers engine at that batch} over the baseline's records."""
    best = {}
    for r in records:
        if r["engine"] in TRANSFORMERS and not r["oom"]:
            best[r["batch_size"]] = max(best.get(r["batch_size"], 0.0), r["tokens_per_s"])
    return best


def summarize(records: list[dict]) -> list[dict]:
    """Per model and engine: maximum batch that fit, first OOM, tokens/s at batch 8 and at the maximum,
    and against transformers (the faster of its engines): at batch 8, and best against best."""
    baseline = transformers_best(records)
    rows = []
    for (model, engine), rs in _series(records).items():
        fits = [r for r in rs if not r["oom"]]
        ooms = [r["batch_size"] for r in rs if r["oom"]]
        best = max(fits, key=lambda r: r["batch_size"]) if fits else None
        at8 = next((r for r in fits if r["batch_size"] == 8), None)
        rows.append(
            dict(
                model=model,
                engine=engine,
                layout=rs[0]["layout"],
                kv_heads_total=rs[0]["kv_heads_total"],
                max_batch=best and best["batch_size"],
                first_oom=min(ooms) if ooms else None,
                tokens_per_s_b8=at8 and at8["tokens_per_s"],
                fraction_b8=at8 and at8["fraction_of_bound"],
                tokens_per_s_max=best and best["tokens_per_s"],
                fraction_max=best and best["fraction_of_bound"],
                peak_gib_max=best and best["peak_memory_bytes"] and best["peak_memory_bytes"] / 2**30,
                best_tokens_per_s=max((r["tokens_per_s"] for r in fits), default=None),
            )
        )
        row = rows[-1]
        ours = engine not in TRANSFORMERS
        row["vs_transformers_b8"] = (at8["tokens_per_s"] / baseline[8]) if ours and at8 and baseline.get(8) else None
        row["vs_transformers_best"] = (
            row["best_tokens_per_s"] / max(baseline.values())
            if ours and baseline and row["best_tokens_per_s"]
            else None
        )
    return rows


def format_summary(rows: list[dict]) -> str:
    """`summarize` rows as a markdown table."""

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [
        "| model | engine | KV heads | max batch | first OOM | tokens/s b=8 (of bound) | "
        "tokens/s at max (of bound) | best tokens/s | peak GiB at max | x transformers b=8 | "
        "x transformers, best |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_label(r['model'], r['engine'], r['layout'])} | {r['engine']} | {r['kv_heads_total']} | "
            f"{num(r['max_batch'], 'd')} | {num(r['first_oom'], 'd')} | "
            f"{num(r['tokens_per_s_b8'], ',.0f')} ({num(r['fraction_b8'], '.0%')}) | "
            f"{num(r['tokens_per_s_max'], ',.0f')} ({num(r['fraction_max'], '.0%')}) | "
            f"{num(r['best_tokens_per_s'], ',.0f')} | {num(r['peak_gib_max'], '.2f')} | "
            f"{num(r['vs_transformers_b8'], '.2f')} | {num(r['vs_transformers_best'], '.2f')} |"
        )
    return "\n".join(lines)


MARKERS = "os^vDP*<>hX"  # series that overlap (equal KV budgets) stay distinguishable


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(records: list[dict], path: Path) -> None:
    """Memory vs batch size (the paper's Figure 3): peak memory above the weights (the KV cache alone
    where no peak was measured, on CPU) with each model's first OOM marked x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    capacity = next((r["device_memory_bytes"] for r in records if r.get("device_memory_bytes")), None)
    for i, ((model, engine), rs) in enumerate(_series(records).items()):
        fits = [r for r in rs if not r["oom"]]
        label = _label(model, engine, rs[0]["layout"])
        style = dict(marker=MARKERS[i % len(MARKERS)], ms=4, ls="-" if engine == "mlkv-fast" else "--")
        if fits and fits[0]["peak_memory_bytes"] is not None:
            (line,) = ax.plot(
                [r["batch_size"] for r in fits], [r["peak_memory_bytes"] / 2**30 for r in fits], label=label, **style
            )
        else:
            (line,) = ax.plot(
                [r["batch_size"] for r in fits],
                [r["kv_cache_bytes"] / 2**30 for r in fits],
                label=f"{label} (KV cache)",
                **style,
            )
        ooms = [r for r in rs if r["oom"]]
        if ooms:
            first = min(ooms, key=lambda r: r["batch_size"])
            y = capacity / 2**30 if capacity else first["kv_cache_bytes"] / 2**30
            ax.plot([first["batch_size"]], [y], "x", color=line.get_color(), ms=10, mew=2)
    if capacity:
        ax.axhline(capacity / 2**30, color="gray", lw=0.8, ls="--")
        ax.text(
            0.01,
            capacity / 2**30,
            "device memory (x: out of memory)",
            va="bottom",
            fontsize=8,
            color="gray",
            transform=ax.get_yaxis_transform(),
        )  # x in axes fractions, y in GiB
    ctx = records[0]
    ax.set(
        xscale="log",
        xlabel="batch size",
        ylabel="GiB",
        title=f"Memory above weights, context {ctx['context']} + {ctx['new_tokens']} tokens ({ctx['dtype']})",
    )
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(records: list[dict], path: Path) -> None:
    """Decode tokens/s vs batch size (solid) with each model's bandwidth bound (dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, ((model, engine), rs) in enumerate(_series(records).items()):
        fits = [r for r in rs if not r["oom"]]
        if not fits:
            continue
        b = [r["batch_size"] for r in fits]
        (line,) = ax.plot(
            b,
            [r["tokens_per_s"] for r in fits],
            "-" if engine == "mlkv-fast" else "--",
            marker=MARKERS[i % len(MARKERS)],
            ms=4,
            label=_label(model, engine, rs[0]["layout"]),
        )
        ax.plot(b, [r["bandwidth_bound_tokens_per_s"] for r in fits], ":", color=line.get_color(), lw=0.8)
    ctx = records[0]
    ax.set_xscale("log", base=2)
    ax.set(
        yscale="log",
        xlabel="batch size",
        ylabel="tokens/s",
        title=f"Decode throughput, context {ctx['context']}, {ctx['new_tokens']} new tokens (dotted: bandwidth bound)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_eval(path: str | Path) -> dict:
    """An evaluation JSON (lm-eval's `results` mapping plus `layout`) -> layout name, per-task and
    mean accuracy (`acc,none`, or `acc`)."""
    data = json.loads(Path(path).read_text())
    if "results" not in data or "layout" not in data:
        raise BenchError(f"--eval-json {path}: needs a 'results' mapping and a 'layout'")
    layout = data["layout"]
    name = layout.get("name") if isinstance(layout, dict) else str(layout)
    acc = {
        task: float(m.get("acc,none", m.get("acc")))
        for task, m in data["results"].items()
        if isinstance(m, dict) and m.get("acc,none", m.get("acc")) is not None
    }
    if not acc:
        raise BenchError(f"--eval-json {path}: no task in 'results' has an 'acc' metric")
    heads = layout.get("kv_heads_total") if isinstance(layout, dict) else None
    return dict(path=str(path), layout=name, kv_heads_total=heads, accuracy=acc, mean=sum(acc.values()) / len(acc))


def plot_accuracy(records: list[dict], evals: list[dict], path: Path) -> list[dict]:
    """Mean accuracy vs KV cache bytes per sequence (context + new tokens); returns the plotted points.

    A layout's memory comes from the records of the same layout name, or else from the evaluation
    file's `kv_heads_total` with the records' head size and dtype."""
    plt = _pyplot()
    per_seq = {r["layout"].upper(): r["kv_cache_bytes"] / r["batch_size"] for r in records}
    ref = records[0]
    size = (
        ref["kv_cache_bytes"]
        / ref["batch_size"]
        / (2 * (ref["context"] + ref["new_tokens"]) * ref["kv_heads_total"] * ref["head_dim"])
    )
    points = []
    for e in evals:
        mem = per_seq.get(str(e["layout"]).upper())
        if mem is None and e["kv_heads_total"]:
            mem = 2 * (ref["context"] + ref["new_tokens"]) * e["kv_heads_total"] * ref["head_dim"] * size
        if mem is not None:
            points.append(
                dict(
                    layout=e["layout"],
                    kv_bytes_per_sequence=mem,
                    mean_accuracy=e["mean"],
                    accuracy=e["accuracy"],
                    path=e["path"],
                )
            )
    fig, ax = plt.subplots(figsize=(7, 5))
    for p in points:
        ax.plot(p["kv_bytes_per_sequence"] / 2**20, p["mean_accuracy"], "o")
        ax.annotate(
            p["layout"],
            (p["kv_bytes_per_sequence"] / 2**20, p["mean_accuracy"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xscale("log", base=2)
    ax.set(
        xlabel=f"KV cache per sequence of {ref['context'] + ref['new_tokens']} tokens (MiB)",
        ylabel="mean accuracy",
        title="Accuracy vs KV cache memory",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return points


def write_report(records: list[dict], out: Path, eval_files: list[str] = ()) -> list[Path]:
    """results.json, summary.md and the plots (memory.png, throughput.png, accuracy.png with evals)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "summary.md"]
    written[0].write_text(json.dumps(records, indent=1) + "\n")
    written[1].write_text(format_summary(summarize(records)) + "\n")
    if records:
        plot_memory(records, out / "memory.png")
        plot_throughput(records, out / "throughput.png")
        written += [out / "memory.png", out / "throughput.png"]
    if eval_files and records:
        points = plot_accuracy(records, [read_eval(f) for f in eval_files], out / "accuracy.png")
        (out / "accuracy.json").write_text(json.dumps(points, indent=1) + "\n")
        written += [out / "accuracy.png", out / "accuracy.json"]
    return written


def latest(records: list[dict]) -> list[dict]:
    """One record per model, engine, context and batch size: a later record (a re-measured row)
    replaces an earlier one and takes its place at the end."""
    by_key = {}
    for r in records:
        key = (r["model"], r["engine"], r["context"], r["batch_size"])
        by_key.pop(key, None)
        by_key[key] = r
    return list(by_key.values())


def run_benchmark(
    candidates: list[Candidate],
    out: Path,
    context: int,
    new_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    batch_sizes: list[int] | None = None,
    max_batch: int | None = None,
    eval_files: list[str] = (),
    previous: list[dict] = (),
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Benchmark every candidate; results.json is rewritten after each record (a killed run keeps what
    it measured), the summary and plots after each model."""
    if candidates and not batch_sizes and max_batch is None and device.type != "cuda":
        raise BenchError("on CPU the maximum-batch search needs --max-batch (there is no out-of-memory signal)")
    if context < 1 or new_tokens < 1:
        raise BenchError(f"--context {context} and --new-tokens {new_tokens} must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    records = latest(list(previous))

    def keep(record):
        records[:] = latest(records + [record])
        (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")

    bandwidth = copy_bandwidth(device) if candidates else None
    if bandwidth:
        log(f"device {device}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s (read + write)")
    for cand in candidates:
        bench_candidate(
            cand,
            context,
            new_tokens,
            device,
            dtype,
            bandwidth,
            batch_sizes,
            max_batch or 2**24,
            on_record=keep,
            log=log,
        )
        write_report(records, out, eval_files)
    write_report(records, out, eval_files)
    log(format_summary(summarize(records)))
    return records
