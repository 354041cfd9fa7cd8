"""Faults a machine brings, injected for real (issue 31): a write the kernel refuses part way through, and
kill -9 at chosen points of a checkpoint's save. After each, the command said what happened in one line (or
was killed, with no chance to), nothing half-written is left in the way, and the next command continues
exactly: the losses of the finished run equal those of a run that met no fault, step for step.

A refused write comes from the kernel itself, for every writer alike (safetensors in Rust, torch's C++
serializer, torch.distributed.checkpoint, numpy, plain Python): the faulty process runs under a file-size
limit (RLIMIT_FSIZE, what `ulimit -f` sets), so a write that would make a file larger than the limit fails
with EFBIG as a write to a full disk fails with ENOSPC. (Python ignores SIGXFSZ, so the write returns the
error instead of the kernel ending the process.) A killed preparation and a damaged shard are covered in
tests/test_data_prepare.py and tests/test_data_checks.py; two runs on one folder in tests/test_run_record.py.

Each fault runs train.py in a child process; a run that meets none runs in this one. Same process count,
same kernels, same shapes: the losses are compared bit for bit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import cli_flags, corpus_dir, tokenizer_path  # noqa: F401 (fixtures)

import train as train_cli
from llama_mini.data.shards import MANIFEST

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGKILL as on Linux")

# Runs train.py's main in a child with one fault: `limit BYTES` (the file-size limit) or `kill MODULE:NAME
# COUNT` (SIGKILL right after the COUNT-th call of that function returns).
FAULTY_TRAIN = """
import os, resource, signal, sys
import train
from llama_mini.train import run_folder, trainer

fault, *rest = sys.argv[1:]
if fault == "limit":
    limit, argv = int(rest[0]), rest[1:]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
else:
    (module_name, name), count, argv = rest[0].split(":"), int(rest[1]), rest[2:]
    module = {"run_folder": run_folder, "trainer": trainer}[module_name]
    original, calls = getattr(module, name), [0]

    def then_kill(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, then_kill)
sys.exit(train.main(argv))
"""


def faulty_train(*fault_and_argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FAULTY_TRAIN, *map(str, fault_and_argv)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def train(argv, capsys) -> str:
    code = train_cli.main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    return err


def losses(out: Path) -> list[tuple]:
    """Every logged loss of a run: (kind, step, value), the validation ones included."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss"))) for r in records if "step" in r]


def error_line(err: str) -> str:
    """The one `error: ` line (the progress bar, drawn on stderr too, may share its start)."""
    (line,) = [line[line.index("error: ") :] for line in err.splitlines() if "error: " in line]
    return line


def leftovers(out: Path) -> list[str]:
    return sorted(path.name for path in out.iterdir() if path.name.startswith((".partial", ".tmp", ".old")))


@pytest.fixture(scope="module")
def settings(corpus_dir, tokenizer_path):  # noqa: F811 (fixtures)
    return cli_flags(corpus_dir, tokenizer_path, eval_interval=2, log_interval=1)


