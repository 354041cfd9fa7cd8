"""Look inside a model without training or loading it: its parameters, sizes, costs and tensor shapes.

    llama-mini inspect --preset llama3-8b                  (or python -m llama_mini inspect ...)
    llama-mini inspect --checkpoint out/demo --json        (a run folder: its best/ checkpoint)
    llama-mini inspect --preset stories15m --ffn relu --dtype fp32

The report holds, for a preset or a checkpoint's config:

- parameters by part, from the formulas of llama_mini/model/sizes.py, with totals, and, as a check, the
  count of the real model built on the meta device (`count_parameters`);
- the FFN hidden size h and each step of the rounding that produced it (see `hidden_dim_steps`);
- training FLOPs per token, 6N + 12 * L * d * T (Kaplan et al. 2020, PaLM appendix B);
- KV-cache bytes per token, 2 * L * H_kv * D * bytes(dtype), and for a full context of max_seq_len;
- the memory plan of training per GPU, DDP against FSDP over --gpus N GPUs: weights, gradients, AdamW's
  moments, the compute-dtype copies, and activations per token with and without activation checkpointing
  (`training_memory`);
- a walk of tensor shapes through one forward pass of a short input (see `shape_walk`).

Everything is computed from `ModelArgs`; no weights are allocated. Published sizes such as llama3-8b
(8,030,261,248 parameters) are built on PyTorch's meta device, whose tensors have shapes and dtypes but no
storage, so every layer runs and reports its output shape without touching memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import nn

from llama_mini.checkpoint import describe_resolution, read_model_args
from llama_mini.console import ArgumentParser, run_command
from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.ffn import FEED_FORWARDS
from llama_mini.model.presets import PRESETS, get_preset
from llama_mini.model.sizes import (
    DTYPE_BYTES,
    count_parameters,
    hidden_dim_steps,
    kv_cache_bytes_per_token,
    parameter_counts,
    training_flops,
    training_memory,
)
from llama_mini.model.transformer import Transformer

__all__ = [
    "DTYPE_BYTES",
    "SHAPE_FORMULAS",
    "build_on_meta",
    "format_report",
    "hidden_dim_steps",
    "inspect_model",
    "kv_cache_bytes_per_token",
    "main",
    "parameter_counts",
    "shape_walk",
    "training_flops",
]

# The output shape of each kind of module, by the last part of its name, as a formula in the model's
# sizes. The shape walk measures the real shapes and checks them against these.
SHAPE_FORMULAS: dict[str, tuple[str, ...]] = {
    "tok_embeddings": ("B", "T", "dim"),
    "rope": ("T", "D/2", "2"),  # rotations: cos and sin of each position's angles
    "attention_norm": ("B", "T", "dim"),
    "wq": ("B", "T", "H*D"),
    "wk": ("B", "T", "H_kv*D"),
    "wv": ("B", "T", "H_kv*D"),
    "wo": ("B", "T", "dim"),
    "attention": ("B", "T", "dim"),
    "ffn_norm": ("B", "T", "dim"),
    "w1": ("B", "T", "hidden"),
    "w3": ("B", "T", "hidden"),
    "w2": ("B", "T", "dim"),
    "feed_forward": ("B", "T", "dim"),
    "block": ("B", "T", "dim"),  # layers.i, the whole TransformerBlock
    "norm": ("B", "T", "dim"),
    "output": ("B", "T", "vocab"),
}


# ---------------------------------------------------------------------------------------------------------
# The model on the meta device, and the shape walk
# ---------------------------------------------------------------------------------------------------------


def build_on_meta(args: ModelArgs) -> Transformer:
    """The model with every tensor on the meta device: shapes and dtypes, no storage, any size."""
    with torch.device("meta"):
        return Transformer(args)


def _symbols(args: ModelArgs, batch_size: int, seq_len: int) -> dict[str, int]:
    """The value of each symbol used in SHAPE_FORMULAS."""
    hidden, _ = hidden_dim_steps(args)
    return {
        "B": batch_size,
        "T": seq_len,
        "dim": args.dim,
        "H*D": args.n_heads * args.head_dim,
        "H_kv*D": args.n_kv_heads * args.head_dim,
        "D/2": args.head_dim // 2,
        "2": 2,
        "hidden": hidden,
        "vocab": args.vocab_size,
    }


def _kind(name: str) -> str:
    """The SHAPE_FORMULAS key of a module name: its last part, or "block" for layers.i."""
    last = name.rsplit(".", 1)[-1]
    return "block" if last.isdigit() else last


def _expected_modules(args: ModelArgs) -> list[str]:
    """The modules of a forward pass in the order they finish, for when shapes are computed by hand."""
    ffn = ["w1", "w3", "w2"] if FEED_FORWARDS[args.ffn].gated else ["w1", "w2"]
    names = ["tok_embeddings", "rope"]
    for i in range(args.n_layers):
        block = f"layers.{i}"
        names += [f"{block}.attention_norm"]
        names += [f"{block}.attention.{w}" for w in ("wq", "wk", "wv", "wo")] + [f"{block}.attention"]
        names += [f"{block}.ffn_norm"] + [f"{block}.feed_forward.{w}" for w in ffn]
        names += [f"{block}.feed_forward", block]
    return names + ["norm", "output"]


def shape_walk(
    args: ModelArgs, batch_size: int = 1, seq_len: int = 8, model: Transformer | None = None
) -> dict[str, Any]:
    """Output shapes of every module in one forward pass of a (batch_size, seq_len) input, on meta.

    A forward hook on each module (dropouts left out: they keep shapes) records its output shape in the
    order modules finish, which is the order the data flows. Each record also has the shape its formula
    in SHAPE_FORMULAS predicts. If the forward pass cannot run on the meta device (an operator without a
    meta kernel in some PyTorch version), the shapes are computed from the formulas instead and `source`
    says so.

    Returns {"input": [B, T], "source": ..., "steps": [{"module", "shape", "formula", "expected"}, ...],
    "inside_attention": [...]}, the last being the shapes inside attention that no module outputs.
    """
    if not 0 < seq_len <= args.max_seq_len:
        raise ConfigError(
            f"--seq-len {seq_len} must be between 1 and the model's max_seq_len ({args.max_seq_len})"
        )
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    symbols = _symbols(args, batch_size, seq_len)
    model = build_on_meta(args) if model is None else model  # a model already built on meta is reused
    recorded: list[tuple[str, list[int]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (nn.Dropout, nn.ModuleList)):
            continue

        def hook(module, inputs, output, name=name):
            recorded.append((name, list(output.shape)))

        handles.append(module.register_forward_hook(hook))
    source = "measured: forward hooks on the meta device"
    try:
        with torch.no_grad():
            model(torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta"))
    except (RuntimeError, NotImplementedError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        source = f"computed from the formulas (the meta-device forward failed: {first_line})"
        recorded = [
            (name, [symbols[s] for s in SHAPE_FORMULAS[_kind(name)]]) for name in _expected_modules(args)
        ]
    finally:
        for handle in handles:
            handle.remove()
    steps = []
    for name, shape in recorded:
        formula = SHAPE_FORMULAS.get(_kind(name))
        expected = [symbols[s] for s in formula] if formula else None
        steps.append({"module": name, "shape": shape, "formula": formula, "expected": expected})
    return {
        "input": [batch_size, seq_len],
        "source": source,
        "steps": steps,
        "inside_attention": _inside_attention(args, batch_size, seq_len),
    }


def _inside_attention(args: ModelArgs, batch_size: int, seq_len: int) -> list[dict[str, Any]]:
    """Shapes between wq/wk/wv and wo that no module outputs (views, RoPE, SDPA), from the formulas."""
    B, T, H, H_kv, D = batch_size, seq_len, args.n_heads, args.n_kv_heads, args.head_dim
    return [
        {"what": "q as heads, after RoPE", "shape": [B, H, T, D], "formula": "(B, H, T, D)"},
        {
            "what": "k, v as heads (cached)",
            "shape": [B, H_kv, T, D],
            "formula": "(B, H_kv, T, D)",
        },
        {"what": "k, v after repeat_kv", "shape": [B, H, T, D], "formula": "(B, H, T, D)"},
        {"what": "softmax(q k^T / sqrt(D))", "shape": [B, H, T, T], "formula": "(B, H, T, T)"},
        {"what": "heads joined (into wo)", "shape": [B, T, H * D], "formula": "(B, T, H*D)"},
    ]


# ---------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------


def inspect_model(
    args: ModelArgs,
    name: str = "",
    seq_len: int = 8,
    batch_size: int = 1,
    dtype: str = "bf16",
    gpus: int = 8,
) -> dict[str, Any]:
    """Everything the inspector reports about `args`, as a JSON-ready dict (`format_report` prints it).

    `dtype` sizes the KV cache, the weights in memory and training's compute; `seq_len` and `batch_size`
    shape the walk; `gpus` is the N of the FSDP memory plan.
    """
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(DTYPE_BYTES)}")
    counts = parameter_counts(args)
    model = build_on_meta(args)
    hidden, steps = hidden_dim_steps(args)
    per_token = kv_cache_bytes_per_token(args, dtype)
    return {
        "name": name,
        "model_args": args.to_dict(),
        "head_dim": args.head_dim,
        "parameters": counts,
        "parameters_of_built_model": count_parameters(model),
        "ffn": {
            "variant": args.ffn,
            "gated": FEED_FORWARDS[args.ffn].gated,
            "hidden_dim": hidden,
            "steps": steps,
        },
        "training_flops_per_token": training_flops(args),
        "dtype": dtype,
        "weight_bytes": counts["total"] * DTYPE_BYTES[dtype],
        "kv_cache": {
            "bytes_per_token": per_token,
            "max_seq_len": args.max_seq_len,
            "bytes_per_sequence": per_token * args.max_seq_len,
        },
        "training_memory": training_memory(args, gpus, dtype),
        "shape_walk": shape_walk(args, batch_size=batch_size, seq_len=seq_len, model=model),
    }


def _bytes(n: int) -> str:
    """A byte count in binary units: 131072 -> '128.0 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _short(n: float) -> str:
    """A large count in words: 8030261248 -> '8.03 B'."""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _flops(n: float) -> str:
    """FLOPs with an SI prefix: 57914449920 -> '57.91 GFLOP'."""
    for size, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f} {unit}FLOP"
    return f"{n:.0f} FLOP"


