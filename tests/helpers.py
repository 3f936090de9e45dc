"""Small shared builders for tests: tiny configs, GPT-NeoX oracles, exported checkpoints, and the
child pytest that runs triton kernels in the CPU interpreter."""

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from megatron_mlkv.config import MLKVConfig
from megatron_mlkv.conversion import convert_state_dict
from megatron_mlkv.model import MLKVTransformer

# the Llama family's tiny checkpoints: h = 8 query heads over g_b = 4 KV heads (GQA), l = 4, d = 64
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,  # shorter than the tests' sequences: the scaling matters
)
LLAMA_CONFIG = dict(
    family="llama",
    use_parallel_residual=False,
    rotary_pct=1.0,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
    rotary_emb_base=500000.0,
)


def tiny_config(**changes) -> MLKVConfig:
    """l = 4 layers, h = 4 heads, d = 64, vocabulary 101 (odd: exercises TP's vocabulary padding);
    `kv_layers=m` (with `num_kv_heads=g`) gives the uniform MLKV layout. `family="llama"` gives the
    Llama family's parts (`LLAMA_CONFIG`: RMSNorm, gated SiLU MLP, Llama-3 rope scaling)."""
    kv_layers = changes.pop("kv_layers", None)
    if changes.get("family") == "llama":
        changes = {**LLAMA_CONFIG, **changes}
    values = dict(
        vocab_size=101, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=96, max_position_embeddings=64
    )
    values.update(changes)
    config = MLKVConfig(**values)
    return config if kv_layers is None else config.with_layout(kv_layers, config.num_kv_heads)


def gpt_neox(seed=0, std=0.2, **hf_kwargs) -> GPTNeoXForCausalLM:
    """A random GPT-NeoX with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    values = dict(
        vocab_size=101,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    values.update(hf_kwargs)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**values)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


LLAMA_KINDS = {
    "llama": dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "qwen2": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=None),
}


def llama_family(kind: str = "llama", seed=0, std=0.2, **hf_kwargs):
    """A random transformers LlamaForCausalLM ("llama": GQA, Llama-3 rope scaling, tied embeddings),
    Qwen2ForCausalLM (biased q, k, v) or MistralForCausalLM, in float32, weights large enough that
    attention is far from uniform."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    values = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        **LLAMA_KINDS[kind],
    )
    values.update(hf_kwargs)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **values)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def mlkv_from_gpt_neox(ref: GPTNeoXForCausalLM) -> MLKVTransformer:
    cfg = MLKVConfig.from_hf(ref.config)
    model = MLKVTransformer(cfg).eval()
    model.load_state_dict(convert_state_dict(ref.state_dict(), cfg, cfg))
    return model


def random_mlkv(config: MLKVConfig, seed=0, std=0.2) -> MLKVTransformer:
    torch.manual_seed(seed)
    model = MLKVTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


# (name, layout changes) for l = 4 layers, h = 4 heads
LAYOUTS = {
    "mha": dict(kv_layers=4, kv_groups=4),
    "gqa": dict(kv_layers=4, kv_groups=2),
    "mqa": dict(kv_layers=4, kv_groups=1),
    "mlkv-m<l": dict(kv_layers=2, kv_groups=4),
    "mlkv-m<l-g<h": dict(kv_layers=2, kv_groups=2),
    "mlkv-1": dict(kv_layers=1, kv_groups=1),
    "non-uniform": dict(kv_owner=[0, 0, 0, 3], kv_groups=2),
}


def model_for(layout: str, seed=0, **changes) -> MLKVTransformer:
    """A random model of tiny_config's shape in one of LAYOUTS."""
    cfg = tiny_config(max_position_embeddings=128, **changes).with_layout(**LAYOUTS[layout])
    return random_mlkv(cfg, seed=seed, std=0.1)


def left_padded(prompts, pad=1):
    """Prompts (lists of ids) left-padded with `pad` to one width: ids and attention mask, each (b, s)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# triton picks its CPU interpreter when it is imported, so a test file's triton tests run in a child
# pytest with TRITON_INTERPRET=1 (`run_interpreted`); in the parent they are skipped (`interpreted`)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="run by the file's child pytest in triton's interpreter")


PARENT_REASON = "the parent of the interpreted tests"
interpreter_parent = pytest.mark.skipif(INTERPRETED, reason=PARENT_REASON)


def run_interpreted(test_file: str, *pytest_args: str) -> int:
    """pytest `test_file` in a child process under TRITON_INTERPRET=1; how many of its tests passed.
    Fails unless the child passed and skipped nothing but the parent test (`interpreter_parent`):
    interpreted tests that all skip (triton missing there, a wrong mark) would otherwise pass unseen."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *pytest_args, test_file],
        cwd=Path(__file__).resolve().parent.parent,
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
    )
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all(line.endswith(PARENT_REASON) for line in skips), report
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed, report
    return int(passed.group(1))


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str = "64k", read_only: bool = False):
    """A tmpfs of `size` mounted on `folder` (made), read-only if asked: a full or read-only disk for the
    commands under test. Skips the test where this process may not mount (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def overwrite_bytes(path, at: int, value: bytes) -> None:
    """Damage a file in place: `value` written at byte `at`, its size unchanged."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(value)
