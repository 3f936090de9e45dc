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

Engines: "mlkv-fast" (`megatron_mlkv.inference.generate.StaticDecoder`: static cache, CUDA graph, the triton
decode kernels where they run; each record's `attention` says which), and the baseline twice:
"transformers" (the family's class, `GPTNeoXForCausalLM` or `LlamaForCausalLM`, `generate` with its
default DynamicCache) and "transformers-static" (`cache_implementation="static"`: its static cache and,
on GPUs, its compiled decode step).

Every measurement is the second run of its exact shape (batch, context, new tokens): the first warms
up the engine (compilation, CUDA graph capture, library handles, the allocator) and is discarded,
its time kept as `warmup_s`. Prefill and decode are timed apart the same way for every engine: the
prefill forward alone, then decoding (for transformers: `generate`'s time less a prefill forward).
Ratios against transformers (`vs_transformers`) take the faster of its two engines at each batch.

Why one file of ~520 lines: the candidates, the engines and the batch search share the warm-up and
timing protocol above, and each is read against it (the tables and plots are `report.py`).
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

from ..config import MLKVConfig, preset
from ..conversion import paper_variants, target_config
from ..errors import BenchError
from ..hf import output_cache
from ..layout import KVLayout, LayoutError
from ..loading import read_config
from ..model import MLKVTransformer
from .generate import StaticDecoder, pad_mlp_
from .report import TRANSFORMERS


@dataclass
class Candidate:
    """One model to benchmark: its name, KV layout, engine and a loader (called once, lazily)."""

    name: str
    layout: KVLayout
    head_dim: int
    engine: str
    load: Callable[[], nn.Module]
    max_positions: int | None = None  # the model's max_position_embeddings: how long a cache may be


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def parse_layouts(
    spec: str, num_layers: int, num_heads: int, num_kv_heads: int | None = None
) -> list[tuple[str, int, int]]:
    """'base,mlkv-6,4:3' -> [(name, m, g)]: 'base' (the shape's own layout; 'mha' too for a multi-head
    one), the paper's variant names for this shape (`convert.paper_variants`), 'all' (the base and
    the variants) or an explicit 'm:g'."""
    g_b = num_kv_heads or num_heads
    known = {"base": (num_layers, g_b), **({"mha": (num_layers, num_heads)} if g_b == num_heads else {})}
    try:
        known.update({n: (m, g) for n, m, g in paper_variants(num_layers, num_heads, g_b)})
    except ValueError:
        pass
    out = []
    for item in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if item == "all":
            pairs = list(dict.fromkeys(known.values()))
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
    from ..loading import load_pretrained

    if not (Path(path) / "config.json").is_file():
        raise BenchError(f"--model {path}: no config.json; expected a folder written by launch/convert.py")
    cfg = read_config(path)[1]
    return Candidate(
        str(path),
        cfg.layout,
        cfg.head_dim,
        "mlkv-fast",
        lambda: pad_mlp_(load_pretrained(path, dtype).to(device).eval()),
        cfg.max_position_embeddings,
    )


def random_model(config: MLKVConfig, dtype: torch.dtype, device: torch.device) -> MLKVTransformer:
    """A randomly initialised model, built directly on `device`, MLP padded (`pad_mlp_`)."""
    with torch.device(device):
        return pad_mlp_(MLKVTransformer(config).to(dtype).eval())


def from_shape(shape: str, layouts: str, dtype: torch.dtype, device: torch.device) -> list[Candidate]:
    """Randomly initialised models of a preset shape (`config.preset`: Pythia, Llama-3.2-1B, SmolLM) in
    each layout (MLP widened as by conversion)."""
    base = preset(shape)
    out = []
    for name, m, g in parse_layouts(layouts, base.num_layers, base.num_heads, base.num_kv_heads):
        cfg = target_config(base, m, g)
        out.append(
            Candidate(
                f"{shape}:{name.lower()}",
                cfg.layout,
                cfg.head_dim,
                "mlkv-fast",
                lambda cfg=cfg: random_model(cfg, dtype, device),
                cfg.max_position_embeddings,
            )
        )
    return out


def transformers_baseline(
    dtype: torch.dtype,
    device: torch.device,
    hf_model: str | None = None,
    shape: str | None = None,
    base_folder: str | None = None,
) -> list[Candidate]:
    """transformers' own class of the family (`GPTNeoXForCausalLM`, `LlamaForCausalLM`, ...) from its
    folder, a preset shape (random weights), or a folder of ours without cross-layer sharing converted
    in memory: one candidate per engine of `TRANSFORMERS`."""
    from transformers import AutoModelForCausalLM

    from ..conversion import base_config, to_base_model

    if hf_model:
        cfg = MLKVConfig.from_hf(_read_hf_config(hf_model))
        load = lambda: AutoModelForCausalLM.from_pretrained(hf_model, dtype=dtype).to(device).eval()  # noqa: E731
        name = str(hf_model)
    elif shape:
        cfg = preset(shape)

        def load():
            with torch.device(device):
                return AutoModelForCausalLM.from_config(base_config(cfg)).to(dtype).eval()

        name = f"{shape}:base"
    elif base_folder:
        from ..loading import load_pretrained

        cfg = read_config(base_folder)[1]
        load = lambda: to_base_model(load_pretrained(base_folder, dtype).to(device))  # noqa: E731
        name = str(base_folder)
    else:
        raise BenchError(
            "--baseline-hf needs --hf-model DIR, --shape NAME, or a folder among --model that transformers' own "
            "class holds (MHA for GPT-NeoX; no cross-layer sharing for the Llama family)"
        )
    return [
        Candidate(name, cfg.layout, cfg.head_dim, engine, load, cfg.max_position_embeddings) for engine in TRANSFORMERS
    ]


def base_class_holds(config: MLKVConfig) -> bool:
    """Whether transformers' own class of the family holds a model of `config` (`to_base_model`)."""
    from ..conversion import plain_form

    return config.layout.name == "MHA" if config.family == "gpt_neox" else plain_form(config)


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
    from .report import format_summary, latest, summarize, write_report

    if candidates and not batch_sizes and max_batch is None and device.type != "cuda":
        raise BenchError("on CPU the maximum-batch search needs --max-batch (there is no out-of-memory signal)")
    if context < 1 or new_tokens < 1:
        raise BenchError(f"--context {context} and --new-tokens {new_tokens} must be at least 1")
    for cand in candidates:
        if cand.max_positions is not None and context + new_tokens > cand.max_positions:
            raise BenchError(
                f"--context {context} + --new-tokens {new_tokens} exceed the {cand.max_positions} positions of "
                f"{cand.name} (max_position_embeddings): lower --context"
            )
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
