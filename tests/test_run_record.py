"""The run's record tells the truth: config.toml after a resume or a --config rerun reproduces the run it
describes, derived values are derived again, config files are type-checked, a resumed run keeps its data,
and the cases that used to end in tracebacks or misleading lines end in one line."""

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import (  # noqa: F401 (fixtures)
    TINY_MODEL,
    cli_flags,
    corpus_dir,
    make_config,
    read_metrics,
    stop_after,
    tokenizer_path,
)

import train as train_cli
from llama_mini import runtime as runtime_module
from llama_mini.convert import main as convert_main
from llama_mini.errors import ConfigError
from llama_mini.files import waiting_lock
from llama_mini.model.args import ModelArgs
from llama_mini.ops import fast_paths as fast_paths_module
from llama_mini.settings import read_config_file
from llama_mini.tokenizer import Tokenizer, train_tokenizer
from llama_mini.train import build as build_module
from llama_mini.train import config as config_module
from llama_mini.train import run_folder as run_folder_module
from llama_mini.train import trainer as trainer_module
from llama_mini.train.config import (
    FINE_TUNING_WEIGHT_DECAY,
    FROM_SCRATCH_WARMUP,
    TrainConfig,
    check_resolved_record,
    read_run_config,
    resumed_settings,
    write_run_config,
)
from llama_mini.train.run_folder import write_failure
from llama_mini.train.trainer import Trainer

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


REPO = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    code = train_cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def saved_train_config(out):
    return tomllib.loads((out / "config.toml").read_text())["train"]


def test_config_toml_follows_a_resume_that_changes_max_steps(corpus_dir, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "run"
    flags = cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=2, eval_interval=2)
    assert run_cli(flags, capsys)[0] == 0
    assert saved_train_config(out)["max_steps"] == 2
    code, _, err = run_cli(["--out", out, "--resume", "--max-steps", 4], capsys)
    assert code == 0, err
    assert saved_train_config(out)["max_steps"] == 4


def test_a_derived_value_is_derived_again_from_a_changed_input(corpus_dir, tokenizer_path, tmp_path, capsys):
    """min_lr defaults to lr / 100 from scratch: rerunning a run's config.toml with another --lr gives that
    lr / 100, as a fresh run with that --lr does, not the first run's min_lr frozen as if the user had set
    it."""
    first = tmp_path / "first"
    flags = cli_flags(corpus_dir, tokenizer_path, out=first, max_steps=1)
    assert run_cli(flags, capsys)[0] == 0
    text = (first / "config.toml").read_text()
    assert "# min_lr = 4e-05  (derived)" in text and "# lr = 0.004  (derived)" in text
    assert "min_lr" not in saved_train_config(first)  # a comment: read back, it is derived again

    again = tmp_path / "again"
    code, _, err = run_cli(["--config", first / "config.toml", "--out", again, "--lr", "1e-3"], capsys)
    assert code == 0, err
    state = json.loads((again / "step-0000001" / "trainer_state.json").read_text())
    assert state["train_config"]["lr"] == 1e-3 and state["train_config"]["min_lr"] is None  # derived
    assert "# min_lr = 1e-05  (derived)" in (again / "config.toml").read_text()
    assert saved_train_config(again)["lr"] == 1e-3


def test_to_dict_and_replace_keep_derived_values_derived():
    config = TrainConfig(lr=1e-3)
    assert (config.min_lr, config.derived) == (1e-5, ("min_lr", "weight_decay", "warmup_steps"))
    assert config.to_dict()["min_lr"] is None and config.to_dict()["lr"] == 1e-3
    assert config.replace(lr=4e-3).min_lr == 4e-5  # dataclasses.replace would keep 1e-5
    assert config.replace(init_from="m").weight_decay == FINE_TUNING_WEIGHT_DECAY  # derived again
    assert TrainConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.0).derived == ("warmup_steps",)  # set: kept


