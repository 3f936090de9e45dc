"""Greedy decoding with the choice inside the captured step (`StaticDecoder.greedy`) against a step
loop that takes the argmax outside the graph (`step(token).argmax(-1)`), on the same prefilled
cache: ms per token, fraction of the bandwidth bound, and whether both give the same tokens. With
--sweep, the greedy loop's time for other tiles of `kernels.linear` (LINEAR_WIDE, LINEAR_DEEP,
LINEAR_HEAD). Pythia-160M shape, random weights, bf16, context 2000.

PYTHONPATH=. python benchmarks/results/inference/greedy_step.py [--layouts mlkv-6,mqa-12] [--sweep] [--out FILE.json]
"""
import argparse
import time

import torch

from megatron_mlkv import kernels
from megatron_mlkv.bench_inference import decode_bytes_per_step
from megatron_mlkv.generate import StaticDecoder

from common import SHAPE, layout_models, measured_bandwidth, save

CONTEXT, STEPS = 2000, 48
SWEEP = {
    "LINEAR_WIDE": [(64, 64, 128, 8, 3, 1), (64, 64, 128, 8, 5, 1), (64, 32, 128, 4, 4, 1), (64, 64, 64, 4, 4, 1),
                    (64, 128, 64, 8, 4, 1)],
    "LINEAR_DEEP": [(64, 32, 128, 4, 4, 4), (64, 32, 256, 4, 3, 4), (64, 64, 128, 4, 4, 4), (64, 32, 128, 8, 5, 4),
                    (64, 32, 128, 4, 5, 3), (64, 32, 128, 4, 5, 6)],
    "LINEAR_HEAD": [(64, 128, 128, 8, 4, 1), (64, 64, 128, 4, 3, 1)],
}


def loop_ms(decoder: StaticDecoder, token: torch.Tensor, greedy: bool) -> float:
    """ms per token of STEPS steps from the end of the prefill (the graphs captured already)."""
    decoder.position.fill_(CONTEXT)
    decoder.length = CONTEXT
    torch.cuda.synchronize()
    start = time.perf_counter()
    if greedy:
        decoder.greedy(token, STEPS)
    else:
        for _ in range(STEPS):
            token = decoder.step(token).argmax(-1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / STEPS * 1e3


def best_ms(decoder: StaticDecoder, token: torch.Tensor, greedy: bool, repeats: int = 3) -> float:
    decoder.graphs = {}  # recaptured with the current tiles
    return min(loop_ms(decoder, token, greedy) for _ in range(repeats))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", default="mlkv-6,mqa-12")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--out")
    args = p.parse_args()
    device = torch.device("cuda")
    bandwidth = measured_bandwidth(device)
    rows = []
    for name, model in layout_models(args.layouts, device):
        for batch in args.batch_sizes:
            decoder = StaticDecoder(model, batch, CONTEXT + STEPS + 1)
            token = decoder.prefill(torch.randint(0, SHAPE.vocab_size, (batch, CONTEXT), device=device)).argmax(-1)
            bound = decode_bytes_per_step(model, model.config.layout, model.config.head_dim, batch,
                                          CONTEXT + STEPS / 2) / bandwidth * 1e3
            row = dict(layout=name, batch=batch, bound_ms=bound, step_argmax_ms=best_ms(decoder, token, False),
                       greedy_ms=best_ms(decoder, token, True))
            stepped = [token]
            decoder.position.fill_(CONTEXT)
            decoder.length = CONTEXT
            for _ in range(8):
                stepped.append(decoder.step(stepped[-1]).argmax(-1))
            decoder.position.fill_(CONTEXT)
            decoder.length = CONTEXT
            row["same_tokens"] = torch.equal(decoder.greedy(token, 8), torch.stack(stepped, 1))
            print(f"{name:8s} b={batch:4d}  bound {bound:.3f} ms | step + argmax {row['step_argmax_ms']:.3f} ms "
                  f"({bound / row['step_argmax_ms']:.1%}) | greedy {row['greedy_ms']:.3f} ms "
                  f"({bound / row['greedy_ms']:.1%}) | same tokens: {row['same_tokens']}", flush=True)
            if args.sweep:
                row["sweep"] = {}
                for setting, candidates in SWEEP.items():
                    default = getattr(kernels, setting)
                    for tiles in candidates:
                        setattr(kernels, setting, tiles)
                        row["sweep"][f"{setting}={tiles}"] = best_ms(decoder, token, True)
                    setattr(kernels, setting, default)
                row["sweep"]["defaults"] = best_ms(decoder, token, True)
                print("   " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["sweep"].items(), key=lambda kv: kv[1])))
            rows.append(row)
            del decoder
            torch.cuda.empty_cache()
    save(args.out, bandwidth, rows)


if __name__ == "__main__":
    main()
