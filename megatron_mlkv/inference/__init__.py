"""Inference: `generate.py` (greedy decoding with a static cache of the owner layers, CUDA graphs),
`kernels.py` (the triton kernels of the decode step), `bench.py` (KV memory, largest batch and
tokens/s per layout against transformers: `launch/bench_inference.py`) and `report.py` (its tables
and plots)."""
