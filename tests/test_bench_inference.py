import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_mlkv, tiny_config

from megatron_mlkv.config import ConfigError
from megatron_mlkv.conversion import to_gpt_neox
from megatron_mlkv.errors import BenchError
from megatron_mlkv.hf import export_pretrained
from megatron_mlkv.inference.bench import decode_bytes_per_step, measure, parse_layouts, search_batches
from megatron_mlkv.inference.report import summarize

pytestmark = pytest.mark.compat  # transformers' generate as the baseline: also run by `make test-compat`

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "model",
    "layout",
    "kv_heads_total",
    "batch_size",
    "context",
    "kv_cache_bytes",
    "peak_memory_bytes",
    "tokens_per_s",
    "oom",
    "engine",
    "bandwidth_bound_tokens_per_s",
    "fraction_of_bound",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = {}
    for name, (m, g) in {"mha": (4, 4), "mlkv": (2, 1)}.items():
        cfg = tiny_config(max_position_embeddings=64).with_layout(m, g)
        out[name] = export_pretrained(random_mlkv(cfg, std=0.1).state_dict(), cfg, root / name)
    return out


def bench(*args):
    """The CLI in a fresh interpreter, as users run it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "bench_inference.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def bench_main(*args):
    """The CLI's main() in this process (cheaper than a subprocess)."""
    from launch import bench_inference

    return bench_inference.main([str(a) for a in args])


