"""Checkpoints of the MLKV paper's reference code (pythia-mlkv): conversion, the `unrotated_shared_keys`
arithmetic against an independent implementation of the reference's, cached decoding, evaluation, errors.

The tests write the reference format themselves (config keys `num_key_value_layers`/`num_key_value_heads`,
separate query/key/value Linears, key/value only in owner layers, the buffers its modules register), and
`reference_forward` below recomputes the reference code's forward from those tensors in plain torch.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from megatron_mlkv.config import ConfigError
from megatron_mlkv.conversion import convert_checkpoint
from megatron_mlkv.conversion.reference import FORMAT
from megatron_mlkv.errors import CheckpointError
from megatron_mlkv.hf import export_pretrained
from megatron_mlkv.inference.generate import generate
from megatron_mlkv.loading import load_pretrained

pytestmark = pytest.mark.compat  # transformers' generation, lm-eval's loader: also `make test-compat`
ROOT = Path(__file__).resolve().parents[1]
VOCAB, D, H, L, INTER, POSITIONS = 97, 32, 4, 4, 80, 64


def reference_owners(l: int, m: int) -> list[int]:
    """The layers the reference code gives K/V heads (its `key_value_layers`)."""
    return [0] + [int((i + 1) * (l / m)) for i in range(m - 1)]


def write_reference(
    folder: Path, m: int, g: int, seed: int = 0, fmt: str = "safetensors", vocab: int = VOCAB, **config_changes
) -> dict:
    """A reference-format checkpoint with random weights (large enough that attention is far from
    uniform); returns its state dict (reference names) and config."""
    config = dict(
        architectures=["GPTNeoXForCausalLM"],
        model_type="gpt_neox",
        vocab_size=vocab,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=g,
        num_key_value_layers=m,
        use_key_value_mlp=False,
        intermediate_size=INTER,
        kv_intermediate_size=INTER,
        hidden_act="gelu",
        rotary_pct=0.5,
        rotary_emb_base=10000,
        max_position_embeddings=POSITIONS,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        use_cache=True,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        torch_dtype="float32",
    )
    config.update(config_changes)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=0.2: torch.randn(*shape, generator=gen) * std
    dk, d = D // H, D
    sd = {"gpt_neox.embed_in.weight": rand(vocab, d, std=0.5), "embed_out.weight": rand(vocab, d)}
    norm = lambda p: {f"{p}.weight": 1 + rand(d, std=0.1), f"{p}.bias": rand(d, std=0.1)}
    linear = lambda p, rows, cols: {f"{p}.weight": rand(rows, cols), f"{p}.bias": rand(rows, std=0.1)}
    sd.update(norm("gpt_neox.final_layer_norm"))
    owners = reference_owners(L, m)
    for i in range(L):
        p = f"gpt_neox.layers.{i}."
        sd.update(norm(p + "input_layernorm"))
        sd.update(norm(p + "post_attention_layernorm"))
        sd.update(linear(p + "attention.query", H * dk, d))
        if i in owners:
            sd.update(linear(p + "attention.key", g * dk, d))
            sd.update(linear(p + "attention.value", g * dk, d))
        sd.update(linear(p + "attention.dense", d, d))
        sd.update(linear(p + "mlp.dense_h_to_4h", INTER, d))
        sd.update(linear(p + "mlp.dense_4h_to_h", d, INTER))
        # the buffers the reference modules register, saved with the weights
        sd[p + "attention.bias"] = torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=torch.uint8))[None, None]
        sd[p + "attention.masked_bias"] = torch.tensor(-1e9)
        rot = int(dk * config["rotary_pct"])
        sd[p + "attention.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    else:  # what the reference's convert_to_mlkv.py writes
        torch.save(sd, folder / "pytorch_model.bin")
    return {"sd": sd, "config": config}


def reference_forward(sd: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """The reference code's forward (float32, no cache): logits (b, s, vocab).

    Owners project K/V and hand the keys *before* rotary to the layers above them; a served layer
    rotates only its queries. Query head i reads KV head i // (h/g); scores by one matrix product
    scaled by 1/sqrt(d_k), the causal mask by the dtype's minimum, softmax, then the values."""
    l, h, d = config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"]
    g, m = config["num_key_value_heads"], config["num_key_value_layers"]
    dk = d // h
    rot = int(dk * config["rotary_pct"])
    owners = reference_owners(l, m)
    b, s = ids.shape
    inv_freq = 1.0 / (config["rotary_emb_base"] ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.outer(torch.arange(s).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # (b, heads, s, d_k): rotate_half on the first `rot` dims
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        half = torch.cat([-x_rot[..., rot // 2 :], x_rot[..., : rot // 2]], -1)
        return torch.cat([x_rot * cos + half * sin, x_pass], -1)

    def norm(x, p):
        return F.layer_norm(x, (d,), sd[f"{p}.weight"], sd[f"{p}.bias"], config["layer_norm_eps"])

    def lin(x, p):
        return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    heads = lambda x, n: x.view(b, s, n, dk).transpose(1, 2)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    x = sd["gpt_neox.embed_in.weight"][ids]
    passed = None
    for i in range(l):
        p = f"gpt_neox.layers.{i}."
        a = norm(x, p + "input_layernorm")
        q = heads(lin(a, p + "attention.query"), h)
        if i in owners:
            k, v = heads(lin(a, p + "attention.key"), g), heads(lin(a, p + "attention.value"), g)
            passed = (k, v)
            q, k = rope(q), rope(k)
        else:
            (k, v), q = passed, rope(q)
        k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dk)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        mlp = lin(
            F.gelu(lin(norm(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")), p + "mlp.dense_4h_to_h"
        )
        x = x + lin(out, p + "attention.dense") + mlp
    return norm(x, "gpt_neox.final_layer_norm") @ sd["embed_out.weight"].T


def ids(b=2, s=11, seed=1):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


LAYOUTS = [(2, 1), (2, 2), (1, 1), (3, 4), (4, 2)]  # (m, g); m = 3 of 4 layers: owners 0, 1, 2


@pytest.mark.parametrize("m,g", LAYOUTS)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_converted_logits_equal_the_reference_arithmetic(tmp_path, m, g, fmt):
    from transformers import AutoModelForCausalLM

    ref = write_reference(tmp_path / "ref", m, g, fmt=fmt)
    report = convert_checkpoint(tmp_path / "ref", tmp_path / "out", progress=False)
    assert report["format"] == FORMAT and report["kv_layers"] == m and report["kv_groups"] == g
    assert report["owners"] == reference_owners(L, m)
    assert report["parameters"]["after"] == sum(
        t.numel() for n, t in ref["sd"].items() if not n.endswith(("attention.bias", "masked_bias", "inv_freq"))
    )
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["unrotated_shared_keys"] is True and saved["intermediate_size"] == INTER

    x = ids()
    expected = reference_forward(ref["sd"], ref["config"], x)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=1e-5)
        # the reference folder itself loads the same way (converted in memory)
        for path in (tmp_path / "out", tmp_path / "ref"):
            torch.testing.assert_close(load_pretrained(path).eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_the_option_is_what_makes_them_equal(tmp_path):
    """The same weights with the option off (keys rotated before they are shared) compute another
    function, so the comparison above can fail."""
    ref = write_reference(tmp_path / "ref", 2, 1)
    model = load_pretrained(tmp_path / "ref").eval()
    x = ids()
    expected = reference_forward(ref["sd"], ref["config"], x)
    model.config.unrotated_shared_keys = False
    for layer in model.layers:
        layer.attention.unrotated_slot = None
    with torch.no_grad():
        assert (model(x) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("m,g", [(2, 1), (1, 2)])
def test_cached_decoding_equals_full_forward(tmp_path, m, g):
    """Our cache keeps the unrotated keys the served layers need, so cached decoding (our decoder and
    transformers' generate with its DynamicCache) equals greedy decoding by full forwards. The
    reference's own cache holds rotated keys for every layer, so its cached decoding does not."""
    from transformers import AutoModelForCausalLM

    write_reference(tmp_path / "ref", m, g)
    convert_checkpoint(tmp_path / "ref", tmp_path / "out", progress=False)
    model = load_pretrained(tmp_path / "out").eval()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    prompt = ids(2, 6) * mask + (1 - mask)
    with torch.no_grad():
        expected = prompt
        for _ in range(8):  # greedy by full forwards, positions counted from each row's first real token
            full_mask = torch.cat([mask, torch.ones(2, expected.shape[1] - 6, dtype=torch.long)], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(expected, positions, full_mask)[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], 1)
        for attention in ("sdpa", "matmul"):
            torch.testing.assert_close(generate(model, prompt, 8, attention_mask=mask, attention=attention), expected)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
        out = hf.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
        torch.testing.assert_close(out, expected)


def test_cache_holds_unrotated_keys_of_serving_owners_only(tmp_path):
    from megatron_mlkv.inference.generate import StaticKVCache

    write_reference(tmp_path / "ref", 3, 2)  # owners 0, 1, 2: only layer 2 serves another layer
    config = load_pretrained(tmp_path / "ref").config
    assert config.layout.serving_owners == (2,) and config.cached_key_slots == 4
    cache = StaticKVCache.allocate(config, 2, 10)
    assert cache.keys.shape[0] == 4 and cache.values.shape[0] == 3
    assert cache.keys.numel() + cache.values.numel() == config.cache_elements(2, 10)


def test_training_gradients_equal_the_reference_arithmetic(tmp_path):
    """The option in training: the loss and the gradients of every weight equal those of the
    reference arithmetic (autograd through `reference_forward`)."""
    ref = write_reference(tmp_path / "ref", 2, 1)
    model = load_pretrained(tmp_path / "ref").train()
    params = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in ref["sd"].items()}
    x = ids(2, 12)
    targets = ids(2, 12, seed=2)
    ours = F.cross_entropy(model(x).flatten(0, 1), targets.flatten())
    theirs = F.cross_entropy(reference_forward(params, ref["config"], x).flatten(0, 1), targets.flatten())
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    grads = dict(model.named_parameters())
    for name, param in grads.items():
        ref_name = name if name.startswith("embed_out") else f"gpt_neox.{name}"
        torch.testing.assert_close(param.grad, params[ref_name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_export_keeps_the_option(tmp_path):
    ref = write_reference(tmp_path / "ref", 2, 1)
    model = load_pretrained(tmp_path / "ref").eval()
    export_pretrained(model.state_dict(), model.config, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["unrotated_shared_keys"] is True
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(
            load_pretrained(tmp_path / "export").eval()(x), reference_forward(ref["sd"], ref["config"], x)
        )


def run_convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "convert.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_converts_and_prints_the_format(tmp_path):
    write_reference(tmp_path / "ref", 2, 1)
    proc = run_convert("--base", tmp_path / "ref", "--out", tmp_path / "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert FORMAT in proc.stdout and "MLKV-2" in proc.stdout


@pytest.mark.parametrize(
    "changes, flags, message",
    [
        (dict(use_key_value_mlp=True), (), "use_key_value_mlp = true"),
        (dict(num_key_value_heads=3), (), "must divide num_heads"),
        (dict(num_key_value_layers=5), (), "kv_layers (m) = 5"),
        ({}, ("--kv-layers", "1"), "--kv-layers do not apply"),
        ({}, ("--merge", "sequential", "--no-match-params"), "--merge sequential, --no-match-params do not apply"),
        ({}, ("--mlp-init", "copy"), "--mlp-init copy do not apply"),
        ({}, ("--mlp-multiple", "64"), "--mlp-multiple 64 do not apply"),
        ({}, ("--paper-variants", "--out-root", "variants"), "without --paper-variants"),
    ],
)
def test_unmappable_reference_is_one_line(tmp_path, changes, flags, message):
    write_reference(tmp_path / "ref", 2, 1, **changes)
    out = () if "--paper-variants" in flags else ("--out", tmp_path / "out")
    proc = run_convert("--base", tmp_path / "ref", *out, *flags)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(tmp_path / "ref") in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_weights_that_disagree_with_the_config_are_named(tmp_path):
    ref = write_reference(tmp_path / "ref", 2, 1)
    sd = dict(ref["sd"])
    sd["gpt_neox.layers.1.attention.key.weight"] = sd["gpt_neox.layers.0.attention.key.weight"].clone()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ref" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.key\.weight' exists, but layer 1"):
        convert_checkpoint(tmp_path / "ref", tmp_path / "out", progress=False)
    del sd["gpt_neox.layers.1.attention.key.weight"], sd["gpt_neox.layers.2.attention.value.bias"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ref" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.2\.attention\.value\.bias' is missing"):
        convert_checkpoint(tmp_path / "ref", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_revision_is_for_hub_names(tmp_path):
    write_reference(tmp_path / "ref", 2, 1)
    with pytest.raises(CheckpointError, match="--revision applies to hub names"):
        convert_checkpoint(tmp_path / "ref", tmp_path / "out", revision="master", progress=False)


def test_loaders_refuse_the_key_value_mlp_variant(tmp_path):
    write_reference(tmp_path / "mlp", 2, 1, use_key_value_mlp=True)
    with pytest.raises(ConfigError, match="use_key_value_mlp"):
        load_pretrained(tmp_path / "mlp")


def test_evaluate_and_report_take_reference_checkpoints(tmp_path, tokenizer_dir, monkeypatch):
    """launch/evaluate.py on a reference folder gives lm-eval's own `--model hf` numbers on its
    conversion (transformers alone would load it with random attention); the report names its format."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from test_evaluate import BATCH, LIMIT, OFFLINE, TASKS, write_tasks
    from transformers import AutoTokenizer

    from megatron_mlkv.evaluation.report import build_report

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    write_reference(
        tmp_path / "ref", 2, 1, vocab=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id
    )
    tok.save_pretrained(tmp_path / "ref")
    convert_checkpoint(tmp_path / "ref", tmp_path / "converted", progress=False)
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "eval" / "paper-mlkv-2.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "evaluate.py"), "--model", str(tmp_path / "ref")]
        + ["--tasks", ",".join(TASKS), "--include-path", str(tasks), "--limit", str(LIMIT)]
        + ["--batch-size", str(BATCH), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(out.read_text())
    assert ours["format"] == FORMAT and ours["layout"]["name"] == "MLKV-2"
    expected = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'converted'},trust_remote_code=True",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks)),
        limit=LIMIT,
        batch_size=BATCH,
        device="cpu",
        log_samples=False,
    )
    for task in TASKS:
        for key, value in expected["results"][task].items():
            if "," in key and "_stderr" not in key:
                assert ours["results"][task][key] == value, (task, key)
    report = build_report([out], tmp_path / "table3")
    assert report["rows"][0]["label"] == f"ref ({FORMAT})"