def test_a_resume_keeps_the_derived_values_it_trained_with_unless_an_input_changes(monkeypatch):
    """A checkpoint records the values its derived settings took; a newer llama_mini whose defaults differ
    resumes with those, and derives a value again only where the resume changes what it derives from."""
    started = TrainConfig(max_steps=100)
    assert (started.lr, started.min_lr, started.warmup_steps) == (4e-3, 4e-5, 10)
    saved = {
        "train_config": started.to_dict(),
        "model_args": {},
        "resolved": {"lr": 4e-3, "min_lr": 4e-5, "weight_decay": 1.0, "warmup_steps": 10, "dtype": "fp32"},
    }
    # Today's rules: another from-scratch lr, decay and warmup.
    monkeypatch.setattr(config_module, "FROM_SCRATCH_LR", 1e-3)
    monkeypatch.setattr(config_module, "FROM_SCRATCH_DECAY", 10)
    monkeypatch.setattr(config_module, "FROM_SCRATCH_WARMUP", 5)

    config, _, kept = resumed_settings(saved, {}, {}, "out")
    assert (config.lr, config.min_lr, config.weight_decay, config.warmup_steps) == (4e-3, 4e-5, 1.0, 10)
    assert kept == {"lr": (4e-3, 1e-3), "min_lr": (4e-5, 1e-4), "warmup_steps": (10, 5)}
    assert config.derived == started.derived and config.to_dict()["lr"] is None  # still derived, not set
    assert resumed_settings(saved, {"max_steps": 100}, {}, "out")[0].warmup_steps == 10  # the same value

    config, _, kept = resumed_settings(saved, {"lr": 2e-3}, {}, "out")
    assert (config.lr, config.min_lr, config.warmup_steps) == (2e-3, 2e-4, 10)  # min_lr by today's rule
    assert kept == {"warmup_steps": (10, 5)}
    config, _, _ = resumed_settings(saved, {"max_steps": 30}, {}, "out")
    assert (config.lr, config.warmup_steps) == (4e-3, 3)  # a tenth of the new run, as a new run's

    before_the_record = {name: value for name, value in saved.items() if name != "resolved"}
    config, _, kept = resumed_settings(before_the_record, {}, {}, "out")
    assert (config.lr, config.min_lr, config.warmup_steps, kept) == (1e-3, 1e-4, 5, {})


def test_a_resume_keeps_the_machines_choices_on_the_same_kind_of_device_where_they_run(monkeypatch):
    recorded = {"device": "cpu", "dtype": "bf16", "compile": True, "fused_adamw": False,
                "attention": "auto", "swiglu_kernel": "eager", "loss_chunk_size": 1024}  # fmt: skip
    cpu = torch.device("cpu")
    monkeypatch.setattr(build_module, "cpu_compile_works", lambda: True)
    own = build_module.own_choices(TrainConfig(), recorded, cpu)
    assert own == {"dtype": "bf16", "compile": True, "fused_adamw": False, "swiglu_kernel": "eager",
                   "loss_chunk_size": 1024}  # fmt: skip
    given = TrainConfig(dtype="fp32", compile=False, loss_chunk_size=0)  # flags win over the record
    assert build_module.own_choices(given, recorded, cpu) == {"fused_adamw": False, "swiglu_kernel": "eager"}
    again = build_module.own_choices(TrainConfig(), recorded, cpu, given={"dtype": "auto", "compile": None})
    assert "dtype" not in again and "compile" not in again  # --dtype auto on resume: today's choice
    assert build_module.own_choices(TrainConfig(), {**recorded, "device": "cuda"}, cpu) == {}  # moved
    assert build_module.own_choices(TrainConfig(), {}, cpu) == {}  # a checkpoint without the record
    monkeypatch.setattr(build_module, "cpu_compile_works", lambda: False)  # no C++ compiler here
    assert "compile" not in build_module.own_choices(TrainConfig(), recorded, cpu)


