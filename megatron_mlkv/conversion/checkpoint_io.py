"""Reading a base checkpoint: its config, its weight files one tensor at a time (safetensors and
torch pickles, local or from the hub), its tokenizer."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import LLAMA_MODEL_TYPES, ConfigError, MLKVConfig
from ..errors import CheckpointError, first_line
from ..hf import TOKENIZER_FILES, special_token_ids
from .reference import is_reference_config, reference_config

SUPPORTED = (
    "GPTNeoXForCausalLM (model_type 'gpt_neox': Pythia, GPT-NeoX, the MLKV paper's pythia-mlkv models), "
    "LlamaForCausalLM ('llama': Llama, SmolLM), Qwen2ForCausalLM ('qwen2'), MistralForCausalLM ('mistral')"
)
MODEL_TYPES = ("gpt_neox", *LLAMA_MODEL_TYPES)
# Weight files in the order transformers prefers them: safetensors over pickles, index over single.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# --------------------------------------------------------------------------------------------
# Reading a base checkpoint: config, weight files, tokenizer
# --------------------------------------------------------------------------------------------


# safetensors dtype codes (the format's header) -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _SafetensorsFile:
    """One .safetensors file read with plain file reads into private memory.

    Not `safe_open(...).get_tensor`: that returns views of a memory map of the whole file, which
    stays mapped while any tensor from it lives, so every page the conversion touches stays in the
    process's resident memory until the end and the peak reaches base + output. `safe_open` is still
    used once to validate the header (a truncated file fails there).
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt"):
                pass
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
        except Exception as e:  # SafetensorError for a truncated or damaged file
            raise CheckpointError(f"{path}: corrupt or unreadable weight file ({first_line(e)})") from None
        header.pop("__metadata__", None)
        self.entries, self.data_start = header, 8 + size
        self._file = open(path, "rb")

    def keys(self):
        return self.entries.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor '{name}' has dtype {entry['dtype']}, which conversion "
                f"does not read; allowed: {', '.join(SAFETENSORS_DTYPES)}"
            )
        dtype, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["data_offsets"]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        data = torch.empty(end - begin, dtype=torch.uint8)  # uninitialised: the read fills it
        self._file.seek(self.data_start + begin)
        if self._file.readinto(data.numpy()) != end - begin:
            raise CheckpointError(f"{self.path}: truncated while reading tensor '{name}'")
        return data.view(dtype).reshape(entry["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.entries[name]["dtype"])

    def release(self) -> None:
        """Nothing is mapped: reads leave no pages in the process."""

    def close(self) -> None:
        self._file.close()


class _PickleFile:
    """One `pytorch_model.bin` (torch.save zip), memory-mapped and copied out tensor by tensor.

    Every tensor of a mapped pickle is a view of one mapping of the whole file, and the pages read
    stay resident until the mapping goes; `release()` drops it (after each layer), and the next
    `get_tensor` maps the file again (cheap: only the pickle's index is read). Legacy non-zip
    pickles cannot be mapped and are loaded whole once.
    """

    def __init__(self, path: Path):
        self.path = path
        self.mappable = True
        self._state = self._load()
        self._keys = list(self._state)

    def _load(self) -> dict:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self.mappable)
        except Exception as mmap_error:  # legacy pickles cannot be mapped; damaged zips fail both ways
            try:
                state, self.mappable = torch.load(self.path, map_location="cpu", weights_only=True), False
            except Exception:
                raise CheckpointError(
                    f"{self.path}: corrupt or unreadable weight file ({first_line(mmap_error)})"
                ) from None
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{self.path}: expected a state dict (tensor name -> tensor), found {type(state).__name__}"
            )
        return state

    def keys(self):
        return self._keys

    def get_tensor(self, name: str) -> torch.Tensor:
        if self._state is None:
            self._state = self._load()
        tensor = self._state[name]
        return tensor.clone() if self.mappable else tensor

    def dtype(self, name: str) -> torch.dtype:
        if self._state is None:
            self._state = self._load()
        return self._state[name].dtype

    def release(self) -> None:
        if self.mappable:
            self._state = None

    def close(self) -> None:
        self._state = None


