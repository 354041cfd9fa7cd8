"""Training curves from runs' metrics.jsonl, overlaid: loss by step, by tokens and by wall time (the
validation points marked), learning rate, throughput and gradient norm, each run labelled by its folder.

llama-mini plots training RUN [RUN ...] [--out DIR]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_mini.study.plots.style import (
    PlotError,
    check_format,
    figure_style,
    make_output_folder,
    new_figure,
    save_figure,
)

__all__ = ["METRICS_FILE", "RunMetrics", "plot_training", "read_metrics", "run_labels", "wall_seconds"]

METRICS_FILE = "metrics.jsonl"  # what training.METRICS names; not imported, to keep this module light
_TRAIN_FIELDS = ("step", "tokens", "loss", "lr", "tokens_per_second")
_EVAL_FIELDS = ("step", "tokens", "val_loss")


@dataclass
class RunMetrics:
    """One run's metrics.jsonl: its "train" records and its "eval" records, each in the order logged."""

    label: str
    path: Path
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def read_metrics(run: str | Path, label: str | None = None) -> RunMetrics:
    """Read a run folder's metrics.jsonl (or that file itself); a PlotError names the file and line if the
    log is missing, empty or garbled. Records of other types are skipped."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path}: no such file; pass a run folder written by train.py or its {METRICS_FILE}")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PlotError(f"{path}: cannot be read ({type(error).__name__}); check the file") from None
    train, evaluations = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PlotError(
                f"{path}: line {number} is not JSON ({error.msg}); is this a metrics.jsonl?"
            ) from None
        if not isinstance(record, dict):
            raise PlotError(f"{path}: line {number} is not a JSON object; is this a metrics.jsonl?")
        kind = record.get("type")
        if kind not in ("train", "eval"):
            continue
        fields = _TRAIN_FIELDS if kind == "train" else _EVAL_FIELDS
        for field in fields:
            value = record.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PlotError(
                    f"{path}: line {number} ({kind}) has no number {field!r}; "
                    "is this a metrics.jsonl written by train.py?"
                )
        (train if kind == "train" else evaluations).append(record)
    if not train and not evaluations:
        raise PlotError(
            f"{path}: holds no train or eval records; the run has not logged yet "
            "(it logs every --log-interval steps)"
        )
    return RunMetrics(label or path.resolve().parent.name, path, train, evaluations)


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name, or the path as given where two runs share a folder name."""
    names = [(Path(run) if Path(run).is_dir() else Path(run).parent).resolve().name for run in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs, strict=True)]


def wall_seconds(run: RunMetrics) -> tuple[list[float], list[float]]:
    """Seconds since the run started at each train record and each evaluation (from their `time`).

    The start is the first train record's time less its window's training time (its tokens over its
    tokens/s); a run that was stopped and resumed keeps the pause in its clock."""
    first = run.train[0] if run.train else None
    if first is None or "time" not in first:
        return [], []
    # the first window trained every token the first record counts: from step 0 to its step
    window = first["tokens"] / first["tokens_per_second"] if first["tokens_per_second"] > 0 else 0.0
    start = first["time"] - window

    def seconds(records: list[dict[str, Any]]) -> list[float]:
        return [record["time"] - start for record in records if "time" in record]

    return seconds(run.train), seconds(run.eval)


def _time_unit(longest: float) -> tuple[str, float]:
    """The unit that reads best for a run of `longest` seconds, and its length in seconds."""
    if longest < 120:
        return "seconds", 1.0
    return ("minutes", 60.0) if longest < 7200 else ("hours", 3600.0)


def plot_training(runs: Sequence[str | Path], out: str | Path, image_format: str = "png") -> list[Path]:
    """training.<format>: loss against steps, tokens and wall time; learning rate, throughput and the
    gradient norm before clipping; runs overlaid.

    Train loss is solid, validation loss dashed with its points marked, each run in its own colour and
    labelled by its folder's name; the legend gives each run's best validation loss.
    """
    check_format(image_format)
    if not runs:
        raise PlotError("no runs given: pass one or more run folders or metrics.jsonl files")
    metrics = [read_metrics(run, label) for run, label in zip(runs, run_labels(runs), strict=True)]
    folder = make_output_folder(out)
    with figure_style():
        from matplotlib.ticker import EngFormatter

        figure = new_figure(17, 8)
        (step_axes, token_axes, time_axes), (lr_axes, speed_axes, norm_axes) = figure.subplots(2, 3)
        clocks = [wall_seconds(run) for run in metrics]
        unit, unit_seconds = _time_unit(max((max(train + evals, default=0) for train, evals in clocks)))
        for index, (run, (train_seconds, eval_seconds)) in enumerate(zip(metrics, clocks, strict=True)):
            line = {"color": f"C{index % 10}", "linewidth": 1.5}
            best = min((record["val_loss"] for record in run.eval), default=None)
            train_label = run.label + (f" (best val {best:.3f})" if best is not None else "") + ": train"
            columns = {
                step_axes: (_column(run.train, "step"), _column(run.eval, "step")),
                token_axes: (_column(run.train, "tokens"), _column(run.eval, "tokens")),
                time_axes: (
                    [value / unit_seconds for value in train_seconds],
                    [value / unit_seconds for value in eval_seconds],
                ),
            }
            for axes, (train_x, eval_x) in columns.items():
                if train_x:
                    axes.plot(train_x, _column(run.train, "loss"), **line, label=train_label)
                if run.eval and eval_x:
                    axes.plot(
                        eval_x, _column(run.eval, "val_loss"), "--o", **line, markersize=4,
                        label=f"{run.label}: validation",
                    )  # fmt: skip
            steps = _column(run.train, "step")
            lr_axes.plot(steps, _column(run.train, "lr"), **line, label=run.label)
            speed_axes.plot(steps, _column(run.train, "tokens_per_second"), **line, label=run.label)
            norms = [(record["step"], record["grad_norm"]) for record in run.train if "grad_norm" in record]
            if norms:
                norm_axes.plot(*zip(*norms, strict=True), **line, label=run.label)

        loss_label = "cross-entropy (nats / token)"
        step_axes.set(title="loss by step (train solid, validation dashed)", xlabel="optimizer step")
        token_axes.set(title="loss by training tokens seen", xlabel="tokens")
        time_axes.set(title="loss by wall time", xlabel=f"{unit} since the start")
        lr_axes.set(
            title="learning rate (warmup, then cosine)", xlabel="optimizer step", ylabel="learning rate"
        )
        speed_axes.set(title="throughput, per logging window", xlabel="optimizer step", ylabel="tokens / s")
        norm_axes.set(
            title="gradient norm, before clipping", xlabel="optimizer step", ylabel="global L2 norm"
        )
        for axes in (step_axes, token_axes, time_axes):
            axes.set_ylabel(loss_label)
        token_axes.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not 1200000 or 1.2e6
        speed_axes.yaxis.set_major_formatter(EngFormatter(sep=""))
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        speed_axes.set_ylim(bottom=0)
        step_axes.legend()
        if len(metrics) > 1:
            lr_axes.legend()
        figure.suptitle(f"Training: {', '.join(run.label for run in metrics)}", fontsize=12)
        return [save_figure(figure, folder, "training", image_format)]


def _column(records: list[dict[str, Any]], field: str) -> list[float]:
    return [record[field] for record in records]
