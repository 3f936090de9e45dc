"""The KV sharing layout: which layers own key/value heads, how many, and what the cache costs.

Everything that needs to know the layout (model, conversion, tensor parallelism, cache, benchmarks)
asks this module instead of recomputing it. Layers and heads are 0-based here; the paper's 1-based
rules are noted where they are implemented.

This file is copied next to exported checkpoints (transformers remote code), so it imports only the
standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MLKVError

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1}


class LayoutError(MLKVError):
    """An invalid KV layout; the message names the offending value and what is allowed."""


def uniform_owners(num_layers: int, kv_layers: int) -> list[int]:
    """The paper's owner layers for m of l layers: `[0] + [int((i+1)*l/m) for i in range(m-1)]`.

    For l/m an integer this is layer n (1-based) taking KV from floor((n-1)/(l/m)) + 1.
    """
    if not 1 <= kv_layers <= num_layers:
        raise LayoutError(f"kv_layers (m) = {kv_layers} must be between 1 and num_layers = {num_layers}")
    return [0] + [int((i + 1) * num_layers / kv_layers) for i in range(kv_layers - 1)]


@dataclass(frozen=True)
class KVLayout:
    """l layers with h query heads each; `kv_owner[i]` is the layer whose K/V layer i attends with.

    Owner layers (kv_owner[i] == i) project `num_kv_heads` (g) K/V heads; query head i uses KV head
    i // (h // g) (the paper's j = floor((i-1)/(h/g)) + 1, 1-based).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    kv_owner: tuple[int, ...]

    def __post_init__(self):
        l, h, g = self.num_layers, self.num_heads, self.num_kv_heads
        if l < 1 or h < 1:
            raise LayoutError(f"num_layers = {l} and num_heads = {h} must be positive")
        if g < 1 or h % g:
            raise LayoutError(
                f"kv_groups (g) = {g} must divide num_heads (h) = {h}; "
                f"allowed: {[d for d in range(1, h + 1) if h % d == 0]}"
            )
        owner = tuple(int(o) for o in self.kv_owner)
        object.__setattr__(self, "kv_owner", owner)
        if len(owner) != l:
            raise LayoutError(f"kv_owner has {len(owner)} entries, expected one per layer ({l})")
        for i, o in enumerate(owner):
            if not 0 <= o <= i:
                raise LayoutError(f"kv_owner[{i}] = {o}: a layer takes K/V from itself or a lower layer (0..{i})")
            if owner[o] != o:
                raise LayoutError(
                    f"kv_owner[{i}] = {o}, but layer {o} does not own K/V "
                    f"(kv_owner[{o}] = {owner[o]}); owners must map to themselves"
                )

    @classmethod
    def uniform(cls, num_layers: int, num_heads: int, kv_layers: int, kv_groups: int) -> KVLayout:
        """m owner layers at the paper's positions, each serving the layers up to the next owner."""
        owners = uniform_owners(num_layers, kv_layers)
        owner_of = [max(o for o in owners if o <= i) for i in range(num_layers)]
        return cls(num_layers, num_heads, kv_groups, tuple(owner_of))

    @classmethod
    def mha(cls, num_layers: int, num_heads: int) -> KVLayout:
        return cls.uniform(num_layers, num_heads, num_layers, num_heads)

    @property
    def owners(self) -> tuple[int, ...]:
        """The owner layers in increasing order."""
        return tuple(i for i, o in enumerate(self.kv_owner) if o == i)

    @property
    def kv_layers(self) -> int:
        """m, the number of layers that own K/V."""
        return len(self.owners)

    @property
    def query_group_size(self) -> int:
        """h / g: query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def is_uniform(self) -> bool:
        return self == KVLayout.uniform(self.num_layers, self.num_heads, self.kv_layers, self.num_kv_heads)

    @property
    def name(self) -> str:
        """The paper's naming: MHA, GQA-<m·g>, MQA-<m>, MLKV-<m·g> (m < l)."""
        l, h, m, g = self.num_layers, self.num_heads, self.kv_layers, self.num_kv_heads
        if m == l:
            return "MHA" if g == h else ("MQA" if g == 1 else "GQA") + f"-{m * g}"
        return f"MLKV-{m * g}"

    def owns_kv(self, layer: int) -> bool:
        return self.kv_owner[layer] == layer

    def cache_slot(self, layer: int) -> int:
        """Index of the owner of `layer` among the owners: where its K/V live in a cache of m slots."""
        return self.owners.index(self.kv_owner[layer])

    @property
    def serving_owners(self) -> tuple[int, ...]:
        """The owner layers whose K/V other layers reuse (owners that serve only themselves excluded)."""
        return tuple(o for o in self.owners if self.kv_owner.count(o) > 1)

    def unrotated_key_slot(self, layer: int) -> int | None:
        """Where the unrotated keys of `layer`'s owner live in a cache that keeps them
        (`MLKVConfig.unrotated_shared_keys`): after the m slots, one per serving owner; None when the
        owner serves no other layer."""
        owner = self.kv_owner[layer]
        serving = self.serving_owners
        return self.kv_layers + serving.index(owner) if owner in serving else None

    def served_layers(self, owner: int) -> tuple[int, ...]:
        """The layers (the owner included) that attend with `owner`'s K/V."""
        return tuple(i for i, o in enumerate(self.kv_owner) if o == owner)

    def kv_heads_total(self) -> int:
        """m·g: the K/V heads stored per token."""
        return self.kv_layers * self.num_kv_heads

    def cache_elements(self, batch: int, seq: int, head_dim: int) -> int:
        """2·b·s·m·g·d_k, the number of cached K and V elements."""
        return 2 * batch * seq * self.kv_heads_total() * head_dim

    def kv_bytes_per_token(self, head_dim: int, dtype: str = "fp16") -> int:
        return self.cache_elements(1, 1, head_dim) * dtype_bytes(dtype)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "kv_layers": self.kv_layers,
            "num_kv_heads": self.num_kv_heads,
            "kv_owner": list(self.kv_owner),
            "kv_heads_total": self.kv_heads_total(),
        }


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise LayoutError(f"dtype '{dtype}' is not known; allowed: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def cache_size_table(
    layers: int, heads: int, head_dim: int, batch: int, seq: int, kv_layers: int, kv_groups: int, dtype: str = "fp16"
) -> list[dict]:
    """The paper's Table 1 for one shape: elements, bytes, GiB and ratio to MHA of each scheme.

    MHA 2·b·s·l·h·d_k, GQA 2·b·s·l·g·d_k, MQA 2·b·s·l·d_k, MLKV 2·b·s·m·g·d_k.
    """
    schemes = [
        ("MHA", "2*b*s*l*h*d_k", KVLayout.uniform(layers, heads, layers, heads)),
        ("GQA", "2*b*s*l*g*d_k", KVLayout.uniform(layers, heads, layers, kv_groups)),
        ("MQA", "2*b*s*l*d_k", KVLayout.uniform(layers, heads, layers, 1)),
        ("MLKV", "2*b*s*m*g*d_k", KVLayout.uniform(layers, heads, kv_layers, kv_groups)),
    ]
    size = dtype_bytes(dtype)
    mha = schemes[0][2].cache_elements(batch, seq, head_dim)
    rows = []
    for scheme, formula, layout in schemes:
        elements = layout.cache_elements(batch, seq, head_dim)
        rows.append(
            {
                "scheme": scheme,
                "formula": formula,
                "kv_heads_total": layout.kv_heads_total(),
                "elements": elements,
                "bytes": elements * size,
                "gib": elements * size / 2**30,
                "ratio_to_mha": elements / mha,
            }
        )
    return rows


def format_cache_table(rows: list[dict]) -> str:
    """`cache_size_table` rows as a markdown table."""
    lines = ["| scheme | formula | KV heads | elements | bytes | GiB | vs MHA |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['scheme']} | {r['formula']} | {r['kv_heads_total']} | {r['elements']:,} | "
            f"{r['bytes']:,} | {r['gib']:.3f} | {r['ratio_to_mha']:.4f} |"
        )
    return "\n".join(lines)
