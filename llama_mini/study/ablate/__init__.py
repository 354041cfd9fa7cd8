"""The feed-forward ablation: one model trained with each FFN variant, at matched parameters, over seeds.

    python -m llama_mini.ablate                                   # 8 variants x 3 seeds, minutes on a CPU
    python -m llama_mini.ablate --variants relu swiglu --seeds 0 1 2 3 4
    python -m llama_mini.ablate --device cuda --data tinystories --vocab-size 4096 --dim 384 --n-layers 6 \\
        --n-heads 6 --max-seq-len 256 --batch-size 64 --max-steps 5000 --warmup-steps 200 --lr 1e-3 \\
        --min-lr 1e-4 --eval-steps 100 --out runs/ablation-gpu      # a size for a GPU (docs/ABLATION.md)

A small replication of Shazeer (2020), "GLU Variants Improve Transformer", Table 1. Every run has the same
model except its feed-forward, the same tokenizer and prepared data (one train/validation split), the same
steps and settings. Runs with the same seed draw the same training and validation batches, and variants
of the same shapes start from the same weights, so within a seed the variants differ only in the FFN.
Seeds change the initial weights and the order of the batches; the spread over seeds is the noise that a
difference between variants must beat.

Matched parameters: a gated FFN has three d x h matrices, a non-gated one two, so LLaMA's rule gives the
gated variants h = 2/3 * 4d and the others h = 4d (`ffn.llama_hidden_dim`), both rounded up to
`multiple_of`. When 8d/3 and 4d are both multiples of multiple_of the FFNs hold exactly the same number
of parameters: the default dim 96 with multiple_of 32 gives h = 256 and 384, and
3 * 96 * 256 = 2 * 96 * 384 = 73,728 per layer. Otherwise the table says how far apart they are.

The run folder (--out) holds `tokenizer.model` and `data/` (shared by all runs), `runs/VARIANT-seedN/`
(each run's metrics.jsonl; checkpoints are deleted unless --keep-checkpoints), `results.jsonl` (one line
per finished run, appended as it finishes), `ablation.md` (the table and what it says), `ablation.png`
(validation loss per variant beside Shazeer's) and `ablation_curves.png` (training loss against step).
Running the same command again skips finished runs and restarts an unfinished one from its start; adding
seeds or variants to the command extends the ablation. Results made with other settings are refused.

    config.py    AblationConfig: variants, seeds and the shared training and model settings
    runner.py    run_ablation: the shared tokenizer and data, one Trainer per run, results.jsonl
    report.py    the statistics (means over seeds, ranks, the paired gated gap) and ablation.md
    figures.py   ablation.png and ablation_curves.png
    command.py   the command line
"""

from llama_mini.study.ablate.command import main
from llama_mini.study.ablate.config import AblationConfig
from llama_mini.study.ablate.figures import plot_curves, plot_results, training_curves
from llama_mini.study.ablate.report import (
    SHAZEER_TABLE1,
    findings,
    gated_gap,
    markdown_table,
    spearman,
    summarize,
)
from llama_mini.study.ablate.runner import CURVES, PLOT, RESULTS, TABLE, read_results, run_ablation

__all__ = [
    "CURVES",
    "PLOT",
    "RESULTS",
    "SHAZEER_TABLE1",
    "TABLE",
    "AblationConfig",
    "findings",
    "gated_gap",
    "main",
    "markdown_table",
    "plot_curves",
    "plot_results",
    "read_results",
    "run_ablation",
    "spearman",
    "summarize",
    "training_curves",
]
