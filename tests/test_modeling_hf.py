import json
import subprocess
import sys

import pytest
import torch
from helpers import LAYOUTS, gpt_neox, left_padded, mlkv_from_gpt_neox, model_for, random_mlkv, tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

from megatron_mlkv.errors import CheckpointError
from megatron_mlkv.hf import export_pretrained, output_cache
from megatron_mlkv.loading import load_pretrained

pytestmark = pytest.mark.compat  # the exported remote code under transformers: also run by `make test-compat`


@pytest.fixture(scope="module")
def mlkv_dir(tmp_path_factory):
    cfg = tiny_config(num_layers=6).with_layout(3, 2)
    model = random_mlkv(cfg, std=0.1)
    out = export_pretrained(
        model.state_dict(),
        cfg,
        tmp_path_factory.mktemp("ckpt") / "mlkv",
        hf_kwargs=dict(bos_token_id=0, eos_token_id=0),
    )
    return out, model


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def test_export_is_a_self_contained_transformers_folder(mlkv_dir):
    path, model = mlkv_dir
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mlkv.MLKVGPTNeoXConfig",
        "AutoModelForCausalLM": "modeling_mlkv.MLKVForCausalLM",
    }
    assert config["num_kv_heads"] == 2 and config["kv_owner"] == [0, 0, 2, 2, 4, 4]
    assert (path / "model.safetensors").is_file()
    for source in ("modeling_mlkv.py", "configuration_mlkv.py", "model.py", "config.py", "layout.py"):
        assert (path / source).is_file(), source
    reloaded = load_pretrained(path)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))
        assert torch.allclose(hf_model(path)(ids).logits, model(ids), atol=1e-6)


def test_loads_and_generates_without_this_package(mlkv_dir):
    """The folder alone is enough: `megatron_mlkv` is made unimportable in a fresh interpreter."""
    path, _ = mlkv_dir
    code = f"""
import sys
sys.modules["megatron_mlkv"] = None  # any import of this package now fails
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("megatron_mlkv"), type(model).__module__
ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                     return_dict_in_generate=True)
cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.24
n = sum(t.numel() for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
print(n, out.sequences.shape[1])
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    elements, length = map(int, res.stdout.split())
    assert length == 9
    # the cache covers every token but the last generated one: 2·b·s·m·g·d_k elements
    assert elements == 2 * 2 * 8 * 3 * 2 * 16


def greedy_uncached(model, ids, mask, steps):
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_generate_equals_uncached_greedy_with_left_padding(tmp_path, layout):
    model = model_for(layout)
    path = export_pretrained(model.state_dict(), model.config, tmp_path / layout)
    model = hf_model(path)
    pad = 1
    prompts = [[5, 17, 33, 2, 8, 90, 12], [44, 3, 9], [7, 7, 61, 20, 5]]
    ids, mask = left_padded(prompts, pad)
    width = ids.shape[1]
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad)
    assert torch.equal(cached, greedy_uncached(model, ids, mask, 10))
    for row, prompt in enumerate(prompts):  # padding changes nothing: each prompt alone decodes the same
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=pad)
        assert alone[0, len(prompt) :].tolist() == cached[row, width:].tolist()


def test_forward_takes_the_cache_under_either_name_and_refuses_what_it_cannot_honour(mlkv_dir):
    """transformers up to 5.23 hands the cache to forward as `past_key_values`, 5.24 as `cache`."""
    path, _ = mlkv_dir
    model = hf_model(path)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for name in ("past_key_values", "cache"):
            cache = DynamicCache()
            first = model(ids[:, :6], use_cache=True, **{name: cache})
            assert output_cache(first) is cache and cache.get_seq_length() == 6
            rest = model(ids[:, 6:], use_cache=True, **{name: cache}).logits
            assert torch.allclose(torch.cat([first.logits, rest], dim=1), full, atol=1e-5), name
        logits, returned = model(ids, use_cache=True, return_dict=False)
        assert torch.equal(logits, full) and returned.get_seq_length() == 9
        with pytest.raises(ValueError, match="as `cache` or `past_key_values`, not both"):
            model(ids, cache=DynamicCache(), past_key_values=DynamicCache())
        with pytest.raises(TypeError, match=r"unexpected argument\(s\) head_mask, token_type_ids"):
            model(ids, token_type_ids=torch.zeros_like(ids), head_mask=None)
        assert torch.equal(model(ids, use_cache=False, cache_position=torch.arange(9)).logits, full)
        with pytest.raises(ValueError, match=r"cache_position must continue the cache \(0, 1, ...\), got \[3"):
            model(ids, use_cache=False, cache_position=torch.arange(3, 12))
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            model(ids, output_attentions=True)
        with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seq\).*\(2, 1, 9, 9\)"):
            model(ids, attention_mask=torch.ones(2, 1, 9, 9))


def test_mha_generation_and_loss_equal_gpt_neox(tmp_path):
    ref = gpt_neox(std=0.1)
    model = mlkv_from_gpt_neox(ref)
    path = export_pretrained(model.state_dict(), model.config, tmp_path / "mha")
    ours = hf_model(path)
    ids = torch.randint(2, 101, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), ref.generate(ids, **kwargs))
    labels = torch.randint(0, 101, (2, 6))
    assert torch.allclose(ours(ids, labels=labels).loss, ref(ids, labels=labels).loss, atol=1e-5)


def test_export_refuses_existing_folder_and_load_rejects_non_checkpoints(mlkv_dir, tmp_path):
    path, model = mlkv_dir
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        export_pretrained(model.state_dict(), model.config, path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)
    broken = tmp_path / "broken"
    export_pretrained(model.state_dict(), model.config, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load the checkpoint"):
        load_pretrained(broken)


def test_load_is_strict_about_weights_that_do_not_map(mlkv_dir, tmp_path):
    """A weight missing, or one the model has no place for, is refused naming it: nothing trains,
    benchmarks or evaluates from freshly initialised weights."""
    from safetensors.torch import load_file, save_file

    path, model = mlkv_dir
    for name, edit, expected in (
        ("missing", lambda sd, k: sd.pop(k), "missing model.layers.0.mlp.dense_4h_to_h.weight"),
        ("unexpected", lambda sd, k: sd.update({"model.extra.weight": sd[k].clone()}), "unexpected model.extra.weight"),
    ):
        folder = tmp_path / name
        export_pretrained(model.state_dict(), model.config, folder)
        sd = load_file(folder / "model.safetensors")
        edit(sd, "model.layers.0.mlp.dense_4h_to_h.weight")
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=f"{folder}: its weights do not match its config: {expected}"):
            load_pretrained(folder)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_exports_get_the_modes_the_umask_gives(tmp_path, mask):
    """Not mkdtemp's private 0700 folder, nor the 0600 transformers gives safetensors files: what a plain
    mkdir and open would, so others on a shared machine read exports as the umask allows."""
    import os

    model = random_mlkv(tiny_config())
    old = os.umask(mask)
    try:
        out = export_pretrained(model.state_dict(), model.config, tmp_path / "out")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~mask)
    files = {f.name: oct(f.stat().st_mode & 0o777) for f in out.iterdir()}
    assert files["model.safetensors"] == files["config.json"] == oct(0o666 & ~mask), files
