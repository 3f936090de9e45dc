"""The model configuration: GPT-NeoX hyper-parameters plus the KV sharing layout, validated once.

This file is copied next to exported checkpoints (transformers remote code): standard library and
relative imports only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import MLKVError
from .layout import KVLayout, LayoutError

ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")


class ConfigError(MLKVError):
    """An invalid model configuration; the message names the field."""


@dataclass
class MLKVConfig:
    """A GPT-NeoX decoder whose layers may share key/value activations (see `KVLayout`).

    `num_kv_heads` (g) defaults to `num_heads` and `kv_owner` to every layer owning its K/V, which
    is plain GPT-NeoX.

    `unrotated_shared_keys` reproduces the reference code of the MLKV paper (pythia-mlkv): an owner
    attends with its rotated keys but hands its keys *before* the rotary embedding to the layers it
    serves, which rotate only their queries. Checkpoints trained that way (the paper's released
    models) are only faithful under that arithmetic. A cache then keeps the unrotated keys of each
    serving owner beside its rotated ones (`cached_key_slots`).
    """

    vocab_size: int = 50304
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_kv_heads: int | None = None
    kv_owner: tuple[int, ...] | None = None
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    unrotated_shared_keys: bool = False
    layout: KVLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} = {value!r} must be a positive integer")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size = {self.hidden_size} must be divisible by num_heads = {self.num_heads}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct = {self.rotary_pct} must be in (0, 1]")
        if self.rotary_dim % 2:
            raise ConfigError(
                f"rotary_pct = {self.rotary_pct} gives {self.rotary_dim} rotary dims of "
                f"head_dim {self.head_dim}; it must be even"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act = '{self.hidden_act}' is not supported; allowed: {', '.join(ACTIVATIONS)}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        self.kv_owner = tuple(range(self.num_layers)) if self.kv_owner is None else tuple(self.kv_owner)
        try:
            self.layout = KVLayout(self.num_layers, self.num_heads, self.num_kv_heads, self.kv_owner)
        except LayoutError as e:
            raise ConfigError(str(e)) from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def cached_key_slots(self) -> int:
        """Key slots of a cache: the m owners', plus one of unrotated keys per serving owner under
        `unrotated_shared_keys` (`KVLayout.unrotated_key_slot`). Values always take m slots."""
        extra = len(self.layout.serving_owners) if self.unrotated_shared_keys else 0
        return self.layout.kv_layers + extra

    def cache_elements(self, batch: int, seq: int) -> int:
        """Elements a cache of `batch` rows of `seq` tokens holds: `KVLayout.cache_elements` plus the
        unrotated keys of `unrotated_shared_keys`."""
        per_slot = batch * seq * self.num_kv_heads * self.head_dim
        return (self.cached_key_slots + self.layout.kv_layers) * per_slot

    def with_layout(
        self, kv_layers: int | None = None, kv_groups: int | None = None, kv_owner: list[int] | None = None, **changes
    ) -> MLKVConfig:
        """A copy with a new KV layout: uniform (m, g) or an explicit owner map, plus other `changes`."""
        g = self.num_kv_heads if kv_groups is None else kv_groups
        if kv_owner is None:
            m = self.layout.kv_layers if kv_layers is None else kv_layers
            try:
                kv_owner = KVLayout.uniform(self.num_layers, self.num_heads, m, g).kv_owner
            except LayoutError as e:
                raise ConfigError(str(e)) from None
        elif kv_layers is not None and len(set(kv_owner)) != kv_layers:
            raise ConfigError(f"kv_owner has {len(set(kv_owner))} owner layers but kv_layers = {kv_layers}")
        return dataclasses.replace(self, num_kv_heads=g, kv_owner=tuple(kv_owner), **changes)

    def num_parameters(self) -> int:
        """Exact parameter count of the model this config builds (tied embeddings counted once)."""
        d, dk, h, g, inter = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, self.intermediate_size
        bias = int(self.attention_bias)
        attention = (d + bias) * h * dk + (h * dk + bias) * d
        kv = 2 * (d + bias) * g * dk
        mlp = (d + 1) * inter + (inter + 1) * d
        per_layer = 4 * d + attention + mlp
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return embeddings + 2 * d + self.num_layers * per_layer + self.layout.kv_layers * kv

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6·N + 12·l·d·s, N = matmul weights outside the input embedding.

        N counts the K/V projections of owner layers only, so MLKV's saved compute shows up in MFU.
        """
        d, dk = self.hidden_size, self.head_dim
        attention = 2 * d * self.num_heads * dk
        mlp = 2 * d * self.intermediate_size
        kv = 2 * d * self.num_kv_heads * dk
        n = self.num_layers * (attention + mlp) + self.layout.kv_layers * kv + d * self.vocab_size
        return 6 * n + 12 * self.num_layers * d * seq_len

    # --- transformers config interchange (attribute names of GPTNeoXConfig) ---

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> MLKVConfig:
        """Read a transformers `GPTNeoXConfig` (or our exported config) into an `MLKVConfig`."""
        rope = getattr(hf_config, "rope_parameters", None) or {}
        values = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            num_kv_heads=getattr(hf_config, "num_kv_heads", None),
            kv_owner=getattr(hf_config, "kv_owner", None),
            rotary_pct=rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 0.25)),
            rotary_emb_base=rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0)),
            max_position_embeddings=hf_config.max_position_embeddings,
            layer_norm_eps=hf_config.layer_norm_eps,
            use_parallel_residual=hf_config.use_parallel_residual,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=getattr(hf_config, "attention_bias", True),
            hidden_act=hf_config.hidden_act,
            initializer_range=getattr(hf_config, "initializer_range", 0.02),
            unrotated_shared_keys=bool(getattr(hf_config, "unrotated_shared_keys", False)),
        )
        for name in ("attention_dropout", "hidden_dropout"):
            if getattr(hf_config, name, 0.0):
                raise ConfigError(f"{name} = {getattr(hf_config, name)}: dropout is not supported (Pythia uses 0)")
        values.update(overrides)
        return cls(**values)

    def to_hf_kwargs(self) -> dict:
        """Keyword arguments for a transformers GPT-NeoX-style config (plus the KV layout)."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            num_kv_heads=self.num_kv_heads,
            kv_owner=list(self.kv_owner),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rotary_emb_base,
                "partial_rotary_factor": self.rotary_pct,
            },
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=self.layer_norm_eps,
            use_parallel_residual=self.use_parallel_residual,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
            unrotated_shared_keys=self.unrotated_shared_keys,
        )


# The Pythia suite's shapes (EleutherAI/pythia-*): l layers, d hidden, h heads, 4d MLP, partial rotary 0.25.
PYTHIA_SHAPES = {
    "pythia-70m": dict(num_layers=6, hidden_size=512, num_heads=8),
    "pythia-160m": dict(num_layers=12, hidden_size=768, num_heads=12),
    "pythia-410m": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "pythia-1b": dict(num_layers=16, hidden_size=2048, num_heads=8),
    "pythia-1.4b": dict(num_layers=24, hidden_size=2048, num_heads=16),
    "pythia-2.8b": dict(num_layers=32, hidden_size=2560, num_heads=32),
}


def preset(name: str, **changes) -> MLKVConfig:
    """The MHA config of a Pythia shape (e.g. 'pythia-160m'), with optional field `changes`."""
    key = name.lower().removeprefix("eleutherai/").removesuffix("-deduped")
    if key not in PYTHIA_SHAPES:
        raise ConfigError(f"unknown preset '{name}'; known: {', '.join(PYTHIA_SHAPES)}")
    shape = PYTHIA_SHAPES[key]
    values = dict(vocab_size=50304, intermediate_size=4 * shape["hidden_size"], **shape)
    values.update(changes)
    return MLKVConfig(**values)
