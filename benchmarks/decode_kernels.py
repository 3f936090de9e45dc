"""The decode step with SDPA against the triton kernels (`megatron_mlkv.inference.kernels`), side by side on the
same prefilled cache: step time as a CUDA graph replay, its fraction of the bandwidth bound, kernels
per step, and the largest logit difference. Pythia-160M shape, random weights, bf16, context 2000.

python benchmarks/decode_kernels.py [--layouts mlkv-6,mha] [--batch-sizes 64 8] [--tune] [--out FILE.json]
"""

import argparse
import functools
import gc
import itertools
import json

import torch

from megatron_mlkv.config import preset
from megatron_mlkv.conversion import target_config
from megatron_mlkv.inference import kernels
from megatron_mlkv.inference.bench import copy_bandwidth, decode_bytes_per_step, parse_layouts, random_model
from megatron_mlkv.inference.generate import DECODE_ATTENTION, FoldedLayer, StaticDecoder, fused_projection

SHAPE = preset("pythia-160m")


def layout_models(layouts: str, device: torch.device):
    """(layout name, a random bf16 model of SHAPE in that layout, MLP padded), one at a time."""
    for name, m, g in parse_layouts(layouts, SHAPE.num_layers, SHAPE.num_heads):
        yield name, random_model(target_config(SHAPE, m, g), torch.bfloat16, device)


def measured_bandwidth(device: torch.device) -> float:
    """The device's copy bandwidth (bytes/s), printed with its name."""
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:,.0f} GB/s", flush=True)
    return bandwidth


def save(path: str | None, bandwidth: float, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bandwidth=bandwidth, rows=rows), f, indent=1)


CONTEXT = 2000


# the step's variants, each a step further: "sdpa" (the PyTorch path), the triton attention and norm
# kernels with each layer's four matrix products kept apart, then folded to two (cuBLAS), then those
# two as `kernels.linear` (the first also applies the MLP's GELU)
VARIANTS = ("sdpa", "triton-unfolded", "triton-cublas", "triton")
LINEAR_MAX_ROWS = kernels.LINEAR_MAX_ROWS


def use(decoder: StaticDecoder, variant: str) -> None:
    """Switch the decoder to one of VARIANTS and rewind it to the end of the prefill (same cache)."""
    decoder.fused, decoder.graphs = variant.startswith("triton"), {}
    decoder.attention = DECODE_ATTENTION[variant.split("-")[0]]
    kernels.LINEAR_MAX_ROWS = 0 if variant in ("triton-unfolded", "triton-cublas") else LINEAR_MAX_ROWS
    layers = decoder.model.layers
    decoder.folded = [FoldedLayer.of(b) if variant not in ("sdpa", "triton-unfolded") else None for b in layers]
    decoder.projections = [None if f else fused_projection(b.attention) for b, f in zip(layers, decoder.folded)]
    rewind(decoder)


def rewind(decoder: StaticDecoder) -> None:
    """Back to the end of the prefill: the next step rewrites the same cache position."""
    decoder.position.fill_(CONTEXT)
    decoder.token.zero_()
    decoder.length = CONTEXT
    decoder.bias[..., CONTEXT:] = float("-inf")


def step_ms(decoder: StaticDecoder, token: torch.Tensor, steps: int = 20) -> float:
    decoder.capture()
    for _ in range(3):
        decoder.step(token)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        decoder.step(token)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def replay_diff(decoder: StaticDecoder, expected: torch.Tensor, replays: int = 50) -> float:
    """Largest difference of the captured step's logits, replayed from the same state, to an eager
    step's (0 unless a kernel is nondeterministic or races)."""
    use(decoder, "triton")
    decoder.capture()
    worst = 0.0
    for _ in range(replays):
        rewind(decoder)
        decoder.graph.replay()
        worst = max(worst, (decoder.outputs[False].float() - expected).abs().max().item())
    return worst