def _return_freed_memory() -> None:
    """Give memory freed by the last layer back to the OS (glibc only; elsewhere a no-op).

    glibc serves blocks under its (adaptive, up to 32 MB) mmap threshold from the heap, and a
    layer's freed transients (the fused QKV, float32 copies) sit between blocks the output keeps,
    so without a trim they stay resident: measured on a 1.4B fp16 checkpoint, the peak drops from
    1.43x to 1.04x the checkpoint size.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass


class WeightReader:
    """Tensors of a checkpoint's weight files (safetensors or `pytorch_model.bin`, sharded or not),
    read one at a time on request into private memory; `release()` returns what reading left
    resident (call it after each layer). Every error names the file."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, int] = {}  # tensor name -> index into self.files / self._handles
        self._handles: list = []
        try:
            for index, path in enumerate(self.files):
                if not path.is_file():
                    raise CheckpointError(f"{path}: missing weight file")
                handle = _SafetensorsFile(path) if path.name.endswith(".safetensors") else _PickleFile(path)
                self._handles.append(handle)
                for name in handle.keys():
                    self._where[name] = index
        except BaseException:
            self.close()
            raise

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`; a CheckpointError naming the files if it is absent or unreadable."""
        if name not in self._where:
            where = self.files[0].parent
            raise CheckpointError(
                f"{where}: tensor '{name}' is missing from the weight files ({', '.join(f.name for f in self.files)})"
            )
        index = self._where[name]
        try:
            tensor = self._handles[index].get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.files[index]}: cannot read tensor '{name}' ({first_line(e)})") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{self.files[index]}: tensor '{name}' holds NaN or infinite values; "
                f"a base with non-finite weights cannot be converted"
            )
        return tensor

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of tensor `name`, without reading it."""
        return self._handles[self._where[name]].dtype(name) if name in self._where else None

    def release(self) -> None:
        for handle in self._handles:
            handle.release()
        _return_freed_memory()

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        self._where.clear()


def looks_local(base: str) -> bool:
    """True for an existing path or one that cannot be a hub name ('owner/name' or 'name')."""
    text = str(base)
    return (
        Path(text).expanduser().exists()
        or text.startswith(("/", ".", "~", "\\"))
        or text.count("/") > 1
        or os.sep != "/"
        and os.sep in text
    )


def _resolve(base: str, filename: str, local: bool, revision: str | None = None) -> Path | None:
    """The local path of `filename` in the base (downloaded for hub names at `revision`), or None if absent."""
    if local:
        path = Path(base).expanduser() / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(base, filename, revision=revision, _raise_exceptions_for_missing_entries=False)
    except Exception as e:  # no network, gated or unknown repository
        raise CheckpointError(f"{base}: cannot fetch {filename} from the hub ({first_line(e)})") from None
    return Path(found) if found else None


def weight_files(base: str, local: bool | None = None, revision: str | None = None) -> list[Path]:
    """The base's weight files, in transformers' order of preference: sharded or single safetensors,
    then sharded or single `pytorch_model.bin`. A shard listed in an index must exist."""
    local = looks_local(base) if local is None else local
    for filename in WEIGHT_FILES:
        path = _resolve(base, filename, local, revision)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: corrupt index file ({first_line(e)})") from None
        files = []
        for shard in shards:
            found = _resolve(base, shard, local, revision)
            if found is None:
                missing = Path(base) / shard if local else f"{base}/{shard}"
                raise CheckpointError(f"{missing}: missing weight file (listed in {filename})")
            files.append(found)
        return files
    raise CheckpointError(f"{base}: no weight file; expected one of {', '.join(WEIGHT_FILES)}")


def _peek_model_type(base: str, local: bool, revision: str | None = None) -> str | None:
    """`model_type` from config.json read as plain JSON, before transformers (which refuses unknown
    types and asks about remote code) sees it; None if it cannot be read."""
    try:
        path = _resolve(base, "config.json", local, revision)
        return json.loads(path.read_text()).get("model_type") if path else None
    except (CheckpointError, OSError, ValueError, AttributeError):
        return None


def load_base_config(base: str, local: bool | None = None, revision: str | None = None):
    """`AutoConfig.from_pretrained(base)`, refusing anything but `MODEL_TYPES` (GPT-NeoX plain or in the
    MLKV paper's reference format, `reference.is_reference_config`; Llama, Qwen2, Mistral) in one line."""
    from transformers import AutoConfig

    local = looks_local(base) if local is None else local
    if local and not Path(base).expanduser().is_dir():
        raise CheckpointError(f"{base}: no such folder (and not a hub model name)")
    if local and not (Path(base).expanduser() / "config.json").is_file():
        raise CheckpointError(f"{base}: no config.json; expected a transformers folder of {SUPPORTED}")
    model_type = _peek_model_type(base, local, revision)
    if model_type not in (None, *MODEL_TYPES):
        _refuse(base, model_type, _peek_architectures(base, local, revision))
    try:
        # trust_remote_code=False: a folder with custom code is refused, never run or prompted for
        hf_config = AutoConfig.from_pretrained(
            str(Path(base).expanduser()) if local else base, revision=revision, trust_remote_code=False
        )
    except Exception as e:  # no network, unknown repository, damaged config.json
        where = "" if local else "not a local folder, and the hub cannot provide it: "
        raise CheckpointError(f"{base}: {where}cannot read the config ({first_line(e)})") from None
    if hf_config.model_type not in MODEL_TYPES:
        _refuse(base, hf_config.model_type, getattr(hf_config, "architectures", None))
    return hf_config


def _peek_architectures(base: str, local: bool, revision: str | None = None) -> list[str] | None:
    try:
        archs = json.loads(_resolve(base, "config.json", local, revision).read_text()).get("architectures")
        return archs if isinstance(archs, list) else None
    except (CheckpointError, OSError, ValueError, AttributeError):
        return None


def _refuse(base: str, model_type: str, archs: list[str] | None):
    found = f"model_type '{model_type}'" + (f" ({', '.join(archs)})" if archs else "")
    hint = "; it is already converted" if model_type in ("mlkv_gpt_neox", "mlkv_llama") else ""
    raise CheckpointError(f"{base}: {found} is not supported{hint}; supported: {SUPPORTED}")


def _tokenizer_source(base: str, local: bool, tmp: Path | None, revision: str | None = None) -> Path | None:
    """A folder holding the base's tokenizer files: the base folder itself, or for hub names the
    files fetched into `tmp`. None (not an error) when the base has none.

    Hub files are copied as they are rather than re-saved through AutoTokenizer: transformers 5
    builds an empty GPT-NeoX tokenizer for a repository without tokenizer files, which would be
    written out as if it were the base's.
    """
    if local:
        folder = Path(base).expanduser()
        return folder if any((folder / n).is_file() for n in TOKENIZER_FILES) else None
    found = []
    for name in TOKENIZER_FILES:
        try:
            path = _resolve(base, name, local=False, revision=revision)
        except CheckpointError:  # a tokenizer that cannot be fetched does not stop the conversion
            path = None
        if path is not None:
            shutil.copy2(path, tmp / name)
            found.append(name)
    return tmp if found else None


@dataclass
class BaseCheckpoint:
    """A GPT-NeoX base resolved once for one or more conversions: its transformers config, the
    `MLKVConfig` read from it, its weight files and where its tokenizer files are. `reference`: the
    MLKV paper's own format (`reference.py`), whose config already holds its layout.

    Open with `BaseCheckpoint.open(name_or_folder, revision)` (a context manager: closing removes the
    temporary folder of a tokenizer fetched from the hub).
    """

    name: str
    hf_config: object
    config: MLKVConfig
    files: list[Path]
    local: bool
    tokenizer_dir: Path | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    reference: bool = False

    @classmethod
    def open(cls, base: str | os.PathLike, revision: str | None = None) -> BaseCheckpoint:
        name = str(base)
        local = looks_local(name)
        if local and revision is not None:
            raise CheckpointError(f"{name}: --revision applies to hub names, not to a local folder")
        hf_config = load_base_config(name, local, revision)
        reference = is_reference_config(hf_config)
        try:
            config = reference_config(hf_config, name) if reference else MLKVConfig.from_hf(hf_config)
        except ConfigError as e:
            raise ConfigError(str(e) if reference else f"{name}: {e}") from None
        files = weight_files(name, local, revision)
        tmp = None if local else tempfile.TemporaryDirectory(prefix="mlkv-tokenizer-")
        tokenizer = _tokenizer_source(name, local, Path(tmp.name) if tmp else None, revision)
        return cls(name, hf_config, config, files, local, tokenizer, tmp, reference)

    @property
    def path(self) -> Path | None:
        return Path(self.name).expanduser().resolve() if self.local else None

    def hf_kwargs(self) -> dict:
        """Config attributes of the base kept in the converted config (special token ids)."""
        return special_token_ids(self.hf_config)

    @contextmanager
    def tensors(self) -> Iterator[WeightReader]:
        reader = WeightReader(self.files)
        try:
            yield reader
        finally:
            reader.close()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def _opened(base, revision: str | None = None) -> Iterator[BaseCheckpoint]:
    """`base` as a BaseCheckpoint: opened (and closed) here unless the caller passed one."""
    if isinstance(base, BaseCheckpoint):
        yield base
        return
    with BaseCheckpoint.open(base, revision) as ckpt:
        yield ckpt


def weights_prefix(reader: WeightReader, config: MLKVConfig) -> str:
    """The decoder's prefix in the weight files: 'gpt_neox.' (GPTNeoXForCausalLM) or 'model.' (the Llama
    family's *ForCausalLM), '' for a bare decoder."""
    from .core import family_of

    family = family_of(config)
    for prefix in family.prefixes:
        if f"{prefix}{family.embed}" in reader:
            return prefix
    raise CheckpointError(
        f"{reader.files[0].parent}: no {family.name} weights ({family.prefixes[0]}{family.embed}) in "
        f"{', '.join(f.name for f in reader.files)}"
    )
