"""Dashboards (--log tensorboard / wandb), read back with each library's own reader, through a crash and a
resume; the plain progress lines of a run whose output is not a terminal."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_training import (  # noqa: F401 (fixtures)
    TINY_MODEL,
    cli_flags,
    corpus_dir,
    make_config,
    read_metrics,
    run_cli,
    tokenizer_path,
)

from llama_mini import console
from llama_mini.errors import ConfigError
from llama_mini.train import TrainConfig, Trainer
from llama_mini.train import progress as progress_module
from llama_mini.train.tracking import TENSORBOARD_FOLDER, WANDB_RUN_ID


class Killed(Exception):
    """Stands for the process dying mid-run: nothing after it runs, no checkpoint is saved."""


def crash_then_resume(config: TrainConfig, crash_at_step: int) -> None:
    """Train until `crash_at_step` steps are logged, die there (after the checkpoint at eval_interval),
    then resume from that checkpoint to max_steps: the steps after the checkpoint are logged twice."""
    trainer = Trainer(config, TINY_MODEL, show_progress=False)
    original = trainer.train_step

    def dies(step):
        if step == crash_at_step:
            raise Killed
        return original(step)

    trainer.train_step = dies
    with pytest.raises(Killed):
        trainer.run()
    resumed = Trainer(config, {}, resume=True, show_progress=False)
    assert resumed.step == config.eval_interval  # the checkpoint, before the steps that died with the run
    resumed.run()


def as_float32(value: float) -> float:
    return float(np.float32(value))  # TensorBoard keeps scalars in float32


# ------------------------------------------------------------------------------------------ TensorBoard


@pytest.mark.slow
def test_tensorboard_holds_the_values_of_metrics_jsonl_once_per_step_through_a_crash_and_resume(
    corpus_dir, tokenizer_path, tmp_path
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "run"
    config = make_config(
        corpus_dir, tokenizer_path, out, log=["tensorboard"], max_steps=8, eval_interval=4, sample_tokens=6
    )
    crash_then_resume(config, crash_at_step=6)  # steps 5 and 6 were logged, then logged again

    events = EventAccumulator(str(out / TENSORBOARD_FOLDER), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    train, evaluations = read_metrics(out), read_metrics(out, "eval")
    assert [record["step"] for record in train] == list(range(1, 9))
    for name, key in (("loss", "loss"), ("lr", "lr"), ("grad_norm", "grad_norm"), ("tokens", "tokens")):
        logged = [(event.step, event.value) for event in events.Scalars(f"train/{name}")]
        assert logged == [(record["step"], as_float32(record[key])) for record in train], name
    for name, key in (("val/loss", "val_loss"), ("val/bpb", "val_bpb")):
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert logged == [(record["step"], as_float32(record[key])) for record in evaluations] != []

    # the resolved settings: TensorBoard's HPARAMS tab, and config.toml as text
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(3e-3) and hparams["model.dim"].number_value == 32
    settings = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps = 8" in settings

    # a sample at each evaluation, once: the text the run's last one prints (the same seed and weights)
    samples = [
        (event.step, event.tensor_proto.string_val[0].decode())
        for event in events.Tensors("sample/text_summary")
    ]
    assert [step for step, _ in samples] == [4, 8]
    final = Trainer(config, {}, resume=True, show_progress=False).sample(config.sample_prompt, 6)
    assert samples[-1][1] == "\n".join("    " + line for line in final.splitlines())


# ------------------------------------------------------------------------------------------ W&B


def wandb_records(path: Path):
    """The records of a .wandb file, decoded with W&B's own protocol buffer (wandb.proto). The file is a
    LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks each with a 7-byte header: checksum,
    length, type); wandb 0.31 reads it in its Go core only, so the framing is read here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, position, payload = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # too little room in the block for a chunk header: padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if kind == 0:  # zeros: the rest of the block is empty
            position += left
            continue
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def wandb_history(folder: Path) -> tuple[set[str], dict[int, dict]]:
    """The run ids of the offline runs in `folder`, and the values logged at each step, a later session's
    replacing an earlier one's (as W&B keeps one row per step)."""
    ids, history = set(), {}
    for path in sorted(folder.glob("offline-run-*/run-*.wandb")):  # sessions in the order they ran
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
            elif record.WhichOneof("record_type") == "history":
                items = {
                    "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                    for item in record.history.item
                }
                history.setdefault(record.history.step.num, {}).update(items)
    return ids, history


