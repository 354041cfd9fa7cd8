"""The model, a module per part, in reading order:

    args.py         ModelArgs: every size and choice, validated
    presets.py      named shapes (tiny, llama2.c's stories*, published LLaMA sizes)
    transformer.py  RMSNorm, RoPE, Attention, TransformerBlock, Transformer: tokens -> logits
    ffn.py          the feed-forward family: SwiGLU (LLaMA's FeedForward) and its relatives
    cache.py        KV caches for incremental decoding
    sizes.py        parameters, FLOPs and KV-cache bytes from a config

Import from the module that holds a name (`from llama_mini.model.transformer import Transformer`), or the
common names from the package root (`from llama_mini import Transformer, ModelArgs`). This file imports
nothing, so that reading one part (say ModelArgs, as llama_mini.checkpoint does) never loads the others.
"""
