"""Decode attention variants on one GPU: GB/s of K/V read per call (how `generate.DECODE_ATTENTION`
was chosen). q (b, g, h/g, 64) over K/V (b, g, 2048, 64) in bf16 with an additive mask.

PYTHONPATH=. python benchmarks/results/inference/attention_variants.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_mlkv.generate import matmul_attention, sdpa_attention

SHAPES = [("MHA b=64", 64, 12, 1), ("MHA b=512", 512, 12, 1), ("GQA-48 b=1024", 1024, 4, 3),
          ("g=1 b=1024", 1024, 1, 12), ("g=1 b=8192", 8192, 1, 12)]


def forced(backend):
    def run(q, k, v, bias):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return run


VARIANTS = {"sdpa": sdpa_attention, "efficient": forced(SDPBackend.EFFICIENT_ATTENTION),
            "cudnn": forced(SDPBackend.CUDNN_ATTENTION), "matmul": matmul_attention,
            "flash (no mask, reference)": lambda q, k, v, bias: F.scaled_dot_product_attention(q, k, v)}


def time_ms(fn, *args, reps=20):
    for _ in range(3):
        fn(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    L, d = 2048, 64
    for name, b, g, r in SHAPES:
        q = torch.randn(b, g, r, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, g, L, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        bias = torch.zeros(b, 1, 1, L, device="cuda", dtype=torch.bfloat16)
        bias[..., 2000:] = float("-inf")
        ref = matmul_attention(q.float(), k.float(), v.float(), bias.float())
        gb = 2 * k.nbytes / 1e9
        for vname, fn in VARIANTS.items():
            try:
                err = ((fn(q, k, v, bias).float() - ref).norm() / ref.norm()).item()
                ms = time_ms(fn, q, k, v, bias)
                print(f"{name:14s} {vname:28s} {ms:8.3f} ms {gb / ms * 1e3:8.0f} GB/s  rel.err {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is a result too
                print(f"{name:14s} {vname:28s} failed: {str(e).splitlines()[0][:100]}", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            sdpa_attention(q, k, v, bias)
            torch.cuda.synchronize()
        print(f"{name:14s} sdpa kernels: {[e.key[:60] for e in prof.key_averages()][:4]}", flush=True)
        del q, k, v, bias, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