@pytest.mark.slow
def test_wandb_offline_run_history_holds_the_values_of_metrics_jsonl_and_resume_continues_the_run(
    corpus_dir, tokenizer_path, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run's files then go to OUT/wandb/
    out = tmp_path / "run"
    config = make_config(
        corpus_dir, tokenizer_path, out, log=["wandb"], wandb_mode="offline", wandb_project="tests",
        max_steps=8, eval_interval=4,
    )  # fmt: skip
    crash_then_resume(config, crash_at_step=6)

    ids, history = wandb_history(out / "wandb")
    assert ids == {(out / WANDB_RUN_ID).read_text().strip()}  # both sessions log to the run the folder names
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2
    for record in read_metrics(out):
        logged = history[record["step"]]
        assert logged["train/loss"] == record["loss"] and logged["train/lr"] == record["lr"]
        assert logged["train/grad_norm"] == record["grad_norm"]
    evaluations = read_metrics(out, "eval")
    assert [record["step"] for record in evaluations] == [4, 8]
    for record in evaluations:
        assert history[record["step"]]["val/loss"] == record["val_loss"]
        assert history[record["step"]]["val/bpb"] == record["val_bpb"]


# ------------------------------------------------------------------------------------------ settings


def test_log_takes_repeated_and_comma_separated_names_once_each():
    config = TrainConfig(log=["tensorboard,wandb", "tensorboard"])
    assert config.log == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="--log must be one or more of tensorboard, wandb, got mlflow"):
        TrainConfig(log=["mlflow"])


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_dashboard_whose_library_is_missing_is_one_line_naming_pip_install_before_any_work(
    corpus_dir, tokenizer_path, tmp_path, capsys, monkeypatch, name, package
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda module, *rest: None if module == package else find_spec(module, *rest),
    )
    out = tmp_path / "run"
    code, _, err = run_cli(
        [*cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=2), "--log", name], capsys
    )
    assert code == 2
    assert (
        err
        == f"error: --log {name} needs the {package} package, which is not installed: pip install 'llama_mini[{name}]' (or pip install {package})\n"
    )
    assert not out.exists()  # refused before the tokenizer and the data were prepared


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_grad_norm_is_the_global_norm_before_clipping(corpus_dir, tokenizer_path, tmp_path, grad_clip):
    """The norm recomputed from the gradients the optimizer receives: with --grad-clip 0 they are the raw
    ones; with a tiny clip they are scaled down to it, while the log keeps the norm from before."""
    config = make_config(corpus_dir, tokenizer_path, tmp_path / "run", grad_clip=grad_clip)
    trainer = Trainer(config, TINY_MODEL, show_progress=False)
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.double() for p in trainer.raw_model.parameters() if p.grad is not None]
        seen.append(math.sqrt(sum(float((g * g).sum()) for g in grads)))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.train_step(0)
    trainer.step = 1
    recorded = trainer._train_record(1.0, 1.0)["grad_norm"]
    trainer.run_folder.unlock()
    if grad_clip == 0:
        assert recorded == pytest.approx(seen[0], rel=1e-5)
    else:
        assert seen[0] == pytest.approx(grad_clip, rel=1e-4) and recorded > 10 * grad_clip


# ------------------------------------------------------------------------------------------ plain output


def test_a_run_whose_output_is_not_a_terminal_prints_plain_lines_without_carriage_returns(
    corpus_dir, tokenizer_path, tmp_path, capsys
):
    flags = cli_flags(
        corpus_dir, tokenizer_path, out=tmp_path / "run", max_steps=4, log_interval=2, eval_interval=4
    )
    code, _, err = run_cli(flags, capsys)  # capsys: stderr is not a terminal, as with a file or SLURM
    assert code == 0, err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("step ") and "|" in line]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    fields = [part.split(" ")[0] for part in lines[-1].split(" | ")[1:]]
    assert fields[:2] == ["loss", "lr"] and fields[-2:] == ["elapsed", "remaining"]
    assert "tok/s" in lines[-1] and lines[-1].endswith("remaining 0:00:00")


def test_on_a_terminal_the_run_keeps_its_progress_bar(monkeypatch):
    monkeypatch.setattr(progress_module, "stderr_is_terminal", lambda: True)
    bar = progress_module.Progress(10, 0, enabled=True)
    assert bar.bar is not None and not bar.plain
    bar.close()
    monkeypatch.setattr(progress_module, "stderr_is_terminal", lambda: False)
    plain = progress_module.Progress(10, 0, enabled=True)
    assert plain.bar is None and plain.plain


def test_long_work_off_a_terminal_prints_plain_progress_lines(capsys):
    bar = console.PlainProgress(total=4 * 2**20, description="tokenizing", interval=0.0)
    for _ in range(2):
        bar.update(2**20)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("tokenizing: 1.0 MiB of 4.0 MiB (25%) | ") and "remaining" in lines[0]
    assert lines[1].startswith("tokenizing: 2.0 MiB of 4.0 MiB (50%) | ")
    assert lines[2].startswith("tokenizing: 2.0 MiB | ") and "remaining" not in lines[2]  # the last line
    assert isinstance(console.progress_bar(10, "x"), console.PlainProgress)  # capsys: not a terminal


def test_duration_reads_hours_minutes_seconds():
    assert [console.duration(s) for s in (0, 59.6, 245, 3600 * 27 + 61)] == [
        "0:00:00",
        "0:01:00",
        "0:04:05",
        "27:01:01",
    ]


def test_dashboard_names_follow_metrics_jsonl():
    from llama_mini.train.tracking import dashboard_scalars

    train = {"type": "train", "step": 3, "tokens": 96, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "time": 9.0}
    assert dashboard_scalars(train) == {
        "train/tokens": 96.0,
        "train/loss": 2.5,
        "train/lr": 1e-3,
        "train/grad_norm": 0.5,
    }
    evaluation = {
        "type": "eval",
        "step": 3,
        "tokens": 96,
        "val_loss": 2.0,
        "val_bpb": 1.5,
        "val_bpb/wiki": 1.7,
        "eval/arc/acc": 0.25,
    }
    assert dashboard_scalars(evaluation) == {
        "val/tokens": 96.0, "val/loss": 2.0, "val/bpb": 1.5, "val/bpb/wiki": 1.7, "eval/arc/acc": 0.25
    }  # fmt: skip
