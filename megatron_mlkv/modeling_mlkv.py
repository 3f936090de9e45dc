"""transformers wrapper (`PreTrainedModel` + `GenerationMixin`) over the one model implementation.

`save_pretrained` copies this file and its relative imports into the folder and writes `auto_map`,
so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` works without this package.
"""
import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mlkv import MLKVGPTNeoXConfig
from .model import MLKVTransformer, init_weights


class MLKVForCausalLM(PreTrainedModel, GenerationMixin):
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

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                labels=None, use_cache=None, logits_to_keep=0, inputs_embeds=None, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("MLKVForCausalLM takes input_ids, not inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()  # filled with the m owner layers only (cache slots 0..m-1)
        hidden = self.model.hidden_states(input_ids, position_ids, attention_mask,
                                          cache=past_key_values if use_cache else None)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.model.embed_out(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
