"""transformers config for MLKV GPT-NeoX: GPTNeoXConfig plus the KV layout (`num_kv_heads`, `kv_owner`)
and `unrotated_shared_keys` (see `MLKVConfig`).

Copied next to exported checkpoints (transformers remote code).
"""

from transformers import GPTNeoXConfig

from .config import MLKVConfig


class MLKVGPTNeoXConfig(GPTNeoXConfig):
    """GPT-NeoX attributes as transformers names them, plus g (`num_kv_heads`) and the owner map."""

    model_type = "mlkv_gpt_neox"
    _auto_class = "AutoConfig"
    num_kv_heads: int | None = None
    kv_owner: list[int] | None = None
    unrotated_shared_keys: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.kv_owner is None:
            self.kv_owner = list(range(self.num_hidden_layers))
        self.kv_owner = [int(o) for o in self.kv_owner]
        self.model_config()  # validates the layout against the shape

    def model_config(self) -> MLKVConfig:
        return MLKVConfig.from_hf(self)

    @classmethod
    def from_model_config(cls, config: MLKVConfig, **kwargs) -> "MLKVGPTNeoXConfig":
        return cls(**config.to_hf_kwargs(), **kwargs)
