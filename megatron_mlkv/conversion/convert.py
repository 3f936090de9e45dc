"""Converting checkpoints: one layout (`convert_checkpoint`), the paper's eight
(`convert_paper_variants`), and the conversion report.

Why one file of ~510 lines: writing one layout, the paper's eight and a base in memory
(`load_base_model`) share the stream over the base's tensors, its checks and the report."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import ConfigError, MLKVConfig
from ..errors import CheckpointError, as_disk_full
from ..hf import TOKENIZER_FILES, copy_tokenizer_files, export_pretrained, progress_bars
from ..integrity import ordinary_modes
from ..layout import KVLayout
from ..model import MLKVTransformer
from .checkpoint_io import BaseCheckpoint, _opened, weights_prefix
from .core import MERGE_MODES, MLP_INITS, convert_tensors, family_of, target_config
from .reference import FORMAT, reference_tensors

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
REPORT_NAME = "conversion_report.json"
PLAIN = "plain"  # the subfolder of a converted folder holding the base's own class (`plain_form`)
# The paper's eight Pythia-160M variants (its Table 2) as functions of (l, h): name, m(l), g(h). The
# pairs GQA-48/MLKV-48 and MQA-12/MLKV-12 keep equal KV budgets (l·h/3 and l heads) for any shape.
PAPER_LAYOUTS = (
    ("GQA-48", lambda l: l, lambda h: h // 3),
    ("MLKV-48", lambda l: l // 3, lambda h: h),
    ("MQA-12", lambda l: l, lambda h: 1),
    ("MLKV-12", lambda l: l // 3, lambda h: 3),
    ("MLKV-6", lambda l: l // 2, lambda h: 1),
    ("MLKV-4", lambda l: l // 3, lambda h: 1),
    ("MLKV-2", lambda l: l // 6, lambda h: 1),
    ("MLKV-1", lambda l: 1, lambda h: 1),
)
# --------------------------------------------------------------------------------------------
# Converting checkpoints: one layout, the paper's eight, the report
# --------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'float32'/'fp32', 'float16'/'fp16', 'bfloat16'/'bf16' or a torch dtype; None keeps the base's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_owner_map(text: str | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """'0,0,2,2' (commas or spaces) -> [0, 0, 2, 2]; the layout itself is validated later."""
    if text is None or isinstance(text, (list, tuple)):
        return None if text is None else [int(o) for o in text]
    items = text.replace(",", " ").split()
    if not items or not all(s.isdigit() for s in items):
        raise ConfigError(f"kv owner map '{text}': expected one layer index per layer, e.g. 0,0,2,2")
    return [int(s) for s in items]


def _count_parameters(sd: dict) -> int:
    """Parameters of a converted state dict, a tied output head counted once."""
    seen, total = set(), 0
    for t in sd.values():
        key = (t.data_ptr(), tuple(t.shape)) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def conversion_report(
    base: MLKVConfig,
    target: MLKVConfig,
    *,
    base_name: str = "",
    out: str = "",
    merge: str = "mean",
    mlp_init: str = "zero",
    match_params: bool = True,
    mlp_multiple: int = 1,
    base_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype = torch.float32,
) -> dict:
    """What a conversion changes: layout, owner map, parameters, MLP width, KV heads and KV cache
    bytes per token (fp16 and the checkpoints' dtypes), before and after."""
    dtypes = list(dict.fromkeys(["float16", _dtype_name(base_dtype), _dtype_name(out_dtype)]))
    before, after = base.layout, target.layout
    return {
        "base": base_name,
        "out": out,
        "layout": after.name,
        "base_layout": before.name,
        "num_layers": target.num_layers,
        "num_heads": target.num_heads,
        "kv_layers": after.kv_layers,
        "kv_groups": after.num_kv_heads,
        "kv_owner": list(after.kv_owner),
        "owners": list(after.owners),
        "uniform": after.is_uniform,
        "merge": merge,
        "mlp_init": mlp_init,
        "match_params": match_params,
        "mlp_multiple": mlp_multiple,
        "dtype": {"before": _dtype_name(base_dtype), "after": _dtype_name(out_dtype)},
        "parameters": {"before": base.num_parameters(), "after": target.num_parameters()},
        "intermediate_size": {"before": base.intermediate_size, "after": target.intermediate_size},
        "kv_heads": {"before": before.kv_heads_total(), "after": after.kv_heads_total()},
        "kv_bytes_per_token": {
            dt: {
                "before": before.kv_bytes_per_token(base.head_dim, dt),
                "after": after.kv_bytes_per_token(target.head_dim, dt),
            }
            for dt in dtypes
        },
    }


def format_report(report: dict) -> str:
    """A conversion report as a short header and a markdown table (before / after / ratio)."""
    owners = report["kv_owner"]
    lines = [
        f"{report['base']} -> {report['out']}",
        f"layout {report['base_layout']} -> {report['layout']} (m = {report['kv_layers']}, "
        f"g = {report['kv_groups']}), owner map {','.join(map(str, owners))}",
        f"{report['format']} checkpoint: its weights as trained, with its arithmetic (unrotated_shared_keys)"
        if report.get("format")
        else f"merge {report['merge']}, mlp init {report['mlp_init']}, match params {report['match_params']}"
        + (f" (MLP width a multiple of {report['mlp_multiple']})" if report.get("mlp_multiple", 1) > 1 else "")
        if report.get("init", "converted") == "converted"
        else f"weights {report['init']} (the base's are not used), match params {report['match_params']}",
        "",
        "| | before | after | after / before |",
        "|---|---|---|---|",
    ]
    rows = [
        ("parameters", report["parameters"]),
        ("MLP intermediate size", report["intermediate_size"]),
        ("KV heads per token", report["kv_heads"]),
    ]
    rows += [(f"KV bytes per token ({dt})", v) for dt, v in report["kv_bytes_per_token"].items()]
    for label, v in rows:
        lines.append(f"| {label} | {v['before']:,} | {v['after']:,} | {v['after'] / v['before']:.6g} |")
    lines.append(f"| dtype | {report['dtype']['before']} | {report['dtype']['after']} | |")
    return "\n".join(lines)


def plain_form(config: MLKVConfig) -> bool:
    """Whether a converted model is also written as the base's own transformers class (in `PLAIN`): a
    Llama-family layout without cross-layer sharing (m = l; any g) and biases that class holds."""
    if config.family != "llama":
        return False
    from .llama import check_base_form

    try:
        check_base_form(config)
    except ConfigError:
        return False
    return True


def base_config(config: MLKVConfig):
    """The transformers config of the family's own class for `config` (`GPTNeoXConfig` for an MHA
    GPT-NeoX; the base's `LlamaConfig`, `Qwen2Config` or `MistralConfig`)."""
    from .gpt_neox import gpt_neox_config
    from .llama import base_config as llama_config

    return gpt_neox_config(config) if config.family == "gpt_neox" else llama_config(config)


def to_base_model(model: MLKVTransformer):
    """`model` as transformers' own class of its family (same weights, same logits): `to_gpt_neox`
    (MHA) or `llama.to_base_model` (no cross-layer sharing)."""
    from .gpt_neox import to_gpt_neox
    from .llama import to_base_model as to_llama

    return to_gpt_neox(model) if model.config.family == "gpt_neox" else to_llama(model)


def _write_folder(
    sd: dict,
    target: MLKVConfig,
    out: Path,
    ckpt: BaseCheckpoint,
    dtype: torch.dtype,
    max_shard_size: str,
    report: dict,
    overwrite: bool,
    progress: bool = True,
) -> None:
    """Export `sd` and the report into a hidden sibling of `out`, then rename it to `out`: the
    folder is either complete (report and `PLAIN` included) or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        _stage_folder(sd, target, out, stage, ckpt, dtype, max_shard_size, report, overwrite, progress)
    except Exception as e:  # a full disk says so in many ways: one OSError (`cli.entry_point`: one line)
        raise as_disk_full(e, str(out)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _stage_folder(sd, target, out, stage, ckpt, dtype, max_shard_size, report, overwrite, progress) -> None:
    """`_write_folder`'s work in the staging folder, renamed to `out` at the end."""
    folder = export_pretrained(
        sd,
        target,
        stage / out.name,
        tokenizer_from=ckpt.tokenizer_dir,
        max_shard_size=max_shard_size,
        dtype=dtype,
        hf_kwargs=ckpt.hf_kwargs(),
        progress=progress,
    )
    if plain_form(target):  # also as the base's own class, which needs no remote code
        from .llama import base_model

        model = base_model(sd, target, dtype, ckpt.hf_kwargs())
        with progress_bars(progress):
            model.save_pretrained(folder / PLAIN, max_shard_size=max_shard_size)
        copy_tokenizer_files(ckpt.tokenizer_dir, folder / PLAIN)
        report["plain"] = f"{PLAIN}/ ({type(model).__name__})"
        del model
    sd.clear()  # export is written: drop the converted tensors before the next step
    report["tokenizer_files"] = sorted(n for n in TOKENIZER_FILES if (folder / n).is_file())
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    ordinary_modes(folder)  # the report and the plain folder too (export_pretrained did its own files)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
    os.replace(folder, out)


def _check_out(out: Path, ckpt: BaseCheckpoint, overwrite: bool) -> None:
    if ckpt.path is not None and out.expanduser().resolve() == ckpt.path:
        raise CheckpointError(f"{out} is the base folder; choose another output folder")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")


def convert_checkpoint(
    base: str | os.PathLike | BaseCheckpoint,
    out: str | os.PathLike,
    kv_layers: int | None = None,
    kv_groups: int | None = None,
    kv_owner: list[int] | str | None = None,
    merge: str = "mean",
    mlp_init: str = "zero",
    match_params: bool = True,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str = "2GB",
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
    random_init: bool = False,
    mlp_multiple: int = 1,
    seed: int = 0,
    revision: str | None = None,
) -> dict:
    """Convert a GPT-NeoX checkpoint (hub name at `revision`, or local folder) into a transformers folder `out`.

    Layout: `kv_layers` (m) owner layers with `kv_groups` (g) KV heads each, at the paper's uniform
    positions, or an explicit `kv_owner` map (list or '0,0,2,2'); unset values keep the base's (MHA).
    `merge`: 'mean' or 'sequential' (the reference code); `mlp_init`: 'zero' (function-preserving)
    or 'copy' (the reference code); `match_params=False` keeps the base's MLP width, `mlp_multiple`
    rounds the matched one (`core.matched_intermediate_size`); `dtype` defaults
    to the base's. The base is read one tensor at a time (peak memory about the converted model plus
    one base layer, plus transformers' saving buffers). Writes `out/conversion_report.json` (and
    `report_path` if given) and returns the report. Raises ConfigError for an invalid layout or
    option and CheckpointError for an unreadable base or an existing `out` without `overwrite`.
    `random_init`: the same layout and parameter count with GPT-NeoX's initialisation (`seed`) instead
    of the base's weights, the train-from-scratch baseline that uptraining is measured against.
    A checkpoint of the MLKV paper's reference code (`reference.py`) converts as it is: its own
    layout, weights and arithmetic (`unrotated_shared_keys`); layout options are then an error.
    """
    for value, allowed, what in ((merge, MERGE_MODES, "merge"), (mlp_init, MLP_INITS, "mlp_init")):
        if value not in allowed:
            raise ConfigError(f"{what} = '{value}' is not supported; allowed: {', '.join(allowed)}")
    out, out_dtype = Path(out), resolve_dtype(dtype)
    kv_owner = parse_owner_map(kv_owner)
    with _opened(base, revision) as ckpt:
        _check_out(out, ckpt, overwrite)
        if ckpt.reference:
            _check_reference_options(
                ckpt, kv_layers, kv_groups, kv_owner, random_init, merge, mlp_init, match_params, mlp_multiple
            )
            target = ckpt.config
        else:
            target = target_config(ckpt.config, kv_layers, kv_groups, kv_owner, match_params, mlp_multiple)
        with ckpt.tensors() as reader:
            prefix = weights_prefix(reader, ckpt.config)
            base_dtype = reader.dtype(f"{prefix}{family_of(ckpt.config).embed}")
            from tqdm.auto import tqdm

            layers = tqdm(
                range(target.num_layers),
                desc=f"convert to {target.layout.name}",
                unit="layer",
                leave=False,
                disable=not progress,
            )
            stream = dict(has=reader.__contains__, dtype=out_dtype, layers=layers, release=reader.release)
            if ckpt.reference:
                sd = reference_tensors(reader.get, target, prefix, **stream)
            elif random_init:
                torch.manual_seed(seed)
                sd = MLKVTransformer(target).state_dict()
                sd = {k: v.to(out_dtype or base_dtype) for k, v in sd.items()}
            else:
                sd = convert_tensors(reader.get, ckpt.config, target, merge, mlp_init, prefix, **stream)
        counted = _count_parameters(sd)
        if counted != target.num_parameters():  # the converted tensors must build exactly `target`
            raise RuntimeError(f"converted {counted} parameters, config expects {target.num_parameters()}")
        out_dtype = out_dtype or base_dtype
        report = conversion_report(
            ckpt.config,
            target,
            base_name=ckpt.name,
            out=str(out),
            merge=merge,
            mlp_init=mlp_init,
            match_params=match_params,
            mlp_multiple=mlp_multiple,
            base_dtype=base_dtype,
            out_dtype=out_dtype,
        )
        report["weight_files"] = [f.name for f in ckpt.files]
        report["init"] = f"random (seed {seed})" if random_init else "converted"
        if ckpt.reference:
            report.update(format=FORMAT, merge=None, mlp_init=None, match_params=None)
        _write_folder(sd, target, out, ckpt, out_dtype, max_shard_size, report, overwrite, progress)
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def load_base_model(name: str, revision: str | None = None, dtype: torch.dtype | None = None):
    """A base checkpoint (local folder, or hub name at `revision`) as our transformers model
    (`MLKVForCausalLM`), converted in memory to the layout it has: Pythia/GPT-NeoX and the Llama family
    as they are (the identity conversion), the paper's own layout and arithmetic for its format
    (`reference.py`). `dtype` defaults to the checkpoint's."""
    from ..configuration_mlkv import CONFIG_CLASSES
    from ..modeling_mlkv import MODEL_CLASSES

    with BaseCheckpoint.open(name, revision) as ckpt:
        with ckpt.tensors() as reader:
            prefix = weights_prefix(reader, ckpt.config)
            stream = dict(has=reader.__contains__, dtype=dtype, release=reader.release)
            if ckpt.reference:
                sd = reference_tensors(reader.get, ckpt.config, prefix, **stream)
            else:
                sd = convert_tensors(reader.get, ckpt.config, ckpt.config, prefix=prefix, **stream)
        family = ckpt.config.family
        hf_config = CONFIG_CLASSES[family].from_model_config(ckpt.config, **ckpt.hf_kwargs())
    with torch.device("meta"):
        model = MODEL_CLASSES[family](hf_config)
    model.load_state_dict({f"model.{k}": v for k, v in sd.items()}, strict=True, assign=True)
    model.config.dtype = sd["embed_in.weight"].dtype
    model.name_or_path = model.config._name_or_path = str(name)  # where lm-eval's HFLM finds the tokenizer
    return model.eval()


def _check_reference_options(
    ckpt: BaseCheckpoint, kv_layers, kv_groups, kv_owner, random_init: bool, merge, mlp_init, match_params, mlp_multiple
) -> None:
    """A reference checkpoint converts as it is: a flag that would change its layout, merge or MLP is refused."""
    given = [
        flag
        for flag, value in (
            ("--kv-layers", kv_layers),
            ("--kv-groups", kv_groups),
            ("--kv-owner-map", kv_owner),
            ("--random-init", random_init or None),
            (f"--merge {merge}", None if merge == "mean" else merge),
            (f"--mlp-init {mlp_init}", None if mlp_init == "zero" else mlp_init),
            ("--no-match-params", None if match_params else True),
            (f"--mlp-multiple {mlp_multiple}", None if mlp_multiple == 1 else mlp_multiple),
        )
        if value is not None
    ]
    if given:
        raise ConfigError(
            f"{ckpt.name} is a {FORMAT} checkpoint ({ckpt.config.layout.name}); it converts as it is, "
            f"so {', '.join(given)} do not apply (they are for multi-head bases)"
        )


def paper_variants(num_layers: int, num_heads: int, num_kv_heads: int | None = None) -> list[tuple[str, int, int]]:
    """The paper's eight layouts (its Table 2) for l layers and h heads: (folder name, m, g).

    For Pythia-160M (l = h = 12): gqa-48 (12, 4), mlkv-48 (4, 12), mqa-12 (12, 1), mlkv-12 (4, 3),
    mlkv-6 (6, 1), mlkv-4 (4, 1), mlkv-2 (2, 1), mlkv-1 (1, 1). Other shapes get the same roles:
    (l, h/3), (l/3, h), (l, 1), (l/3, 3), (l/2, 1), (l/3, 1), (l/6, 1), (1, 1), named by their KV
    heads; that needs l a multiple of 6 (at least 12) and h a multiple of 3 (at least 6), so that all
    eight exist and differ. Anything else is a ConfigError rather than a guessed approximation.

    A base that already shares K/V heads in a layer (`num_kv_heads` g_b < h: the Llama family) gets
    the same roles by halving, from its own g_b: the base's cache halved within layers (l, g_b/2) and
    across them (l/2, g_b), MQA (l, 1) and its equal across layers (l/2, 2), then one K/V head in
    l/2, l/4, l/8 owner layers and in one (Llama-3.2-1B, l = 16, g_b = 8: gqa-64, mlkv-64, mqa-16,
    mlkv-16, mlkv-8, mlkv-4, mlkv-2, mlkv-1); those a shape does not allow are left out.
    """
    if num_kv_heads is not None and num_kv_heads < num_heads:
        return _halving_variants(num_layers, num_heads, num_kv_heads)
    if num_layers % 6 or num_layers < 12 or num_heads % 3 or num_heads < 6:
        raise ConfigError(
            f"the paper variants need num_layers a multiple of 6 (at least 12) and num_heads a "
            f"multiple of 3 (at least 6), as Pythia-160M (12, 12); this base has l = {num_layers}, "
            f"h = {num_heads}: convert the layouts you want one at a time with --kv-layers/--kv-groups"
        )
    variants = []
    for _, m_of, g_of in PAPER_LAYOUTS:
        m, g = m_of(num_layers), g_of(num_heads)
        variants.append((KVLayout.uniform(num_layers, num_heads, m, g).name.lower(), m, g))
    return variants


def _halving_variants(l: int, h: int, g_b: int) -> list[tuple[str, int, int]]:
    candidates = [(l, g_b // 2), (l // 2, g_b), (l, 1), (l // 2, 2), (l // 2, 1), (l // 4, 1), (l // 8, 1), (1, 1)]
    variants, seen = [], set()
    for m, g in candidates:
        if m < 1 or g < 1 or g_b % g or (m, g) == (l, g_b) or (m, g) in seen:
            continue
        seen.add((m, g))
        variants.append((KVLayout.uniform(l, h, m, g).name.lower(), m, g))
    return variants


def convert_paper_variants(
    base: str | os.PathLike | BaseCheckpoint,
    out_root: str | os.PathLike,
    merge: str = "mean",
    mlp_init: str = "zero",
    match_params: bool = True,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str = "2GB",
    report_path: str | os.PathLike | None = None,
    progress: bool = True,
    revision: str | None = None,
    mlp_multiple: int = 1,
) -> list[dict]:
    """Convert `base` into each of `paper_variants(l, h)`, as `out_root/<name>` (e.g. `mlkv-6`).

    The base is resolved once and streamed once per variant. Checks every output folder before
    converting anything; writes `out_root/paper_variants.json` (and `report_path`) with the reports.
    """
    out_root = Path(out_root)
    with _opened(base, revision) as ckpt:
        if ckpt.reference:
            raise ConfigError(
                f"{ckpt.name} is a {FORMAT} checkpoint ({ckpt.config.layout.name}), not a multi-head base: "
                f"convert it with --out, without --paper-variants"
            )
        cfg = ckpt.config
        variants = paper_variants(cfg.num_layers, cfg.num_heads, cfg.num_kv_heads)
        for name, _, _ in variants:
            _check_out(out_root / name, ckpt, overwrite)
        from tqdm.auto import tqdm

        reports = []
        bar = tqdm(variants, desc="paper variants", unit="model", disable=not progress)
        for name, m, g in bar:
            bar.set_postfix_str(name)
            reports.append(
                convert_checkpoint(
                    ckpt,
                    out_root / name,
                    m,
                    g,
                    merge=merge,
                    mlp_init=mlp_init,
                    match_params=match_params,
                    mlp_multiple=mlp_multiple,
                    overwrite=overwrite,
                    dtype=dtype,
                    max_shard_size=max_shard_size,
                    progress=False,
                )
            )
    text = json.dumps(reports, indent=2) + "\n"
    (out_root / "paper_variants.json").write_text(text)
    if report_path is not None:
        Path(report_path).write_text(text)
    return reports


def format_variants_table(reports: list[dict]) -> str:
    """One row per converted variant: the paper's Table 2 columns plus the KV cache per token."""
    lines = [
        "| variant | m | g | KV heads | parameters | MLP size | KV bytes/token (fp16) | folder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if reports:  # the base, for comparison
        r = reports[0]
        lines.append(
            f"| {r['base_layout']} (base) | {r['num_layers']} | {r['num_heads']} | {r['kv_heads']['before']} | "
            f"{r['parameters']['before']:,} | {r['intermediate_size']['before']} | "
            f"{r['kv_bytes_per_token']['float16']['before']:,} | {r['base']} |"
        )
    for r in reports:
        lines.append(
            f"| {r['layout']} | {r['kv_layers']} | {r['kv_groups']} | {r['kv_heads']['after']} | "
            f"{r['parameters']['after']:,} | {r['intermediate_size']['after']} | "
            f"{r['kv_bytes_per_token']['float16']['after']:,} | {r['out']} |"
        )
    return "\n".join(lines)