def kernels_per_step(decoder: StaticDecoder, top: int = 0) -> int:
    """Kernels of one (eager) step; prints the `top` kernels by summed time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder._step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if top:
        print(f"   kernel time {sum(e.device_time for e in events) / 1e3:.3f} ms in {len(events)} kernels")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]:
            print(f"   {e.device_time_total / 1e3:7.3f} ms  x{e.count:<4d} {e.key[:100]}")
    return len(events)


def sweep(decoder: StaticDecoder, token: torch.Tensor, candidates: list, apply) -> tuple[dict, tuple[float, str]]:
    """The triton step's time (ms) after apply(c), for each candidate c; -> (times by str(c), (the
    best time, its str(c))). Whatever the last apply set stays set."""
    times = {}
    for value in candidates:
        apply(value)
        use(decoder, "triton")
        try:
            times[str(value)] = step_ms(decoder, token, steps=10)
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is reported
            times[str(value)] = repr(e)[:80]
    return times, min((v, k) for k, v in times.items() if isinstance(v, float))


def set_tile(cfg) -> None:
    kernels.TILE, kernels.PROGRAMS_PER_SM = cfg[:3], cfg[3]


def two_streams_ms(model, batch: int, steps: int = 20) -> float:
    """One graph that runs the steps of two half-batch decoders on two streams."""
    halves = [StaticDecoder(model, batch // 2, CONTEXT + 128, attention="triton") for _ in range(2)]
    for d in halves:
        d.prefill(torch.randint(0, 1000, (batch // 2, CONTEXT), device="cuda"))
    streams = [torch.cuda.Stream() for _ in halves]
    main_stream = torch.cuda.current_stream()

    def both():
        for d, s in zip(halves, streams):
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                d._step()
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)

    side = torch.cuda.Stream()
    side.wait_stream(main_stream)
    with torch.cuda.stream(side):
        both()
    main_stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        both()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", default="all")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64, 256, 1024])
    p.add_argument(
        "--tune", action="store_true", help="also time tiles (block, warps, stages, programs per SM) at b=64, 256"
    )
    p.add_argument(
        "--tune-linear",
        action="store_true",
        help="also time linear's tiles (rows, columns, K step, "
        "warps, stages, K splits) for its wide and deep shapes, one after the other, at b <= 64",
    )
    p.add_argument("--profile", type=int, default=0, help="print the top kernels of the triton step")
    p.add_argument("--two-streams", action="store_true", help="also time two half batches on two streams")
    p.add_argument("--out")
    args = p.parse_args()
    device = torch.device("cuda")
    bandwidth = measured_bandwidth(device)
    rows = []
    for name, model in layout_models(args.layouts, device):
        for batch in args.batch_sizes:
            try:
                decoder = StaticDecoder(model, batch, CONTEXT + 128, attention="sdpa")
                ids = torch.randint(0, SHAPE.vocab_size, (batch, CONTEXT), device=device)
                token = decoder.prefill(ids).argmax(-1)
            except torch.OutOfMemoryError:
                print(f"{name} b={batch}: out of memory", flush=True)
                decoder = ids = None
                gc.collect()
                torch.cuda.empty_cache()
                break
            bound_ms = (
                decode_bytes_per_step(model, model.config.layout, model.config.head_dim, batch, CONTEXT + 1)
                / bandwidth
                * 1e3
            )
            logits = {}
            row = dict(layout=name, batch=batch, bound_ms=bound_ms)
            for variant in VARIANTS:
                use(decoder, variant)
                logits[variant] = decoder._step().float()
                use(decoder, variant)
                row[f"{variant}_kernels"] = kernels_per_step(decoder, args.profile if variant == "triton" else 0)
                use(decoder, variant)
                row[f"{variant}_ms"] = step_ms(decoder, token)
                if variant != "triton":
                    print(
                        f"   {variant}: {row[f'{variant}_ms']:.3f} ms ({bound_ms / row[f'{variant}_ms']:.0%}, "
                        f"{row[f'{variant}_kernels']} kernels)",
                        flush=True,
                    )
            row["max_logit_diff"] = (logits["sdpa"] - logits["triton"]).abs().max().item()
            row["replay_max_diff"] = replay_diff(decoder, logits["triton"])
            row["logit_scale"] = logits["sdpa"].abs().max().item()
            if args.two_streams:
                row["two_streams_ms"] = two_streams_ms(model, batch)
                print(
                    f"   two streams of {batch // 2} rows: {row['two_streams_ms']:.3f} ms "
                    f"({bound_ms / row['two_streams_ms']:.0%})",
                    flush=True,
                )
            if args.tune and batch in (64, 256):
                default = kernels.PROGRAMS_PER_SM
                grid = list(itertools.product((32, 64), (2, 4), (2, 3, 4), (1, 2, 4)))
                row["tune"], row["tune_best"] = sweep(decoder, token, grid, set_tile)
                kernels.TILE, kernels.PROGRAMS_PER_SM = None, default
            if args.tune_linear and batch <= LINEAR_MAX_ROWS:  # the wide shape's best is kept for the deep sweep
                for key, setting, grid in (
                    (
                        "tune_wide",
                        "LINEAR_WIDE",
                        [(64, *c, 1) for c in itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3, 4))],
                    ),
                    (
                        "tune_deep",
                        "LINEAR_DEEP",
                        [(64, *c) for c in itertools.product((32, 64), (64, 128), (4,), (2, 3), (6, 8, 12))],
                    ),
                ):
                    times, (ms, best) = sweep(decoder, token, grid, functools.partial(setattr, kernels, setting))
                    setattr(kernels, setting, grid[[str(c) for c in grid].index(best)])
                    row[key] = dict(best=best, best_ms=ms, times=times)
                print(f"   linear tiles: wide {row['tune_wide']['best']}, deep {row['tune_deep']['best']}", flush=True)
            rows.append(row)
            print(
                f"{name:8s} b={batch:5d}  bound {bound_ms:6.3f} ms | sdpa {row['sdpa_ms']:6.3f} ms "
                f"({bound_ms / row['sdpa_ms']:4.0%}, {row['sdpa_kernels']} kernels) | "
                f"triton {row['triton_ms']:6.3f} ms "
                f"({bound_ms / row['triton_ms']:4.0%}, {row['triton_kernels']} kernels) | logits diff "
                f"{row['max_logit_diff']:.3g} of {row['logit_scale']:.3g}, replays {row['replay_max_diff']:.3g}"
                + (
                    f" | tuned best {row['tune_best'][0]:.3f} ms at {row['tune_best'][1]}" if "tune_best" in row else ""
                ),
                flush=True,
            )
            del decoder, ids, token, logits
            gc.collect()
            torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    save(args.out, bandwidth, rows)


if __name__ == "__main__":
    main()
