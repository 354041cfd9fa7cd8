"""Dashboards: a run's metrics in TensorBoard and Weights & Biases (`--log tensorboard,wandb`).

OUT/metrics.jsonl is always written and stays the record of the run; the dashboards get the same values,
from the same records, as they are written:

    train records   train/loss, train/lr, train/grad_norm (before clipping), train/tokens_per_second,
                    train/tokens, and where known train/mfu and train/peak_memory_bytes
    eval records    val/loss, val/bpb, val/bpb/NAME (each --eval-data corpus), eval/TASK/METRIC
    text            the settings (config.toml) at the start, the sample at the end
    hyperparameters the resolved settings (TensorBoard's HPARAMS tab, W&B's config)

Each dashboard is one small class with the same four methods (`scalars`, `text`, `hyperparameters`,
`close`); `Dashboards` sends every record to each one asked for. Only the main process of a torchrun job
opens them.

A resumed run continues the same curves. The steps a run logged after its last checkpoint (it was killed)
are logged again by the resumed run, so each dashboard drops what came after the checkpoint first, as
metrics.jsonl does: TensorBoard's writer is opened with `purge_step` at the first step the resumed run
logs, which hides the older events from that step on; a W&B run is continued by its id (kept in
OUT/wandb_run_id), and online, where W&B says which step it holds, the steps it has are not sent again.
Offline W&B knows no history: the resumed session sends those steps again (the same losses: a resume is
exact).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from llama_mini.errors import ConfigError
from llama_mini.files import atomic_file

__all__ = [
    "DASHBOARDS",
    "TENSORBOARD_FOLDER",
    "WANDB_RUN_ID",
    "Dashboards",
    "check_dashboards_installed",
    "dashboard_scalars",
]

DASHBOARDS = ("tensorboard", "wandb")
TENSORBOARD_FOLDER = "tensorboard"  # OUT/tensorboard/: the event files (`tensorboard --logdir OUT`)
WANDB_RUN_ID = "wandb_run_id"  # OUT/wandb_run_id: the W&B run this folder's run logs to
# the package each dashboard needs, and the line that installs it
INSTALL = {
    "tensorboard": ("tensorboard", "pip install 'llama_mini[tensorboard]' (or pip install tensorboard)"),
    "wandb": ("wandb", "pip install 'llama_mini[wandb]' (or pip install wandb)"),
}
# record keys that are not values to plot
NOT_SCALARS = ("type", "step", "time")


def check_dashboards_installed(names: list[str]) -> None:
    """ConfigError naming the `pip install` that fixes it, for a dashboard whose library is missing
    (checked before any slow work; the libraries themselves are imported when the run starts)."""
    for name in names:
        package, install = INSTALL[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"--log {name} needs the {package} package, which is not installed: {install}")


def dashboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's values under their dashboard names: a train record's under train/, an
    evaluation's val_* as val/* (val_bpb/NAME as val/bpb/NAME) and harness scores as they are."""
    scalars = {}
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if record["type"] == "train":
            name = f"train/{key}"
        elif key.startswith("val_"):
            name = "val/" + key.removeprefix("val_")
        else:
            name = key if "/" in key else f"val/{key}"  # eval/TASK/METRIC, or the step's token count
        scalars[name] = float(value)
    return scalars


class Dashboard(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def text(self, step: int, name: str, text: str) -> None: ...
    def hyperparameters(self, settings: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    """Event files in OUT/tensorboard/, written by torch's SummaryWriter."""

    def __init__(self, out: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of an earlier session at first_step or later are hidden (the run was killed
        # after its last checkpoint and logs those steps again)
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_FOLDER), purge_step=first_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def text(self, step: int, name: str, text: str) -> None:
        # TensorBoard renders text as Markdown: indented four spaces, it shows as written
        self.writer.add_text(name, "\n".join("    " + line for line in text.splitlines()), step)

    def hyperparameters(self, settings: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The HPARAMS tab, in this run's own event file (SummaryWriter.add_hparams would start another
        # run in a subfolder); its values must be numbers, strings or booleans.
        shown = {name: _hparam_value(value) for name, value in settings.items()}
        for summary in hparams(shown, {"val/loss": math.nan}):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.close()


def _hparam_value(value: Any) -> int | float | str | bool:
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else json.dumps(value)


class WandB:
    """A W&B run: online, offline (synced later with `wandb sync`) or disabled, by --wandb-mode or W&B's
    own environment variables (WANDB_MODE, WANDB_PROJECT, WANDB_DIR, ...). The run id is kept in the run
    folder, so a resumed run logs to the same W&B run; its files go to OUT/wandb/ unless WANDB_DIR says."""

    def __init__(self, out: Path, first_step: int, project: str | None, name: str | None, mode: str | None):
        import wandb

        id_file = out / WANDB_RUN_ID
        options: dict[str, Any] = {}
        if first_step > 1 and id_file.exists():  # resumed: the same W&B run, continued
            options.update(id=id_file.read_text().strip(), resume="allow")
        if "WANDB_DIR" not in os.environ:
            options["dir"] = str(out)
        self.run = wandb.init(project=project, name=name or out.resolve().name, mode=mode, **options)
        if "id" not in options:  # a new run: W&B chose its id
            with atomic_file(id_file) as file:
                file.write((self.run.id + "\n").encode())
        # W&B keeps one value per step, in increasing steps: a resumed run's steps that W&B already has
        # (logged after the checkpoint by the session that was killed) are not sent again.
        self.first_new_step = max(first_step, self.run.step or 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if step >= self.first_new_step:
            self.run.log(values, step=step)

    def text(self, step: int, name: str, text: str) -> None:
        if step >= self.first_new_step:
            self.run.log({name: text}, step=step)

    def hyperparameters(self, settings: dict[str, Any]) -> None:
        self.run.config.update(settings, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


class Dashboards:
    """The dashboards a run logs to (none: every method does nothing)."""

    def __init__(
        self,
        names: list[str],
        out: Path,
        first_step: int,
        wandb_project: str | None = None,
        wandb_name: str | None = None,
        wandb_mode: str | None = None,
    ):
        """`first_step`: the first step this session logs (a resumed run's checkpoint step + 1)."""
        self.open: list[Dashboard] = []
        try:
            for name in names:
                if name == "tensorboard":
                    self.open.append(TensorBoard(out, first_step))
                elif name == "wandb":
                    self.open.append(WandB(out, first_step, wandb_project, wandb_name, wandb_mode))
        except BaseException:
            self.close()
            raise

    def record(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record (a train step's or an evaluation's) as scalars at its step."""
        if self.open:
            values = dashboard_scalars(record)
            for dashboard in self.open:
                dashboard.scalars(record["step"], values)

    def text(self, step: int, name: str, text: str) -> None:
        for dashboard in self.open:
            dashboard.text(step, name, text)

    def hyperparameters(self, settings: dict[str, Any]) -> None:
        for dashboard in self.open:
            dashboard.hyperparameters(settings)

    def close(self) -> None:
        for dashboard in self.open:
            dashboard.close()
        self.open = []