def test_a_run_resumed_after_the_defaults_changed_equals_an_uninterrupted_one(
    corpus_dir, tokenizer_path, tmp_path, monkeypatch, capsys
):
    """Interrupted, then resumed by a llama_mini whose defaults differ (the from-scratch schedule, --dtype
    auto on this CPU, the loss's default), the run goes on with what it started with: the same losses,
    step for step, as a run never stopped, and one line saying what it kept."""
    monkeypatch.setattr(runtime_module, "cpu_has_bf16_matrix_units", lambda: False)  # auto: fp32 here
    settings = dict(max_steps=10, eval_interval=5, lr=None, min_lr=None, warmup_steps=None, dtype="auto")
    Trainer(make_config(corpus_dir, tokenizer_path, tmp_path / "whole", **settings), TINY_MODEL,
            show_progress=False).run()  # fmt: skip
    broken = Trainer(make_config(corpus_dir, tokenizer_path, tmp_path / "broken", **settings), TINY_MODEL,
                     show_progress=False)  # fmt: skip
    assert (broken.config.lr, broken.config.warmup_steps, broken.dtype) == (4e-3, 1, torch.float32)
    stop_after(broken, 3)
    assert broken.run().step == 3
    capsys.readouterr()

    monkeypatch.setattr(config_module, "FROM_SCRATCH_LR", 1e-3)
    monkeypatch.setattr(config_module, "FROM_SCRATCH_WARMUP", 0)
    monkeypatch.setattr(runtime_module, "cpu_has_bf16_matrix_units", lambda: True)  # auto: bf16 now
    monkeypatch.setattr(fast_paths_module, "chunked_loss_pays", lambda *_: True)
    resumed = Trainer(make_config(corpus_dir, tokenizer_path, tmp_path / "broken", **settings), {},
                      resume=True, show_progress=False)  # fmt: skip
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resuming")]
    assert len(said) == 1 and said[0].startswith(
        "resuming with the run's own --lr 0.004 (a new run here: 0.001), --min-lr 4e-05 (a new run here: 1e-05)"
    ), said
    for kept in ("--warmup-steps 1 (a new run here: 0)", "--dtype fp32 (a new run here: bf16)",
                 "--loss-chunk-size 0 (a new run here: 1024)"):  # fmt: skip
        assert kept in said[0]
    assert (resumed.dtype, resumed.fast_paths.loss_chunk_size, resumed.config.lr) == (torch.float32, 0, 4e-3)
    resumed.run()
    expected = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "whole")]
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "broken")] == expected  # bit for bit
    state = json.loads((tmp_path / "broken" / "step-0000010" / "trainer_state.json").read_text())
    assert state["train_config"]["lr"] is None and state["train_config"]["dtype"] == "auto"  # as chosen
    assert {name: state["resolved"][name] for name in ("lr", "warmup_steps", "dtype", "loss_chunk_size")} == {
        "lr": 4e-3, "warmup_steps": 1, "dtype": "fp32", "loss_chunk_size": 0
    }  # fmt: skip
    record = (tmp_path / "broken" / "config.toml").read_text()
    assert "# lr = 0.004  (derived)" in record
    assert (
        "# This run trained on\n#     cpu, float32; fast paths: compile off," in record
    )  # what auto came to


