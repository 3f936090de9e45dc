"""Packed layers (two flat parameters per layer, for DeepSpeed) train and save exactly as unpacked
ones; the data prefetcher hands out what the loader gives, in order, one step ahead."""

import copy
import threading

import pytest
import torch
from helpers import random_mlkv, tiny_config

from megatron_mlkv.data import Prefetcher
from megatron_mlkv.training import param_groups
from megatron_mlkv.training.packing import ALIGN, PACKS, pack_layers, pieces, unpack_tensors

# "odd-mlp": an MLP width that is no multiple of 8 (as conversions widen it), so its bias stays unpacked
LAYOUTS = {"mha": tiny_config(), "mlkv": tiny_config().with_layout(2, 2), "odd-mlp": tiny_config(intermediate_size=97)}


def test_packed_tensors_split_into_the_state_dict_names():
    """What a checkpoint's flat fp32 weights are cut into (zero_to_fp32.py, the float32 export): each
    packed parameter's pieces are the unpacked model's parameters, same names, shapes and values."""
    ref = random_mlkv(LAYOUTS["mlkv"], std=0.05)
    packed = copy.deepcopy(ref)
    pack_layers(packed)
    where = pieces(packed)
    assert sorted(where) == sorted(f"layers.{i}.{pack}" for i in range(len(packed.layers)) for pack in PACKS.values())
    assert pieces(ref) == {}
    flat = {name: p.detach() * 2 for name, p in packed.named_parameters()}  # any tensors of the packed shapes
    got = unpack_tensors(packed, flat)
    want = {name: p.detach() * 2 for name, p in ref.named_parameters()}
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _loss(model, ids):
    return torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_packed_layers_train_exactly_like_unpacked(layout):
    ref = random_mlkv(LAYOUTS[layout], std=0.05).train()
    packed = copy.deepcopy(ref)
    pack_layers(packed)
    n_layers = len(packed.layers)
    outside = [p for name, p in packed.named_parameters() if not name.startswith("layers.")]
    odd = [name for name, p in ref.layers.named_parameters() if p.numel() % ALIGN]
    assert odd == ([f"{i}.mlp.dense_h_to_4h.bias" for i in range(n_layers)] if layout == "odd-mlp" else [])
    assert len(list(packed.parameters())) == 2 * n_layers + len(odd) + len(outside)
    names = {name.split(".", 1)[1] for name, _ in packed.layers.named_parameters()}
    assert names == set(PACKS.values()) | {name.split(".", 1)[1] for name in odd}
    # every packed piece starts 16-byte aligned (compiled kernels assume it of their inputs)
    for block in packed.layers:
        for _, module, name, _ in (entry for entries in block._packed.values() for entry in entries):
            assert getattr(module, name).storage_offset() % ALIGN == 0, name
    # AdamW with weight decay only on the matrices: the packed groups must split the same elements
    groups = [param_groups(m, weight_decay=0.1) for m in (ref, packed)]
    for g_ref, g_packed in zip(*groups):
        assert sum(p.numel() for p in g_ref["params"]) == sum(p.numel() for p in g_packed["params"])
    opts = [torch.optim.AdamW(g, lr=1e-2) for g in groups]
    ids = torch.randint(0, 101, (2, 12))
    for _ in range(3):
        losses = []
        for model, opt in zip((ref, packed), opts):
            loss = _loss(model, ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    got, want = packed.state_dict(), ref.state_dict()
    assert list(got) != [] and set(got) == set(want)  # the original names, not the packs
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_packed_state_dicts_load_both_ways():
    config = LAYOUTS["mlkv"]
    a, b = random_mlkv(config, seed=1), random_mlkv(config, seed=2)
    pack_layers(b)
    ids = torch.randint(0, 101, (2, 9))
    b.load_state_dict(a.state_dict())  # unpacked -> packed
    torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=0)
    c = random_mlkv(config, seed=3)
    c.load_state_dict(b.state_dict())  # packed -> unpacked
    torch.testing.assert_close(c(ids), a(ids), rtol=0, atol=0)


def test_prefetcher_loads_the_next_index_ahead_in_order():
    calls, threads = [], set()
    lock = threading.Lock()

    def load(i):
        with lock:
            calls.append(i)
            threads.add(threading.current_thread().name)
        return i * i

    batches = Prefetcher(load, limit=4)
    assert [batches.get(i) for i in range(4)] == [0, 1, 4, 9]
    assert batches.get(2) == 4  # out of order: loaded on demand
    batches.close()
    assert calls[:4] == [0, 1, 2, 3] and 4 not in calls  # nothing from `limit` on
    assert any(name.startswith("prefetch") for name in threads)


def test_prefetcher_raises_the_loaders_error_where_the_batch_is_asked_for():
    def load(i):
        if i == 1:
            raise ValueError("row 1 is broken")
        return i

    batches = Prefetcher(load)
    assert batches.get(0) == 0
    with pytest.raises(ValueError, match="row 1 is broken"):
        batches.get(1)
    batches.close()
