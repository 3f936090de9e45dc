"""megatron-mlkv: uptraining transformer checkpoints into Multi-Layer Key-Value layouts.

Flat at this level: the model core that every concern uses, and the files an exported checkpoint
carries as transformers remote code (`layout`, `config`, `model`, `configuration_mlkv`,
`modeling_mlkv`, `errors`: they import only each other, so a folder loads without this package);
`hf` (our folders: export, tokenizer files), `loading` (any folder into the model, converting bases
in memory), `integrity` (digests, atomic writes, output locks), `cli` (every command's options
dataclass, entry points' one-line errors).

Folders, one concern each: `conversion/` (bases into MLKV layouts), `data/` (tokenize, pack, read),
`training/` (the DeepSpeed run), `parallel/` (tensor parallelism), `inference/` (fast decoding, its
kernels, the inference benchmark), `evaluation/` (lm-evaluation-harness, the Table-3 report).
Imports run one way, down the ranks of `tests/test_structure.py`: the remote-code core at the
bottom, then `hf`, then `conversion/`, `data/` and `parallel/`, then `loading` and `evaluation/`,
then `inference/` and `training/`.
"""
