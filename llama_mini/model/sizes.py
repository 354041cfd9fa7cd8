"""Sizes and costs of a model, from its config alone or from a built model.

    parameter_counts(args)          parameters by part, from formulas (V = vocab_size, d = dim, L = n_layers,
                                    H = n_heads, H_kv = n_kv_heads, D = head_dim, h = the FFN hidden size):

        embeddings     V * d                                    the tok_embeddings table
        output         V * d, or 0 when tied to the embeddings  the last projection to logits
        attention      L * (d*H*D + 2 * d*H_kv*D + H*D*d)       wq, wk and wv, wo
        feed-forward   L * 3*d*h (gated) or L * 2*d*h (+ L if swish's beta is trained)
        norms          (2L + 1) * d                             two RMSNorms per block and the final one

    count_parameters(model)         the same parts counted on a built model (the tests check they agree)
    hidden_dim_steps(args)          the FFN hidden size h and each step of the rounding that produced it
    training_flops(args, T)         training FLOPs per token, 6N + 12 * L * d * T
    kv_cache_bytes_per_token(args)  2 * L * H_kv * D * bytes(dtype)
    activation_bytes_per_token(args)   what autograd keeps per token from forward to backward
    training_memory(args, N)        the memory plan of training per GPU, DDP and FSDP over N GPUs

Everything but `count_parameters` needs only `ModelArgs`, so published sizes cost nothing to compute.

The memory plan (`training_memory`), per GPU, with AdamW and float32 master weights (P parameters,
c = bytes of the compute dtype: 2 for bf16, 4 for fp32):

    DDP           weights 4P + gradients 4P + AdamW's two moments 8P = 16P, and under bf16 autocast a
                  c-byte copy of every weight, cast in forward and kept for backward
    FSDP over N   the same 16 bytes per parameter cut in N pieces (each weight's first dimension is padded
                  to a multiple of N), plus what is gathered: the root unit (embeddings, output layer,
                  final norm) from the start of forward to the end of backward, two blocks at a time (the
                  one computing and the next being gathered), and their gradients until reduce-scattered
    activations   per token: L blocks + the head (the final norm and the loss). With activation
                  checkpointing each block keeps only its input (c * d) and one block's activations are
                  rebuilt at a time in backward: L * c * d + one block + the head

`activation_bytes_per_token` counts the tensors autograd saves, exactly as this model and loss compute
them in float32 or with bf16 weights (FSDP's mixed precision); tests/test_sizes.py measures them with
saved-tensor hooks. DDP's autocast keeps the residual stream and the norms' outputs in float32 beside
their bf16 casts, a few d per layer more than counted here. RoPE's table (T x D x 4 bytes per sequence,
not per token) and the loss's scalars are left out.
"""

from __future__ import annotations

import math

from torch import nn

from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.ffn import FEED_FORWARDS, llama_hidden_dim_steps
from llama_mini.model.rounding import ceil_div

__all__ = [
    "DTYPE_BYTES",
    "FFN_SAVED_HIDDEN",
    "activation_bytes_per_token",
    "count_parameters",
    "hidden_dim_steps",
    "kv_cache_bytes_per_token",
    "parameter_counts",
    "parameter_shapes",
    "training_flops",
    "training_flops_per_token",
    "training_memory",
]

# Bytes per element of the dtypes a KV cache (or the weights) may be stored in.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def hidden_dim_steps(args: ModelArgs) -> tuple[int, list[str]]:
    """The FFN hidden size h and the steps that produce it, one readable line each (LLaMA's rule,
    `ffn.llama_hidden_dim_steps`; gated variants cut to 2/3, non-gated ones do not). An explicit
    `hidden_dim` (from a Hugging Face config's intermediate_size) is used as it is."""
    if args.hidden_dim is not None:
        return args.hidden_dim, [f"explicit hidden_dim = {args.hidden_dim} (no rounding rule applied)"]
    gated = FEED_FORWARDS[args.ffn].gated
    steps = llama_hidden_dim_steps(args.dim, args.multiple_of, args.ffn_dim_multiplier, gated)
    lines = [f"{formula} = {value}" + (f"   ({why})" if why else "") for formula, value, why in steps]
    return steps[-1][1], lines


def parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Parameters by part, from the formulas in the module docstring; the keys of `count_parameters`.

    A tied output matrix is the embedding matrix, so it counts once, under embedding (output = 0);
    `non_embedding` leaves out the token-embedding table.
    """
    d, layers, heads, kv_heads, head = args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim
    hidden, _ = hidden_dim_steps(args)
    matrices = 3 if FEED_FORWARDS[args.ffn].gated else 2
    trained_beta = 1 if args.ffn == "swish" and args.swish_beta_trainable else 0
    counts = {
        "embedding": args.vocab_size * d,
        "output": 0 if args.tie_embeddings else args.vocab_size * d,
        "attention": layers * (d * heads * head + 2 * d * kv_heads * head + heads * head * d),
        "feed_forward": layers * (matrices * d * hidden + trained_beta),
        "norms": (2 * layers + 1) * d,
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embedding"]
    return counts


def training_flops(args: ModelArgs, seq_len: int | None = None) -> dict[str, int]:
    """Training FLOPs per token, 6N + 12 * L * d * T (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, B).

    N: parameters that do a multiply-add per token, every one but the embedding lookup, with a tied
    output matrix counted (it is still a matmul). 6 = 2 FLOPs per multiply-add x 3 passes (forward, and
    backward to activations and to weights). 12 * L * d * T: attention's q.k^T and p.v, which have no
    parameters, 2 matmuls x 2 x 3 passes per layer, over a context of T = seq_len (max_seq_len if None).
    """
    seq_len = args.max_seq_len if seq_len is None else seq_len
    counts = parameter_counts(args)
    matmul_params = counts["non_embedding"] + (args.vocab_size * args.dim if args.tie_embeddings else 0)
    weights = 6 * matmul_params
    attention = 12 * args.n_layers * args.dim * seq_len
    return {"seq_len": seq_len, "weights": weights, "attention": attention, "total": weights + attention}


def kv_cache_bytes_per_token(args: ModelArgs, dtype: str = "bf16") -> int:
    """Bytes the KV cache holds per token of one sequence: 2 * n_layers * n_kv_heads * head_dim * bytes.

    2 for the key and the value; each layer stores one vector of head_dim per kv head. Grouped-query
    attention shrinks it by n_heads / n_kv_heads (4x for Llama-3-8B: 128 KiB per token instead of 512).
    """
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * DTYPE_BYTES[dtype]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters by part: embedding, output, attention, feed_forward, norms, plus total and non_embedding.

    A tied output matrix is the embedding matrix, so it is counted once, under embedding (output = 0).
    `non_embedding` leaves out the token-embedding table (a lookup, no arithmetic).
    """
    counts = {"embedding": 0, "output": 0, "attention": 0, "feed_forward": 0, "norms": 0}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if name.startswith("tok_embeddings."):
            part = "embedding"
        elif name.startswith("output."):
            part = "output"
        elif ".attention." in name:
            part = "attention"
        elif ".feed_forward." in name:
            part = "feed_forward"
        else:  # attention_norm, ffn_norm and the final norm
            part = "norms"
        counts[part] += param.numel()
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embedding"]
    return counts


def training_flops_per_token(args: ModelArgs, seq_len: int | None = None) -> int:
    """`training_flops(args, seq_len)["total"]`: what MFU divides by."""
    return training_flops(args, seq_len)["total"]


# ---------------------------------------------------------------------------------------------------------
# Training memory
# ---------------------------------------------------------------------------------------------------------

# Tensors of the FFN's hidden size h that each variant keeps per token for backward: SwiGLU keeps its gate
# w1 x (for silu's derivative), silu(w1 x) and w3 x (each the other's factor in the product), and the
# product (w2's input); a ReLU keeps only its output. Measured with saved-tensor hooks (tests/test_sizes.py).
FFN_SAVED_HIDDEN = {"swiglu": 4, "geglu": 4, "swish": 3, "reglu": 3, "glu": 3, "bilinear": 3, "gelu": 2,
                    "relu": 1}  # fmt: skip