def test_a_damaged_record_of_the_resolved_settings_is_one_line_naming_the_file(
    corpus_dir, tokenizer_path, tmp_path, capsys
):
    out = tmp_path / "run"
    assert (
        run_cli(cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=2, eval_interval=2), capsys)[0] == 0
    )
    state_file = out / "step-0000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(
        json.dumps({**state, "resolved": {**state["resolved"], "dtype": "fp64", "lr": "x"}})
    )
    code, _, err = run_cli(["--out", out, "--resume", "--max-steps", 3], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert (
        err.startswith(f"error: {state_file} is damaged: resolved lr = 'x' must be a number")
        and "fp64" in err
    )
    del state["resolved"]  # as the line says: without it, the run resumes on today's defaults
    state_file.write_text(json.dumps(state))
    assert run_cli(["--out", out, "--resume", "--max-steps", 3], capsys)[0] == 0


@pytest.mark.parametrize(
    "resolved, message",
    [
        ({"lr": None}, "resolved lr = None must be a number"),
        ({"device": 5}, "resolved device = 5 must be a string"),
        ({"compile": "yes"}, "resolved compile = 'yes' must be true or false"),
        ([1, 2], "resolved must be a table, got list"),
    ],
)
def test_each_damaged_value_of_the_record_is_named(resolved, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'state.json'} is damaged: {message}")):
        check_resolved_record(resolved, tmp_path / "state.json")
    check_resolved_record({"lr": 4e-3, "device": "cpu", "dtype": "bf16", "loss_chunk_size": None}, tmp_path)


def test_a_default_warmup_is_at_most_a_tenth_of_the_run():
    assert TrainConfig(max_steps=20).warmup_steps == 2  # the README's 20-step run leaves its warmup
    assert TrainConfig(max_steps=600).warmup_steps == FROM_SCRATCH_WARMUP == 20
    assert TrainConfig(max_steps=20, warmup_steps=15).warmup_steps == 15  # a chosen warmup is kept
    assert TrainConfig(max_steps=40, init_from="m").warmup_steps == 4


@pytest.mark.parametrize(
    "line, message",
    [
        ('lr = "1e-3"', "[train] lr = '1e-3' must be a number"),
        ('max_steps = "twenty"', "[train] max_steps = 'twenty' must be an integer"),
        ("max_steps = 20.7", "[train] max_steps = 20.7 must be an integer"),
        ("compile = 1", "[train] compile = 1 must be true or false"),
        ('dtype = "fp64"', "[train] dtype = 'fp64' must be one of 'auto', 'fp32', 'bf16', 'fp16'"),
    ],
)
def test_every_config_table_is_type_checked_in_one_line(tmp_path, capsys, line, message):
    path = tmp_path / "run.toml"
    path.write_text(f"[train]\n{line}\n")
    code, out, err = run_cli(["--config", path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: --config {path}: {message}"), err
    assert not (tmp_path / "o").exists()


def test_the_type_check_accepts_every_default_and_an_int_for_a_float(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlr = 1\nmax_steps = 3\n[model]\ndim = 64\nrope_scaling = {factor = 8.0}\n")
    train, model = read_run_config(path)
    assert train == {"lr": 1, "max_steps": 3} and model["rope_scaling"] == {"factor": 8.0}
    written = tmp_path / "all.toml"
    write_run_config(written, TrainConfig(), ModelArgs())
    assert read_config_file(written, {"train": TrainConfig, "model": ModelArgs})["train"]["max_steps"] == 500


def test_resume_with_another_corpus_is_refused(corpus_dir, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=1), capsys)[0] == 0
    other = tmp_path / "other.txt"
    other.write_text("another corpus entirely\n" * 50)
    code, _, err = run_cli(["--out", out, "--resume", "--max-steps", 2, "--data", other], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--data {other} differs from the resumed run's {corpus_dir}" in err


def test_resuming_a_finished_run_says_so_and_how_to_go_on(corpus_dir, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=2), capsys)[0] == 0
    before = sorted(path.name for path in out.iterdir())
    code, stdout, err = run_cli(["--out", out, "--resume"], capsys)
    assert code == 0 and stdout == ""
    assert f"{out} is finished: it trained all 2 of its 2 steps" in err and "--max-steps 4" in err
    assert sorted(path.name for path in out.iterdir()) == before  # nothing trained, sampled or written


def test_an_output_path_under_a_file_is_one_line(corpus_dir, tokenizer_path, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    flags = cli_flags(corpus_dir, tokenizer_path, out=tmp_path / "run", max_steps=1)
    code, _, err = run_cli([*flags, "--data-dir", blocker / "data"], capsys)
    assert (
        code == 2
        and err
        == f"error: --data-dir {blocker / 'data'}: {blocker} is a file, not a folder; choose another path\n"
    )
    code, _, err = run_cli([*flags[:-2], "--out", blocker / "run"], capsys)
    assert code == 2 and f"{blocker} is a file, not a folder" in err and err.count("\n") == 1
    assert convert_main([str(tmp_path / "missing"), str(blocker / "dst")]) == 2
    assert f"DST {blocker / 'dst'}: {blocker} is a file" in capsys.readouterr().err


def test_ctrl_c_while_preparing_says_so_and_leaves_no_empty_folder(
    corpus_dir, tokenizer_path, tmp_path, capsys, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "prepare_tokenizer", interrupted)
    out = tmp_path / "run"
    code, _, err = run_cli(cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=1), capsys)
    assert code == 130
    assert err.startswith("interrupted before the first step") and err.count("\n") == 1
    assert not out.exists()


def test_runs_with_other_tokenizers_keep_apart_in_a_shared_data_dir(
    corpus_dir, tokenizer_path, tmp_path, capsys
):
    """A shared --data-dir holds one folder per tokenizer: the second run does not re-tokenize over the
    shards the first one reads."""
    other = tmp_path / "other.model"
    train_tokenizer([path.read_text() for path in sorted(corpus_dir.glob("*.txt"))], other, vocab_size=320)
    shared = tmp_path / "shared"
    first = cli_flags(corpus_dir, tokenizer_path, out=tmp_path / "a", max_steps=1, data_dir=shared)
    assert run_cli(first, capsys)[0] == 0
    (folder,) = [path for path in shared.iterdir() if path.is_dir()]  # beside it: its preparation lock
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    second = cli_flags(corpus_dir, other, out=tmp_path / "b", max_steps=1, data_dir=shared)
    assert run_cli(second, capsys)[0] == 0
    folders = sorted(path for path in shared.iterdir() if path.is_dir())
    assert len(folders) == 2 and all(path.name.startswith("tokenizer-") for path in folders)
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before
    shas = {Tokenizer(tokenizer_path).sha256[:12], Tokenizer(other).sha256[:12]}
    assert {path.name.removeprefix("tokenizer-") for path in folders} == shas


HOLD_LOCK = """
import sys, time
from llama_mini.train.run_folder import RunFolder
assert RunFolder(sys.argv[1]).lock() is None
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_folder_belongs_to_one_run_and_a_killed_run_leaves_no_lock(
    corpus_dir, tokenizer_path, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        flags = cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=1)
        code, _, err = run_cli(flags, capsys)
        assert code == 2 and err.count("\n") == 1
        assert err == (
            f"error: --out {out} is in use by another run (process {holder.pid}): wait for it to end, or "
            "choose another --out\n"
        )
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # as kill -9: the kernel drops its lock
        holder.wait()
    assert run_cli(flags, capsys)[0] == 0


def test_a_shared_data_dir_being_prepared_is_waited_for(tmp_path):
    lock = tmp_path / ".data.lock"
    said = []
    with waiting_lock(lock, lambda: said.append("waiting")):
        holder = subprocess.run(
            [sys.executable, "-c", WAIT_FOR_LOCK, str(lock)], capture_output=True, text=True, timeout=60
        )
    assert holder.stdout.split() == ["busy"]  # another process could not take it while this one held it
    with waiting_lock(lock, lambda: said.append("waiting")):
        pass
    assert said == []  # free again: no wait


WAIT_FOR_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a+") as handle:
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("free")
    except OSError:
        print("busy")
"""


def test_a_checkpoint_that_meets_a_full_disk_is_one_line_and_leaves_nothing_half_written(
    corpus_dir, tokenizer_path, tmp_path, capsys, monkeypatch
):
    """A writer that runs out of space half way through step 4's weights: the run stops in one line naming
    the cause and the last complete checkpoint, no `.partial-` folder stays, and --resume continues."""
    real_save = trainer_module.save_pretrained

    def fills_the_disk(model, folder, **options):
        if folder.name == ".partial-step-0000004":
            (folder / "model.safetensors").write_bytes(b"half of the weights")
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))
        real_save(model, folder, **options)

    monkeypatch.setattr(trainer_module, "save_pretrained", fills_the_disk)
    out = tmp_path / "run"
    flags = cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=6, eval_interval=2)
    code, _, err = run_cli(flags, capsys)
    # the one error line (the progress bar, drawn on stderr too, may share its start)
    (line,) = [line[line.index("error: ") :] for line in err.splitlines() if "error: " in line]
    assert code == 2 and "Traceback" not in err
    assert line.startswith(
        f"error: cannot write checkpoint step-0000004 in {out}: no space left on the device"
    )
    assert f"the last complete checkpoint, {out / 'step-0000002'}, is untouched" in line
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(("step-", ".partial"))) == [
        "step-0000002"
    ]
    monkeypatch.setattr(trainer_module, "save_pretrained", real_save)
    code, out_text, err = run_cli(["--out", out, "--resume"], capsys)
    assert code == 0, err
    assert "done: 6 steps" in out_text


