"""The greedy decode step with and without programmatic dependent launch (`kernels.PDL`): each
kernel launched while the one before it runs, waiting (`gdc_wait`) before it reads what that one
wrote: "pdl" launches the kernels of `kernels.PDL_KERNELS` early (all but attention),
"pdl-attention-early" attention too. Same prefilled cache, ms per token and fraction of the
bandwidth bound, and whether each variant gives the tokens of the variant without PDL.
Pythia-160M shape, random weights, bf16, context 2000.

PYTHONPATH=. python benchmarks/results/inference/pdl_step.py [--cases mlkv-6:64,mha:8] [--out FILE.json]
"""
import argparse
import time

import torch

from megatron_mlkv import kernels
from megatron_mlkv.bench_inference import decode_bytes_per_step
from megatron_mlkv.generate import StaticDecoder

from common import SHAPE, layout_models, measured_bandwidth, save

CONTEXT, STEPS = 2000, 48
# (PDL, the kernels launched before the one before them has finished)
VARIANTS = {"off": (False, ()), "pdl": (True, kernels.PDL_KERNELS),
            "pdl-attention-early": (True, kernels.PDL_KERNELS + ("attention",))}


def greedy_ms(decoder: StaticDecoder, token: torch.Tensor, repeats: int = 3) -> tuple[float, torch.Tensor]:
    """Best ms per token of STEPS greedy steps from the end of the prefill, and the tokens."""
    times = []
    for _ in range(repeats):
        decoder.position.fill_(CONTEXT)
        decoder.length = CONTEXT
        torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = decoder.greedy(token, STEPS)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / STEPS * 1e3)
    return min(times), tokens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="mlkv-6:64,mqa-12:64,mlkv-1:64,mha:8,mha:64,gqa-48:64,mlkv-6:256")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=2, help="passes over the variants (interleaved)")
    p.add_argument("--out")
    p.add_argument("--trace", help="a folder for chrome traces of four greedy steps, without and with PDL")
    args = p.parse_args()
    device = torch.device("cuda")
    bandwidth = measured_bandwidth(device)
    rows = []
    for case in args.cases.split(","):
        layout, batch = case.split(":")
        (name, model), = layout_models(layout, device)
        batch = int(batch)
        decoder = StaticDecoder(model, batch, CONTEXT + STEPS + 1)
        token = decoder.prefill(torch.randint(0, SHAPE.vocab_size, (batch, CONTEXT), device=device)).argmax(-1)
        bound = decode_bytes_per_step(model, model.config.layout, model.config.head_dim, batch,
                                      CONTEXT + STEPS / 2) / bandwidth * 1e3
        row = dict(layout=name, batch=batch, bound_ms=bound, ms={}, same_tokens={})
        reference = None
        for _ in range(args.rounds):
            for variant in args.variants.split(","):
                kernels.PDL, kernels.PDL_KERNELS = VARIANTS[variant]
                decoder.graphs = {}
                ms, tokens = greedy_ms(decoder, token)
                reference = tokens if reference is None else reference
                row["ms"][variant] = min(ms, row["ms"].get(variant, ms))
                row["same_tokens"][variant] = torch.equal(tokens, reference)
        if args.trace:
            for variant in ("off", "pdl"):
                kernels.PDL, kernels.PDL_KERNELS = VARIANTS[variant]
                decoder.graphs = {}
                greedy_ms(decoder, token, 1)
                decoder.position.fill_(CONTEXT)
                decoder.length = CONTEXT
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    decoder.greedy(token, 4)
                    torch.cuda.synchronize()
                prof.export_chrome_trace(f"{args.trace}/{name}_{batch}_{variant}.json.gz")
        print(f"{name:8s} b={batch:4d} bound {bound:.3f} ms | " + " | ".join(
            f"{v} {ms:.3f} ({bound / ms:.1%}){'' if row['same_tokens'][v] else ' DIFFERENT'}"
            for v, ms in row["ms"].items()), flush=True)
        rows.append(row)
        del decoder, model
        torch.cuda.empty_cache()
    save(args.out, bandwidth, rows)


if __name__ == "__main__":
    main()