def _walk_lines(walk: dict[str, Any], n_layers: int) -> list[str]:
    """The walk as text: everything outside the layers and layer 0 in full; later layers summarised."""
    steps = walk["steps"]
    first = [s for s in steps if s["module"] == "layers.0" or s["module"].startswith("layers.0.")]
    first_shapes = [(s["module"].removeprefix("layers.0"), s["shape"]) for s in first]
    same = []
    for i in range(1, n_layers):
        prefix = f"layers.{i}"
        layer = [s for s in steps if s["module"] == prefix or s["module"].startswith(prefix + ".")]
        same.append([(s["module"].removeprefix(prefix), s["shape"]) for s in layer] == first_shapes)
    inside = walk.get("inside_attention", [])
    width = max([len(s["module"]) for s in steps] + [len(i["what"]) + 2 for i in inside]) + 2
    lines = [f"  {'tokens (input)':<{width}} {tuple(walk['input'])!s:<22} (B, T)"]
    summarised = False
    for step in steps:
        module = step["module"]
        parts = module.split(".")
        if parts[0] == "layers" and int(parts[1]) > 0 and same[int(parts[1]) - 1]:
            if not summarised:
                lines.append(
                    f"  layers.1 .. layers.{n_layers - 1}: the same {len(first)} shapes as layers.0"
                    if n_layers > 2
                    else f"  layers.1: the same {len(first)} shapes as layers.0"
                )
                summarised = True
            continue
        formula = "(" + ", ".join(step["formula"]) + ")" if step["formula"] else ""
        mismatch = "" if step["expected"] in (None, step["shape"]) else f"  ! expected {step['expected']}"
        lines.append(f"  {module:<{width}} {tuple(step['shape'])!s:<22} {formula}{mismatch}")
        if module == "layers.0.attention.wv":
            # SDPA and the views have no hooks: these shapes come from the formulas, and say so.
            for item in inside:
                what = f"  {item['what']}"
                lines.append(f"  {what:<{width}} {tuple(item['shape'])!s:<22} {item['formula']}  by hand")
    return lines