@pytest.fixture(scope="module")
def straight_run(settings, tmp_path_factory) -> Path:
    """6 steps, checkpoints at 2, 4 and 6: the run every faulty one must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train_cli.main([*settings, "--out", str(out), "--max-steps", "6"]) == 0
    return out


@pytest.mark.slow
def test_a_checkpoint_refused_by_the_file_system_is_one_line_and_the_run_resumes_exactly(
    settings, straight_run, tmp_path, capsys
):
    """(Slow: three runs, one in a child process.) The run reaches step 4 (checkpoints 2 and 4), then goes
    on under a file-size limit smaller than a checkpoint's files: the first write of step 6's checkpoint
    (torch.distributed.checkpoint's optimizer state) fails. One line names the cause and the last
    complete checkpoint, exit code 2, no `.partial-` folder stays; resumed without the limit, the run
    ends as the straight one."""
    out = tmp_path / "run"
    train([*settings, "--out", out, "--max-steps", "4"], capsys)
    weights = (out / "step-0000004" / "model.safetensors").stat().st_size
    # the straight run had max-steps 6 from the start: its schedule differs from 4 then 6, so compare
    # with a straight run of the same history
    reference = tmp_path / "reference"
    train([*settings, "--out", reference, "--max-steps", "4"], capsys)
    train(["--out", reference, "--resume", "--max-steps", "6"], capsys)

    failed = faulty_train("limit", weights // 2, "--out", out, "--resume", "--max-steps", "6")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    line = error_line(failed.stderr)
    assert line.startswith(f"error: cannot write checkpoint step-0000006 in {out}: the file would exceed")
    assert line.endswith(f"the last complete checkpoint, {out / 'step-0000004'}, is untouched: free some "
                         "space, then --resume")  # fmt: skip
    assert leftovers(out) == [] and not (out / "step-0000006").exists()

    train(["--out", out, "--resume"], capsys)
    assert losses(out) == losses(reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, count, left",
    [
        # step 4's weights written into .partial-step-0000004, its training state not yet
        ("trainer:save_pretrained", 2, [".partial-step-0000004"]),
        # step 4's optimizer state written (torch.distributed.checkpoint), nothing else yet
        ("trainer:save_sharded_state", 2, [".partial-step-0000004"]),
        # step 4 complete under its name; best/ not yet linked to it, older ones not yet rotated
        ("run_folder:_rename_into_place", 2, []),
        # best/ half made: its files linked into the temporary .tmp-best, not yet renamed
        ("run_folder:_link_files", 2, [".tmp-best"]),
    ],
)
def test_a_run_killed_while_saving_a_checkpoint_resumes_exactly(
    settings, straight_run, tmp_path, capsys, point, count, left
):
    """(Slow: a child process per point.) kill -9 at a point of step 4's save. The folder holds what the
    kill left (and a metrics line cut short, as a kill while logging leaves); --resume removes it, says
    so, goes on from the last complete checkpoint and ends as the straight run."""
    out = tmp_path / "run"
    killed = faulty_train("kill", point, count, *settings, "--out", out, "--max-steps", "6")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert leftovers(out) == left
    with (out / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"type": "train", "step": 5, "lo')

    err = train(["--out", out, "--resume"], capsys)
    if left:
        assert f"removed what a stopped run left half-written in {out}: {', '.join(left)}" in err
    assert leftovers(out) == []
    assert losses(out) == losses(straight_run)
    assert (out / "best" / "model.safetensors").exists()


@pytest.mark.slow
def test_preparation_refused_by_the_file_system_is_one_line_and_goes_on_to_the_same_bytes(
    corpus_dir,  # noqa: F811 (fixture)
    tokenizer_path,  # noqa: F811 (fixture)
    tmp_path,
    capsys,
):
    """(Slow: a child process.) Preparing the data under a file-size limit smaller than the training
    shard: one line naming the file, exit 2. Without the limit, the same command prepares data
    byte-identical to a preparation that met no fault, and trains."""
    flags = cli_flags(corpus_dir, tokenizer_path, max_steps=1, eval_interval=1)
    reference = tmp_path / "reference"
    train([*flags, "--out", reference], capsys)
    shard = max((reference / "data").glob("train-*.bin"), key=lambda path: path.stat().st_size)

    out = tmp_path / "run"
    failed = faulty_train("limit", shard.stat().st_size // 2, *flags, "--out", out)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    line = error_line(failed.stderr)
    assert line.startswith("error: cannot write: the file would exceed the size this process may write: ")
    assert str(out / "data") in line and line.endswith("; raise `ulimit -f`")

    train([*flags, "--out", out], capsys)

    def prepared(folder: Path) -> dict[str, bytes]:
        files = {path.name: path.read_bytes() for path in folder.glob("*.bin")}
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["provenance"]["prepared"] = None  # the time of preparation
        return {**files, MANIFEST: json.dumps(manifest).encode()}

    assert prepared(out / "data") == prepared(reference / "data")
    assert not list((out / "data").glob(".*.tmp"))


@pytest.mark.slow
def test_an_export_refused_by_the_file_system_is_one_line_and_leaves_no_file(straight_run, tmp_path):
    """`convert` to GGUF under a file-size limit smaller than the model: one line, exit 2, and neither the
    file nor its temporary stays."""
    pytest.importorskip("gguf")
    weights = (straight_run / "best" / "model.safetensors").stat().st_size
    script = (
        "import resource, sys\n"
        "from llama_mini.convert import main\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({weights // 2}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    target = tmp_path / "model.gguf"
    result = subprocess.run(
        [sys.executable, "-c", script, str(straight_run), str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: cannot write: the file would exceed the size this process may write: {target}; raise "
        "`ulimit -f`"
    )
    assert list(tmp_path.iterdir()) == []
