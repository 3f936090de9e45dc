"""Small shared builders for tests: tiny configs, GPT-NeoX oracles, exported checkpoints."""
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from megatron_mlkv.config import MLKVConfig
from megatron_mlkv.convert import convert_state_dict
from megatron_mlkv.model import MLKVTransformer


def tiny_config(**changes) -> MLKVConfig:
    values = dict(vocab_size=101, hidden_size=64, num_layers=4, num_heads=4, intermediate_size=96,
                  max_position_embeddings=64)
    values.update(changes)
    return MLKVConfig(**values)


def gpt_neox(seed=0, std=0.2, **hf_kwargs) -> GPTNeoXForCausalLM:
    """A random GPT-NeoX with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    values = dict(vocab_size=101, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64)
    values.update(hf_kwargs)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**values)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def mlkv_from_gpt_neox(ref: GPTNeoXForCausalLM) -> MLKVTransformer:
    cfg = MLKVConfig.from_hf(ref.config)
    model = MLKVTransformer(cfg).eval()
    model.load_state_dict(convert_state_dict(ref.state_dict(), cfg, cfg))
    return model


def random_mlkv(config: MLKVConfig, seed=0, std=0.2) -> MLKVTransformer:
    torch.manual_seed(seed)
    model = MLKVTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model
