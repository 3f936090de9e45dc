"""Where a decode step's time goes: kernels per step, their summed time (eager step, profiled) and
the step's time as a CUDA graph replay. Pythia-160M shape, random weights, bf16, context 2000.

PYTHONPATH=. python benchmarks/results/inference/profile_step.py
"""
import torch

from megatron_mlkv.bench_inference import random_model
from megatron_mlkv.config import preset
from megatron_mlkv.convert import target_config
from megatron_mlkv.generate import StaticDecoder


def main(context=2000):
    for name, m, g, batch in (("MLKV-6", 6, 1, 64), ("MHA", 12, 12, 8), ("MLKV-6", 6, 1, 4096)):
        model = random_model(target_config(preset("pythia-160m"), m, g), torch.bfloat16, torch.device("cuda"))
        decoder = StaticDecoder(model, batch, context + 32)
        token = decoder.prefill(torch.randint(0, 50000, (batch, context), device="cuda")).argmax(-1)
        decoder.capture()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decoder._step()  # eager, one step
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            decoder.step(token)
        start.record()
        for _ in range(10):
            decoder.step(token)
        end.record()
        torch.cuda.synchronize()
        step = start.elapsed_time(end) / 10
        print(f"{name} b={batch}: {len(kernels)} kernels/step, kernel time {busy:.3f} ms, graph step {step:.3f} ms")
        top = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]
        for e in top:
            print(f"   {e.device_time_total / 1e3:7.3f} ms  x{e.count:<4d} {e.key[:90]}")
        del model, decoder
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