def test_a_disk_too_full_for_the_next_checkpoint_is_said_before_writing(
    corpus_dir, tokenizer_path, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    real_usage = shutil.disk_usage

    def nearly_full(path):
        usage = real_usage(path)
        full = any(out.glob("step-*"))  # after the first checkpoint, as if it had filled the disk
        return usage._replace(free=1000) if full else usage

    monkeypatch.setattr(run_folder_module.shutil, "disk_usage", nearly_full)
    flags = cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=4, eval_interval=2)
    code, _, err = run_cli(flags, capsys)
    (line,) = [line[line.index("error: ") :] for line in err.splitlines() if "error: " in line]
    assert code == 2 and "Traceback" not in err
    assert "cannot write checkpoint step-0000004" in line and "MiB free, and the last checkpoint took" in line
    assert not list(out.glob(".partial-*")) and [path.name for path in out.glob("step-*")] == ["step-0000002"]


def test_a_write_failure_is_named_by_its_cause():
    folder = Path("/tmp")
    assert write_failure(OSError(errno.EROFS, "Read-only file system", "/x"), folder) == (
        "the file system is read-only (/x)"
    )
    assert write_failure(OSError(errno.EACCES, "Permission denied", "/x"), folder) == "permission denied (/x)"
    assert write_failure(OSError(errno.ENOENT, "No such file", "/x"), folder) is None  # not a write failure
    assert write_failure(RuntimeError("a bug"), folder) is None  # plenty of space: a bug keeps its traceback
