"""transformers wrapper (`PreTrainedModel` + `GenerationMixin`) over the one model implementation.

`save_pretrained` copies this file and its relative imports into the folder and writes `auto_map`,
so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works without this package.
"""

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mlkv import MLKVGPTNeoXConfig, MLKVLlamaConfig
from .model import MLKVTransformer, init_weights

# transformers 5.24 renamed the outputs' `past_key_values` field to `cache` (the old name still works, with a warning)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
LOSS_KWARGS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})  # passed on to `loss_function`


class MLKVForCausalLM(PreTrainedModel, GenerationMixin):
    """The GPT-NeoX family's model (`MLKVLlamaForCausalLM`: the Llama family's) for transformers."""

    config_class = MLKVGPTNeoXConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _auto_class = "AutoModelForCausalLM"
    _tied_weights_keys = {"model.embed_out.weight": "model.embed_in.weight"}

    def __init__(self, config: MLKVGPTNeoXConfig):
        super().__init__(config)
        self.model = MLKVTransformer(config.model_config())
        self.post_init()

    def _init_weights(self, module):
        init_weights(module, self.config.initializer_range)

    def get_input_embeddings(self):
        return self.model.embed_in

    def set_input_embeddings(self, value):
        self.model.embed_in = value

    def get_output_embeddings(self):
        return self.model.embed_out

    def set_output_embeddings(self, value):
        self.model.embed_out = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        inputs_embeds=None,
        **kwargs,
    ):
        """input_ids (b, s) -> logits (b, s, vocab), the loss when `labels` is given, and the cache.

        The cache comes in as `past_key_values` or, from transformers 5.24's `generate`, as `cache`;
        it holds the m owner layers only (cache slots 0..m-1). Any other argument this model cannot
        honour is an error, not silently dropped.
        """
        cache = kwargs.pop("cache", None)
        if cache is not None and past_key_values is not None:
            raise ValueError("MLKVForCausalLM.forward: pass the cache as `cache` or `past_key_values`, not both")
        cache = past_key_values if cache is None else cache
        cache_position = kwargs.pop("cache_position", None)  # transformers < 5.24 passes it; the cache knows it
        return_dict = kwargs.pop("return_dict", None)
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(flag, None):
                raise ValueError(f"MLKVForCausalLM.forward: {flag}=True is not supported")
        unknown = sorted(set(kwargs) - LOSS_KWARGS)
        if unknown:
            raise TypeError(f"MLKVForCausalLM.forward: unexpected argument(s) {', '.join(unknown)}")
        if inputs_embeds is not None:
            raise ValueError("MLKVForCausalLM.forward takes input_ids, not inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"MLKVForCausalLM.forward: attention_mask must be (batch, seq) with 1 for real tokens, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache_position is not None:
            past = cache.get_seq_length() if use_cache else 0
            if cache_position.numel() != input_ids.shape[1] or int(cache_position[0]) != past:
                raise ValueError(
                    f"MLKVForCausalLM.forward: cache_position must continue the cache "
                    f"({past}, {past + 1}, ...), got {cache_position.tolist()}"
                )
        hidden = self.model.hidden_states(input_ids, position_ids, attention_mask, cache=cache if use_cache else None)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.model.embed_out(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is not False else out.to_tuple()


class MLKVLlamaForCausalLM(MLKVForCausalLM):
    """The Llama family's (Llama, Qwen2, Mistral) model for transformers: its config class differs."""

    config_class = MLKVLlamaConfig


MODEL_CLASSES = {"gpt_neox": MLKVForCausalLM, "llama": MLKVLlamaForCausalLM}
