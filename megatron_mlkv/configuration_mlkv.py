"""transformers configs of our two families: GPTNeoXConfig or LlamaConfig plus the KV layout (`kv_owner`
and g: `num_kv_heads` for GPT-NeoX, `num_key_value_heads` for Llama), `unrotated_shared_keys` (GPT-NeoX)
and `attention_out_bias`, `base_model_type` (Llama; see `MLKVConfig`).

Copied next to exported checkpoints (transformers remote code).
"""

from transformers import GPTNeoXConfig, LlamaConfig

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


class MLKVLlamaConfig(LlamaConfig):
    """Llama attributes as transformers names them (`num_key_value_heads` is g), plus the owner map, the
    attention output's bias (Qwen2 has none where q, k and v have one) and the base's model type."""

    model_type = "mlkv_llama"
    _auto_class = "AutoConfig"
    kv_owner: list[int] | None = None
    attention_out_bias: bool | None = None
    base_model_type: str = "llama"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.kv_owner is None:
            self.kv_owner = list(range(self.num_hidden_layers))
        self.kv_owner = [int(o) for o in self.kv_owner]
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        self.model_config()  # validates the layout against the shape

    def model_config(self) -> MLKVConfig:
        return MLKVConfig.from_hf(self)

    @classmethod
    def from_model_config(cls, config: MLKVConfig, **kwargs) -> "MLKVLlamaConfig":
        return cls(**config.to_hf_kwargs(), **kwargs)


CONFIG_CLASSES = {"gpt_neox": MLKVGPTNeoXConfig, "llama": MLKVLlamaConfig}