def _memory_lines(plan: dict[str, Any]) -> list[str]:
    """The training memory plan as a table: DDP and FSDP side by side, then activations and totals."""
    n, dtype, ddp, fsdp = plan["processes"], plan["dtype"], plan["ddp"], plan["fsdp"]
    per_token, parts = plan["activations_per_token"], plan["activation_parts"]
    tokens = plan["tokens_per_process"]
    lines = [
        f"training memory per GPU: AdamW, float32 master weights, compute in {dtype}; "
        f"DDP against FSDP over {n} GPUs",
        f"  {'':<40} {'DDP':>12} {f'FSDP / {n}':>12}",
    ]
    rows = [
        ("weights, float32", "weights"),
        ("gradients, float32", "gradients"),
        ("AdamW's two moments, float32", "adamw"),
        (f"{dtype} copies (autocast / gathered units)", "compute_copies"),
    ]
    for label, key in rows:
        lines.append(f"  {label:<40} {_bytes(ddp[key]):>12} {_bytes(fsdp[key]):>12}")
    lines.append(
        f"  activations per token: {_bytes(per_token['plain'])}, {_bytes(per_token['checkpointed'])} with "
        f"activation checkpointing (per block {_bytes(parts['block'])}, head {_bytes(parts['head'])})"
    )
    if plan["loss_gradient"]:
        lines.append(f"  chunked loss: the output matrix's gradient, {_bytes(plan['loss_gradient'])}")
    totals = plan["totals"]
    lines.append(f"  total with {tokens:,} tokens per GPU per micro-step:")
    for name, label in (("plain", "without checkpointing"), ("checkpointed", "activation checkpointing")):
        ddp_total, fsdp_total = totals[f"ddp_{name}"], totals[f"fsdp_{name}"]
        lines.append(f"    {label:<38} {_bytes(ddp_total):>12} {_bytes(fsdp_total):>12}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as readable plain text."""
    args = ModelArgs.from_dict(report["model_args"])
    counts, built = report["parameters"], report["parameters_of_built_model"]
    ffn, flops, kv = report["ffn"], report["training_flops_per_token"], report["kv_cache"]
    d, L, H, H_kv, D = args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim
    h, V = ffn["hidden_dim"], args.vocab_size
    gated = ffn["gated"]
    total = counts["total"]

    lines = [f"model {report['name']}".rstrip()]
    lines.append(
        f"  dim {d}, {L} layers, {H} heads ({H_kv} kv heads, head_dim {D}), vocab {V:,}, "
        f"FFN {ffn['variant']} ({'gated' if gated else 'not gated'}), max_seq_len {args.max_seq_len:,}"
        + (", tied embeddings" if args.tie_embeddings else "")
    )

    lines += ["", "parameters"]
    matrices = 3 if gated else 2
    beta = " + 1" if args.ffn == "swish" and args.swish_beta_trainable else ""
    rows = [
        ("embeddings", f"V * d = {V} * {d}", counts["embedding"]),
        (
            "output",
            "tied to the embeddings: counted once" if args.tie_embeddings else f"V * d = {V} * {d}",
            counts["output"],
        ),
        (
            "attention",
            f"L * (d*H*D + 2*d*H_kv*D + H*D*d) = {L} * ({d}*{H * D} + 2*{d}*{H_kv * D} + {H * D}*{d})",
            counts["attention"],
        ),
        (
            "feed-forward",
            f"L * ({matrices}*d*h{beta}) = {L} * ({matrices}*{d}*{h}{beta})",
            counts["feed_forward"],
        ),
        ("norms", f"(2L + 1) * d = {2 * L + 1} * {d}", counts["norms"]),
    ]
    for part, formula, value in rows:
        lines.append(f"  {part:<14} {value:>16,}  {100 * value / total:5.1f}%   {formula}")
    lines.append(f"  {'total':<14} {total:>16,}  ({_short(total)})")
    lines.append(
        f"  {'non-embedding':<14} {counts['non_embedding']:>16,}  ({_short(counts['non_embedding'])})"
    )
    if built == counts:
        lines.append("  (equal, part by part, to count_parameters of the model built on the meta device)")
    else:
        lines.append(f"  ! the model built on the meta device counts differently: {built}")
    lines.append(f"  weights in {report['dtype']}: {_bytes(report['weight_bytes'])}")

    lines += ["", f"FFN hidden size h = {h}"]
    lines += [f"  {step}" for step in ffn["steps"]]

    lines += ["", f"training FLOPs per token at T = {flops['seq_len']:,}: 6N + 12 * L * d * T"]
    lines.append(f"  {'6N (weights)':<28} {flops['weights']:>20,}")
    lines.append(f"  {'12 * L * d * T (attention)':<28} {flops['attention']:>20,}")
    lines.append(f"  {'total':<28} {flops['total']:>20,}  ({_flops(flops['total'])})")

    size = DTYPE_BYTES[report["dtype"]]
    lines += [
        "",
        f"KV cache in {report['dtype']}: 2 * L * H_kv * D * bytes = 2 * {L} * {H_kv} * {D} * {size}",
    ]
    context = f"per sequence of {kv['max_seq_len']:,}"
    lines.append(f"  {'per token':<28} {kv['bytes_per_token']:>20,} bytes  ({_bytes(kv['bytes_per_token'])})")
    lines.append(
        f"  {context:<28} {kv['bytes_per_sequence']:>20,} bytes  ({_bytes(kv['bytes_per_sequence'])})"
    )

    lines += [""] + _memory_lines(report["training_memory"])

    walk = report["shape_walk"]
    batch, seq = walk["input"]
    lines += ["", f"shape walk: one forward pass of B = {batch}, T = {seq} tokens ({walk['source']})"]
    lines += _walk_lines(walk, L)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog or "python -m llama_mini inspect",
        description="Parameters, FFN size, FLOPs, KV-cache size and tensor shapes of a model, "
        "computed on the meta device (no weights are allocated or loaded).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"a named shape: {', '.join(PRESETS)}")
    source.add_argument("--checkpoint", help="a checkpoint folder; only its config is read, not its weights")
    parser.add_argument("--ffn", choices=list(FEED_FORWARDS), help="replace the feed-forward variant")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPE_BYTES),
        default="bf16",
        help="dtype of the KV cache and weights in memory (default: bf16, as LLaMA's weights are "
        "released and served on GPUs; fp32 is what training on a CPU keeps)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=8, help="tokens in the shape walk's input (default: 8)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="sequences in the shape walk (default: 1)")
    parser.add_argument(
        "--gpus", type=int, default=8, help="GPUs that FSDP shards over in the memory plan (default: 8)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(_parser(prog), _inspect, argv)


def _inspect(options: argparse.Namespace) -> None:
    if options.gpus < 1:
        raise ConfigError(f"--gpus must be positive, got {options.gpus}")
    if options.preset is not None:
        args, name = get_preset(options.preset), options.preset
    else:
        note = describe_resolution(options.checkpoint)  # a run folder: which of its checkpoints is read
        if note:
            print(note, file=sys.stderr)
        args, name = read_model_args(options.checkpoint), options.checkpoint
    if options.ffn is not None:
        args = ModelArgs.from_dict({**args.to_dict(), "ffn": options.ffn})
    report = inspect_model(args, name, options.seq_len, options.batch_size, options.dtype, options.gpus)
    print(json.dumps(report, indent=2) if options.json else format_report(report))


if __name__ == "__main__":
    sys.exit(main())
