"""Fine-tuning a trained model on another text: full fine-tuning against LoRA (docs/BENCHMARKS.md).

    python bench/finetune.py --init-from out/demo --data my_texts/ --steps 200
    python bench/finetune.py --init-from out/demo --data my_texts/ --steps 200 --lora-ranks 8 32

Each arm is one `train.py --init-from` run (the Trainer, with the fine-tuning defaults of TrainConfig unless
--lr is given) on the same prepared data. For each: the validation bits per byte of the pretrained model
on the new text (step 0) and after --steps steps, the parameters trained, the bytes of AdamW's state (two
moments per trained number), and the training tokens per second. With --source-data (the text the model
was trained on, e.g. shakespeare, split as its run split it), also its bits per byte before and after: what
fine-tuning made the model forget. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llama_mini.train import TrainConfig, Trainer


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors AdamW keeps per parameter (exp_avg, exp_avg_sq, step)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def source_bpb(options: argparse.Namespace, checkpoint: str, name: str) -> float | None:
    """Validation bits per byte of `checkpoint` on --source-data (None without it), by a Trainer that only
    evaluates: its split is the pretraining run's (same --val-fraction and --split-seed defaults)."""
    if options.source_data is None:
        return None
    config = TrainConfig(
        data=options.source_data,
        out=str(Path(options.out) / "source-eval" / name),
        data_dir=str(Path(options.out) / "source-data"),
        init_from=checkpoint,
        max_steps=1,
        eval_steps=options.eval_steps,
        batch_size=options.batch_size,
        device=options.device,
        seed=options.seed,
    )
    return Trainer(config, show_progress=False).evaluate()["val_bpb"]


def run_arm(options: argparse.Namespace, rank: int) -> dict:
    name = (f"lora-r{rank}-{options.lora_targets.replace(',', '')}" if rank else "full") + (
        f"-lr{options.lr:g}" if options.lr else ""
    )
    settings = dict(
        data=options.data,
        out=str(Path(options.out) / name),
        data_dir=str(Path(options.out) / "data"),  # prepared once, shared by the arms
        init_from=options.init_from,
        max_steps=options.steps,
        eval_interval=options.steps,
        eval_steps=options.eval_steps,
        batch_size=options.batch_size,
        lora_rank=rank,
        lora_alpha=2.0 * rank if rank else 16.0,
        lora_targets=options.lora_targets,
        sample_tokens=0,
        device=options.device,
        seed=options.seed,
    )
    if options.lr is not None:
        settings["lr"] = options.lr
    trainer = Trainer(TrainConfig(**settings), show_progress=False)
    before = trainer.evaluate()["val_bpb"]
    started = time.perf_counter()
    summary = trainer.run()
    return {
        "arm": "full fine-tuning"
        if not rank
        else f"LoRA r={rank}, alpha={2 * rank} ({options.lora_targets})",
        "lr": trainer.config.lr,
        "trained": summary.trainable_parameters,
        "total": sum(p.numel() for p in trainer.raw_model.parameters()),
        "optimizer_bytes": optimizer_state_bytes(trainer.optimizer),
        "before": before,
        "after": summary.val_bpb,
        "tokens_per_second": summary.tokens_per_second,
        "seconds": time.perf_counter() - started,
        "source_after": source_bpb(options, str(Path(options.out) / name / "best"), name),
    }


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", required=True, help="the pretrained run folder or checkpoint")
    parser.add_argument("--data", required=True, help="the new text (any --data of train.py)")
    parser.add_argument("--out", default="out/bench-finetune", help="folder for the runs and the data")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--lora-ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--lora-targets", default="wq,wk,wv,wo")
    parser.add_argument("--lr", type=float, help="one peak lr for every arm (default: TrainConfig's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--no-full", action="store_true", help="skip the full fine-tuning arm")
    parser.add_argument("--source-data", help="the pretraining text, to measure what fine-tuning forgets")
    options = parser.parse_args()
    ranks = ([] if options.no_full else [0]) + options.lora_ranks
    rows = [run_arm(options, rank) for rank in ranks]
    source_before = source_bpb(options, options.init_from, "pretrained")
    print(
        "| arm | peak lr | parameters trained | AdamW state | val bits/byte before | after "
        f"{options.steps} steps | source text's bits/byte (before: {source_before or float('nan'):.3f}) "
        "| tokens/s | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        share = 100 * row["trained"] / row["total"]
        source = f"{row['source_after']:.3f}" if row["source_after"] is not None else "-"
        print(
            f"| {row['arm']} | {row['lr']:g} | {row['trained']:,} ({share:.2f}%) | "
            f"{row['optimizer_bytes'] / 2**20:.2f} MiB | {row['before']:.3f} | {row['after']:.3f} | "
            f"{source} | {row['tokens_per_second']:,.0f} | {row['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