def test_cli_with_batch_sizes_baseline_and_eval_json(folders, tmp_path):
    evals = []
    for name, layout, acc in (("mha", "MHA", 0.6), ("mlkv", {"name": "MLKV-2", "kv_heads_total": 2}, 0.5)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"layout": layout, "results": {"piqa": {"acc,none": acc}, "sciq": {"acc": acc}}}))
        evals.append(path)
    out = tmp_path / "out"
    res = bench(
        "--model",
        folders["mha"],
        folders["mlkv"],
        "--context",
        12,
        "--new-tokens",
        3,
        "--batch-sizes",
        1,
        3,
        "--baseline-hf",
        "--eval-json",
        *evals,
        "--out",
        out,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    assert [(r["engine"], r["batch_size"]) for r in records] == [
        ("transformers", 1),
        ("transformers", 3),
        ("transformers-static", 1),
        ("transformers-static", 3),
        ("mlkv-fast", 1),
        ("mlkv-fast", 3),
        ("mlkv-fast", 1),
        ("mlkv-fast", 3),
    ]
    for r in records:
        assert FIELDS <= r.keys() and not r["oom"] and r["tokens_per_s"] > 0
        assert r["peak_memory_bytes"] is None  # CPU: no allocator peak
        # which decode attention ran: SDPA on CPU for ours (no triton interpreter here); transformers' own
        assert r["attention"] == "sdpa" if r["engine"] == "mlkv-fast" else r["attention"] in ("sdpa", "eager")
        assert 0 < r["fraction_of_bound"] == pytest.approx(r["tokens_per_s"] / r["bandwidth_bound_tokens_per_s"])
        # exact bytes of the cache: 2·b·s·m·g·d_k·4 (fp32), s = context + new tokens, for both engines
        m, g = (4, 4) if r["layout"] == "MHA" else (2, 1)
        assert r["kv_heads_total"] == m * g
        assert r["kv_cache_bytes"] == 2 * r["batch_size"] * 15 * m * g * 16 * 4, r["engine"]
        assert r["warmed_up"] and r["warmup_s"] > 0
        assert (
            r["cache"]
            == {"transformers": "DynamicCache", "transformers-static": "StaticCache", "mlkv-fast": "StaticDecoder"}[
                r["engine"]
            ]
        )
    for name in ("memory.png", "throughput.png", "accuracy.png", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    points = json.loads((out / "accuracy.json").read_text())
    assert {p["layout"]: p["mean_accuracy"] for p in points} == {"MHA": 0.6, "MLKV-2": 0.5}
    assert points[0]["kv_bytes_per_sequence"] == 2 * 15 * 16 * 16 * 4

    merged = tmp_path / "merged"  # re-plotting earlier results needs no model
    bench_main("--include-results", out / "results.json", "--out", merged)
    assert json.loads((merged / "results.json").read_text()) == records and (merged / "memory.png").is_file()


def test_every_timed_run_follows_a_warm_up_of_the_same_shape(monkeypatch):
    """Each engine's timed run is its second of that exact shape (the first compiles, captures,
    allocates), and the summary's ratios take the faster transformers engine at each batch."""
    from megatron_mlkv.inference import bench as bi

    calls = []

    def fake(engine):
        def run(model, batch, context, new_tokens, device, *cache):
            calls.append((engine, cache, batch))
            n = sum(1 for c in calls if c == (engine, cache, batch))
            speed = {"mlkv-fast": 8.0, ("dynamic",): 1.0, ("static",): 2.0}[cache or engine]
            return dict(kv_cache_bytes=1, prefill_s=0.1, decode_s=batch * new_tokens / speed / n, attention="x")

        return run

    monkeypatch.setattr(bi, "run_fast", fake("mlkv-fast"))
    monkeypatch.setattr(bi, "run_transformers", fake("transformers"))
    config = tiny_config()
    model = random_mlkv(config)
    candidates = [
        bi.Candidate("m:mha", config.layout, config.head_dim, engine, lambda: model)
        for engine in ("transformers", "transformers-static", "mlkv-fast")
    ]
    records = []
    for cand in candidates:
        records += bi.bench_candidate(
            cand, 4, 2, torch.device("cpu"), torch.float32, 1e9, batch_sizes=[8, 16], log=lambda _: None
        )
    assert calls == [
        (e, c, b)
        for e, c in (("transformers", ("dynamic",)), ("transformers", ("static",)), ("mlkv-fast", ()))
        for b in (8, 8, 16, 16)
    ]
    # the timed run is the second: here twice as fast as the first
    assert [r["tokens_per_s"] for r in records] == [2.0, 2.0, 4.0, 4.0, 16.0, 16.0]
    rows = {r["engine"]: r for r in summarize(records)}
    assert rows["mlkv-fast"]["vs_transformers_b8"] == 4.0  # 16 / the static engine's 4, not the dynamic's 2
    assert rows["mlkv-fast"]["vs_transformers_best"] == 4.0 and rows["transformers"]["vs_transformers_b8"] is None


def test_cli_searches_the_batch_up_to_max_batch_on_cpu(folders, tmp_path, capsys):
    out = tmp_path / "out"
    bench_main("--model", folders["mlkv"], "--context", 8, "--new-tokens", 2, "--max-batch", 6, "--out", out)
    records = json.loads((out / "results.json").read_text())
    assert [r["batch_size"] for r in records] == [1, 2, 4, 6]
    assert (out / "memory.png").is_file() and (out / "throughput.png").is_file()
    assert bench_main("--model", folders["mlkv"], "--out", tmp_path / "none", "--device", "cpu") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("error: ") and "needs --max-batch" in last
    # a cache longer than the model's positions (this one has 64) is refused before any model is loaded
    assert (
        bench_main("--model", folders["mlkv"], "--context", 60, "--new-tokens", 8, "--max-batch", 2, "--out", out) == 2
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    expected = f"--context 60 + --new-tokens 8 exceed the 64 positions of {folders['mlkv']} (max_position_embeddings)"
    assert last == f"error: {expected}: lower --context"


def test_search_doubles_until_oom_then_bisects():
    tried = []

    def attempt(batch):
        tried.append(batch)
        return {"oom": batch > 1500}

    records = search_batches(attempt, max_batch=10**6)
    assert tried == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 1536, 1280]
    assert [r["oom"] for r in records][-3:] == [True, True, False]
    tried.clear()
    search_batches(attempt, max_batch=100)
    assert tried == [1, 2, 4, 8, 16, 32, 64, 100]


def test_measure_turns_out_of_memory_into_a_record():
    def run():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    assert measure(run, torch.device("cpu")) == {"oom": True, "peak_memory_bytes": None}
    with pytest.raises(ValueError):
        measure(lambda: (_ for _ in ()).throw(ValueError("a real bug")), torch.device("cpu"))


def test_gpt_neox_baseline_has_the_same_logits():
    model = random_mlkv(tiny_config(), std=0.1)
    ref = to_gpt_neox(model)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, model(ids), atol=1e-5)
    with pytest.raises(ConfigError, match="only an MHA model"):
        to_gpt_neox(random_mlkv(tiny_config().with_layout(2, 1)))


def test_bandwidth_bound_counts_every_layers_kv_reads():
    model = random_mlkv(tiny_config().with_layout(2, 1))  # l = 4, m = 2, g = 1, d_k = 16
    weights = sum(p.nbytes for p in model.parameters())
    emb_row = model.embed_in.weight[0].nbytes
    step = decode_bytes_per_step(model, model.config.layout, 16, batch=3, mean_len=10)
    assert step == weights - model.embed_in.weight.nbytes + 3 * emb_row + 4 * 2 * 3 * 10 * 1 * 16 * 4


def test_later_records_replace_earlier_ones_of_the_same_row():
    from megatron_mlkv.inference.report import latest

    row = dict(model="m", engine="mlkv-fast", context=20)
    old8, old16, other = (
        dict(row, batch_size=8, v=1),
        dict(row, batch_size=16, v=2),
        dict(row, engine="x", batch_size=8),
    )
    new8 = dict(row, batch_size=8, v=3)
    assert latest([old8, old16, other, new8]) == [old16, other, new8]


def test_layout_names():
    assert parse_layouts("mha,mlkv-6,mqa-12,4:3", 12, 12) == [
        ("MHA", 12, 12),
        ("MLKV-6", 6, 1),
        ("MQA-12", 12, 1),
        ("MLKV-12", 4, 3),
    ]
    assert len(parse_layouts("all", 12, 12)) == 9
    with pytest.raises(BenchError, match="'mlkv-7' is not a layout"):
        parse_layouts("mlkv-7", 12, 12)


def test_a_llama_shape_benchmarks_its_own_layout_and_transformers_own_class():
    """`--shape llama-3.2-1b --layouts base,...`: the base is its GQA-8 (no 'mha': g must divide its 8
    K/V heads); the baseline is LlamaForCausalLM, with the logits of ours for a layout it holds."""
    from megatron_mlkv.conversion import to_base_model
    from megatron_mlkv.inference.bench import base_class_holds

    assert parse_layouts("base,mqa-16,mlkv-8,2:1", 16, 32, 8) == [
        ("GQA-128", 16, 8),
        ("MQA-16", 16, 1),
        ("MLKV-8", 8, 1),
        ("MLKV-2", 2, 1),
    ]
    with pytest.raises(BenchError, match="'mha' is not a layout; allowed: base, gqa-64"):
        parse_layouts("mha", 16, 32, 8)
    model = random_mlkv(tiny_config(family="llama", num_kv_heads=2), std=0.1)
    assert base_class_holds(model.config) and not base_class_holds(model.config.with_layout(2, 2))
    ref = to_base_model(model)
    assert type(ref).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