def parameter_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape by name, from the config (the names of `Transformer.named_parameters`)."""
    d, heads, kv_heads, head = args.dim, args.n_heads, args.n_kv_heads, args.head_dim
    hidden, _ = hidden_dim_steps(args)
    shapes = {"tok_embeddings.weight": (args.vocab_size, d)}
    ffn = {"w1": (hidden, d), "w2": (d, hidden)}
    if FEED_FORWARDS[args.ffn].gated:
        ffn["w3"] = (hidden, d)
    for layer in range(args.n_layers):
        block = f"layers.{layer}"
        shapes[f"{block}.attention_norm.weight"] = (d,)
        shapes[f"{block}.attention.wq.weight"] = (heads * head, d)
        shapes[f"{block}.attention.wk.weight"] = (kv_heads * head, d)
        shapes[f"{block}.attention.wv.weight"] = (kv_heads * head, d)
        shapes[f"{block}.attention.wo.weight"] = (d, heads * head)
        shapes[f"{block}.ffn_norm.weight"] = (d,)
        for name, shape in ffn.items():
            shapes[f"{block}.feed_forward.{name}.weight"] = shape
        if args.ffn == "swish" and args.swish_beta_trainable:
            shapes[f"{block}.feed_forward.beta"] = (1,)
    shapes["norm.weight"] = (d,)
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    return shapes


def activation_bytes_per_token(
    args: ModelArgs, dtype: str = "bf16", checkpointing: bool = False, chunked_loss: bool = True
) -> dict[str, int]:
    """Bytes that autograd keeps per token of a micro-batch from forward to backward, by part.

    c = bytes of `dtype` (the weights' compute dtype); RMSNorm's statistics, attention's log-sum-exp and
    the loss's log-softmax are float32 whatever it is. Per block, with d = dim, H = n_heads, D = head_dim:

        2 RMSNorms     2 * (4d + 4 + c d)     the input upcast to float32, 1/rms, the normalised input
        their outputs  2 * c d                what wq, wk, wv (and w1, w3) read
        attention      c * 4 H D + 4 H        q and k (rotated), v (repeated for GQA), the output; and the
                                              flash kernel's log-sum-exp (no T x T matrix)
        feed-forward   c * k h                k = FFN_SAVED_HIDDEN[variant]

    head: the token ids (8), the final norm (4d + 4 + c d), then the loss: plain, the output layer's input
    (c d), the float32 log-softmax (4 V) and the target ids (8); chunked (llama_mini/ops/loss.py), the
    gradient of the hidden state (c d) only (its V x d weight gradient is per micro-batch, not per token).
    With `checkpointing`, the blocks keep their inputs (c d each) and one block is rebuilt at a time.
    """
    c = DTYPE_BYTES[dtype]
    d, heads, head = args.dim, args.n_heads, args.head_dim
    hidden, _ = hidden_dim_steps(args)
    norm = 4 * d + 4 + c * d
    block = 2 * norm + 2 * c * d + c * 4 * heads * head + 4 * heads + c * FFN_SAVED_HIDDEN[args.ffn] * hidden
    loss = c * d if chunked_loss else c * d + 4 * args.vocab_size + 8
    head_bytes = 8 + norm + loss
    blocks = args.n_layers * (c * d) + block if checkpointing else args.n_layers * block
    return {"block": block, "blocks": blocks, "head": head_bytes, "total": blocks + head_bytes}


def training_memory(
    args: ModelArgs,
    processes: int = 8,
    dtype: str = "bf16",
    tokens_per_process: int | None = None,
    chunked_loss: bool = True,
) -> dict[str, object]:
    """The memory plan of full training per GPU (see the module docstring): DDP, and FSDP over
    `processes` GPUs, each as bytes by part, and activations for `tokens_per_process` tokens per
    micro-step (default one sequence of max_seq_len), with and without activation checkpointing."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    if processes < 1:
        raise ConfigError(f"the number of GPUs must be positive, got {processes}")
    c = DTYPE_BYTES[dtype]
    shapes = parameter_shapes(args)
    total = sum(math.prod(shape) for shape in shapes.values())

    def numel(names) -> int:
        return sum(math.prod(shapes[name]) for name in names)

    # FSDP keeps ceil(rows / N) rows of every weight: the first dimension is padded to a multiple of N.
    piece = sum(ceil_div(shape[0], processes) * math.prod(shape[1:]) for shape in shapes.values())
    root = numel(name for name in shapes if not name.startswith("layers."))
    block = numel(name for name in shapes if name.startswith("layers.0."))
    tokens = args.max_seq_len if tokens_per_process is None else tokens_per_process
    loss_gradient = args.vocab_size * args.dim * c if chunked_loss else 0  # the chunked loss's V x d
    ddp = {
        "weights": 4 * total,
        "gradients": 4 * total,
        "adamw": 8 * total,
        "compute_copies": c * total if c < 4 else 0,  # autocast's casts, kept from forward to backward
    }
    fsdp = {
        "weights": 4 * piece,
        "gradients": 4 * piece,
        "adamw": 8 * piece,
        # gathered in the compute dtype: the root unit throughout, two blocks at a time, and the gradients
        # of the root and of one block until they are reduce-scattered
        "compute_copies": c * (2 * root + 3 * block),
    }
    activations = {
        name: activation_bytes_per_token(args, dtype, checkpointing, chunked_loss)
        for name, checkpointing in (("plain", False), ("checkpointed", True))
    }
    plan: dict[str, object] = {
        "parameters": total,
        "processes": processes,
        "dtype": dtype,
        "tokens_per_process": tokens,
        "ddp": ddp,
        "fsdp": fsdp,
        "activations_per_token": {name: parts["total"] for name, parts in activations.items()},
        "activation_parts": activations["plain"],
        "loss_gradient": loss_gradient,
    }
    totals = {}
    for layout, parts in (("ddp", ddp), ("fsdp", fsdp)):
        for name, per_token in plan["activations_per_token"].items():
            totals[f"{layout}_{name}"] = sum(parts.values()) + tokens * per_token + loss_gradient
    plan["totals"] = totals
    return plan
