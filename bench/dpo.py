"""Preference tuning (train.py --dpo) on pairs built from the demo corpus: full weights against LoRA.

    flock /tmp/llama_bench.lock python bench/dpo.py --out runs/dpo

1. A small model is pretrained on Shakespeare (--pretrain-steps), unless --init-from names one.
2. Preference pairs are cut from Shakespeare's text: the prompt a passage of --prompt-chars characters, chosen
   its real continuation (--answer-chars), rejected the same continuation with its words shuffled: the same
   words, so only their order tells the two apart.
3. Each arm, full weights and LoRA, is one `train.py --dpo` run in a process of its own, so that its peak
   resident memory (ru_maxrss) is its own. For each: held-out reward accuracy and margin before (the
   reference: 0 and 0) and after --steps steps, seconds, AdamW's state and peak memory. Prints a Markdown
   table.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llama_mini.data.sources import open_source
from llama_mini.train import TrainConfig, Trainer


def pretrain(options: argparse.Namespace) -> str:
    out = Path(options.out) / "pretrained"
    if not (out / "best").is_dir():
        config = TrainConfig(
            data="shakespeare", out=str(out), max_steps=options.pretrain_steps, batch_size=16,
            eval_interval=options.pretrain_steps, vocab_size=1024, tokenizer_sample_mb=2.0, sample_tokens=0,
            device=options.device, log_interval=50,
        )  # fmt: skip
        model = {"dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 128}
        summary = Trainer(config, model, show_progress=False).run()
        print(f"pretrained: {summary.step} steps, val {summary.val_bpb:.3f} bits/byte", file=sys.stderr)
    return str(out)


def build_pairs(options: argparse.Namespace) -> str:
    """The preference file: real continuation (chosen) against its words shuffled (rejected)."""
    path = Path(options.out) / "pairs.jsonl"
    rng = random.Random(options.seed)
    text = "".join(open_source("shakespeare").documents())
    size = options.prompt_chars + options.answer_chars
    records = []
    while len(records) < options.pairs:
        start = rng.randrange(len(text) - size)
        prompt = text[start : start + options.prompt_chars]
        chosen = text[start + options.prompt_chars : start + size]
        words = chosen.split(" ")
        shuffled = words[:]
        rng.shuffle(shuffled)
        rejected = " ".join(shuffled)
        if len(words) >= 4 and rejected != chosen:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def run_arm(options: argparse.Namespace) -> None:
    """One arm, in this process: prints its results as one JSON line."""
    rank = options.arm_lora_rank
    config = TrainConfig(
        init_from=options.init_from, data=options.pairs_file, dpo=True, dpo_beta=options.beta,
        out=str(Path(options.out) / (f"lora-r{rank}" if rank else "full")), max_steps=options.steps,
        batch_size=options.batch_size, eval_interval=options.steps, eval_steps=options.eval_steps,
        lora_rank=rank, lora_alpha=2.0 * rank if rank else 16.0, sample_tokens=0, device=options.device,
        seed=options.seed, log_interval=10,
    )  # fmt: skip
    trainer = Trainer(config, show_progress=False)
    before = trainer.evaluate()
    started = time.perf_counter()
    summary = trainer.run()
    seconds = time.perf_counter() - started
    after = trainer.evaluate()
    adamw = sum(
        value.numel() * value.element_size()
        for state in trainer.optimizer.state.values()
        for value in state.values()
        if hasattr(value, "numel")
    )
    print(json.dumps({
        "arm": f"LoRA r {rank} (wq, wk, wv, wo)" if rank else "full weights",
        "lr": config.lr, "steps": summary.step, "seconds": seconds,
        "trained": summary.trainable_parameters,
        "accuracy_before": before["val_reward_accuracy"], "accuracy_after": after["val_reward_accuracy"],
        "margin_after": after["val_reward_margin"], "loss_after": after["val_loss"],
        "adamw_mib": adamw / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/dpo")
    parser.add_argument("--init-from", default=None, help="a trained model (default: pretrain one)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--prompt-chars", type=int, default=160)
    parser.add_argument("--answer-chars", type=int, default=120)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-steps", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--arm-lora-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs-file", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.arm_lora_rank is not None:
        run_arm(options)
        return
    init_from = options.init_from or pretrain(options)
    pairs = build_pairs(options)
    rows = []
    for rank in (0, options.lora_rank):
        shutil.rmtree(Path(options.out) / (f"lora-r{rank}" if rank else "full"), ignore_errors=True)
        command = [sys.executable, __file__, *sys.argv[1:], "--init-from", init_from, "--pairs-file", pairs,
                   "--arm-lora-rank", str(rank)]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print("| arm | parameters trained | lr | steps | held-out reward accuracy: before | after | margin after "
          "| DPO val loss after | seconds | AdamW state | peak RSS |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        print(
            f"| {row['arm']} | {row['trained']:,} | {row['lr']:g} | {row['steps']} | "
            f"{row['accuracy_before']:.3f} | **{row['accuracy_after']:.3f}** | {row['margin_after']:.3f} | "
            f"{row['loss_after']:.4f} | {row['seconds']:.0f} | {row['adamw_mib']:.2f} MiB | "
            f"{row['peak_rss_mib']:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
