"""What the decode-step experiments beside this file share (importable as `common`: Python puts a
script's folder on its path): the Pythia-160M shape's models per layout, the copy bandwidth that
bounds a step, and the JSON they save."""
import json

import torch

from megatron_mlkv.bench_inference import copy_bandwidth, parse_layouts, random_model
from megatron_mlkv.config import preset
from megatron_mlkv.conversion import target_config

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
