"""Training across processes on CPUs (gloo): FSDP and DDP under torchrun, activation checkpointing, and the
sharded checkpoints that resume with any number of processes (llama_mini/train/parallel.py,
sharded_state.py, run_folder.py).

Tolerances. Two processes and one compute the same steps on the same rows, but not in the same order: each
process sums the gradient over its half of the rows and the reduction (FSDP's reduce-scatter, DDP's
all-reduce) adds the two halves, where one process sums all the rows in one matmul. In float32 that is a
difference of a few ulps (1.2e-7 relative each) per gradient element; AdamW divides by the gradient's own
scale, so the weights, and the losses after them, stay within about 1e-7 relative over these 12 steps
(measured: at most 1.1e-7, FSDP, DDP, LoRA and resumed runs alike). `rel=1e-5` leaves a 90x margin and
still fails any real fault: a piece loaded into the wrong process, a lost micro-batch or a missing average
moves these losses by 1e-3 or more. Where
the same processes run the same kernels on the same shapes in the same order (a run and its resumption
with as many processes) the results are compared bit for bit.
"""

import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llama_mini.checkpoint import load_model
from llama_mini.errors import CheckpointError
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer, TransformerBlock
from llama_mini.ops.loss import NextTokenLoss
from llama_mini.tokenizer import train_tokenizer
from llama_mini.train import METRICS, TrainConfig, Trainer, list_step_checkpoints
from llama_mini.train.parallel import (
    CheckpointedBlock,
    checkpoint_activations,
    mixed_precision_policy,
    parallel_mode,
)
from llama_mini.train.run_folder import SHARDED_STATE, TRAINER_STATE, TRAINING_STATE
from llama_mini.train.sharded_state import (
    METADATA_FILE,
    load_sharded_state,
    read_metadata,
    save_sharded_state,
)

REPO = Path(__file__).resolve().parents[1]
RELATIVE = 1e-5  # one process against two: see the module docstring

# One run's settings, shared by the command line and by Trainer objects built here.
TRAIN = dict(
    device="cpu", batch_size=4, grad_accum=2, max_steps=12, eval_interval=3, eval_steps=2, log_interval=1,
    warmup_steps=2, keep_last=5, sample_tokens=0, lr=3e-3, min_lr=3e-4,
    dtype="fp32",  # auto is bf16 on a CPU with AMX: processes and one process compare in float32 everywhere
)  # fmt: skip
MODEL = dict(dim=32, n_layers=2, n_heads=2, max_seq_len=32, multiple_of=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder of text documents from a small grammar, a tokenizer trained on them)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = (["the king", "a fool", "my lord", "the queen"], ["speaks of", "fights for", "waits for"],
             ["the crown", "a rose", "the storm", "sweet music"])  # fmt: skip
    texts = []
    for index in range(24):
        text = "\n".join(" ".join(rng.choice(choices) for choices in words) + "." for _ in range(40))
        (folder / f"doc{index:02d}.txt").write_text(text)
        texts.append(text)
    tokenizer = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_tokenizer(texts, tokenizer, vocab_size=300)
    return folder, tokenizer


def flags(corpus, out: Path, model: dict | None = None, **settings) -> list[str]:
    """train.py flags for TRAIN and `model` (default MODEL) on the corpus, with `settings` (underscores for
    dashes) on top; True gives a bare flag (--activation-checkpointing)."""
    data, tokenizer = corpus
    model = MODEL if model is None else model
    values = {"data": data, "tokenizer": tokenizer, "out": out, **TRAIN, **model, **settings}
    result = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        result += [flag] if value is True else [flag, str(value)]
    return result


def train(arguments: list[str], processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """train.py in a subprocess: alone, or under torchrun with `processes` processes (gloo on CPUs)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--standalone"]
    return subprocess.run(
        [*launcher, "train.py", *arguments],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # two processes share the machine's cores
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trained(arguments: list[str], processes: int = 1) -> None:
    result = train(arguments, processes)
    assert result.returncode == 0, result.stderr[-4000:]


def read_metrics(out: Path, kind: str = "train", key: str = "loss") -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [(line["step"], line[key]) for line in lines if line["type"] == kind]


def assert_same_run(got: Path, expected: Path, relative: float | None = RELATIVE) -> None:
    """Train and validation losses of two run folders, step for step: equal within `relative`, or bit
    for bit when `relative` is None."""
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        ours, theirs = read_metrics(got, kind, key), read_metrics(expected, kind, key)
        assert [step for step, _ in ours] == [step for step, _ in theirs] and ours, kind
        if relative is None:
            assert ours == theirs, kind
        else:
            for (step, a), (_, b) in zip(ours, theirs, strict=True):
                assert a == pytest.approx(b, rel=relative), (kind, step)


@pytest.fixture(scope="module")
def one_process_run(corpus, tmp_path_factory) -> Path:
    """The run of TRAIN and MODEL (12 steps), trained alone, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "one"
    trained(flags(corpus, out))
    return out


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory) -> Path:
    """The same run trained by two FSDP processes, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "fsdp"
    trained(flags(corpus, out, parallel="fsdp"), processes=2)
    return out


# ------------------------------------------------------------------------------------------ in one process


def test_one_process_trains_the_plain_model_whatever_parallel_says(corpus, tmp_path):
    """Alone there is nothing to replicate or shard, so a run saved by FSDP resumes in one process."""
    assert parallel_mode("fsdp", 1) == parallel_mode("ddp", 1) == "single"
    assert parallel_mode("fsdp", 2) == "fsdp"
    data, tokenizer = corpus
    config = TrainConfig(
        data=str(data), tokenizer=str(tokenizer), out=str(tmp_path), parallel="fsdp", **TRAIN
    )
    trainer = Trainer(config, MODEL, show_progress=False)
    assert type(trainer.loss_module) is NextTokenLoss


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(vocab_size=64, **{**MODEL, "n_layers": 3, **overrides}))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Bit for bit: the recomputation runs the same kernels on the same inputs in the same order, and
    non-reentrant checkpointing restores the random state, so dropout draws the same masks again."""
    plain, checkpointed = tiny_model(dropout=0.1), tiny_model(dropout=0.1)
    assert checkpoint_activations(checkpointed) == 3
    tokens = torch.randint(0, 64, (4, 17))
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        loss = NextTokenLoss(model)(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)


def test_checkpointed_blocks_keep_their_names_and_weights():
    model = tiny_model()
    before = {name: param for name, param in model.named_parameters()}
    checkpoint_activations(model)
    assert all(type(block) is CheckpointedBlock for block in model.layers)
    assert isinstance(model.layers[0], TransformerBlock)
    assert {name: param for name, param in model.named_parameters()} == before  # the same Parameters
    with torch.no_grad():  # evaluation and sampling do not checkpoint
        model(torch.zeros(1, 4, dtype=torch.long))


def test_fsdp_computes_in_bf16_and_reduces_and_keeps_weights_in_float32():
    policy = mixed_precision_policy(torch.bfloat16)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision_policy(torch.float32).param_dtype is None  # nothing cast


def adamw_after_a_step(model: Transformer) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 64, (2, 9))
    NextTokenLoss(model)(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizer.step()
    return optimizer


def test_sharded_state_round_trip_is_exact(tmp_path):
    """Saved and loaded alone: every weight and every AdamW tensor comes back bit for bit."""
    model = tiny_model()
    optimizer = adamw_after_a_step(model)
    save_sharded_state(tmp_path / "state", model, optimizer)
    fresh = tiny_model(dropout=0.0)
    torch.nn.init.zeros_(fresh.output.weight)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    load_sharded_state(tmp_path / "state", fresh, fresh_optimizer)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
        for key, value in optimizer.state[a].items():
            torch.testing.assert_close(fresh_optimizer.state[b][key], value, rtol=0, atol=0, msg=name + key)


def test_sharded_state_of_another_model_is_a_one_line_error(tmp_path):
    model = tiny_model()
    save_sharded_state(tmp_path / "state", model, adamw_after_a_step(model))
    other = tiny_model(dim=64, n_heads=4)
    with pytest.raises(
        CheckpointError, match="tok_embeddings.weight has shape \\[64, 32\\], the model \\[64, 64\\]"
    ):
        load_sharded_state(tmp_path / "state", other, torch.optim.AdamW(other.parameters()))


class RunsCode:
    """A pickle that would call os.system when unpickled: what a crafted checkpoint could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_metadata_cannot_run_code(tmp_path):
    """DCP's own reader would unpickle `.metadata` with pickle.load; ours builds DCP's records only."""
    model = tiny_model()
    folder = tmp_path / "state"
    save_sharded_state(folder, model, adamw_after_a_step(model))
    marker = tmp_path / "code-ran"
    (folder / METADATA_FILE).write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match="not a tensor checkpoint's metadata"):
        load_sharded_state(folder, model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


def test_non_tensor_entries_are_refused_before_loading(tmp_path):
    """DCP would load a non-tensor entry with torch.load(weights_only=False); such a checkpoint is refused."""
    import torch.distributed.checkpoint as dcp

    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"weights": torch.ones(2), "note": {"anything": object}}, checkpoint_id=tmp_path / "state")
    with pytest.raises(CheckpointError, match="BytesStorageMetadata is not part of a tensor checkpoint"):
        read_metadata(tmp_path / "state")


def interrupted_run(corpus, out: Path, stop_after: int) -> Trainer:
    """A one-process Trainer for TRAIN and MODEL, stopped (as by Ctrl-C) after `stop_after` steps."""
    data, tokenizer = corpus
    config = TrainConfig(data=str(data), tokenizer=str(tokenizer), out=str(out), **TRAIN)
    trainer = Trainer(config, MODEL, show_progress=False)
    original = trainer.train_step

    def stop(step):
        loss = original(step)
        trainer.stop_requested = step == stop_after - 1
        return loss

    trainer.train_step = stop
    summary = trainer.run()
    assert summary.interrupted and summary.step == stop_after
    return trainer


def resume_in_process(out: Path) -> None:
    config = TrainConfig(out=str(out))
    Trainer(config, {}, resume=True, show_progress=False).run()


def test_a_checkpoint_from_before_sharded_states_resumes_exactly(corpus, tmp_path, one_process_run):
    """Format 1 (earlier versions): the optimizer's state dict in training_state.pt, the weights in the
    Hugging Face folder, no checkpoint_format. Made here from a run stopped at step 5, as the old code
    wrote it; resumed, it continues bit for bit like the uninterrupted one-process run."""
    out = tmp_path / "old"
    trainer = interrupted_run(corpus, out, stop_after=5)
    folder = out / "step-0000005"
    state = torch.load(folder / TRAINING_STATE, weights_only=True)
    torch.save({**state, "optimizer": trainer.optimizer.state_dict()}, folder / TRAINING_STATE)
    shutil.rmtree(folder / SHARDED_STATE)
    saved = json.loads((folder / TRAINER_STATE).read_text())
    del saved["checkpoint_format"]
    (folder / TRAINER_STATE).write_text(json.dumps(saved))
    resume_in_process(out)
    assert_same_run(out, one_process_run, relative=None)


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(corpus, tmp_path):
    out = tmp_path / "new"
    interrupted_run(corpus, out, stop_after=2)
    state_file = out / "step-0000002" / TRAINER_STATE
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "checkpoint_format": 3}))
    result = train(["--out", str(out), "--resume"])
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "format 3, written by a newer llama_mini" in result.stderr


def test_a_save_that_fails_leaves_no_checkpoint_and_resume_takes_the_previous_one(
    corpus, tmp_path, one_process_run
):
    """A checkpoint folder is complete or absent: a save that dies half way (here, writing the weights)
    leaves only a `.partial-` folder, which resume ignores."""
    out = tmp_path / "crash"
    data, tokenizer = corpus
    config = TrainConfig(data=str(data), tokenizer=str(tokenizer), out=str(out), **TRAIN)
    trainer = Trainer(config, MODEL, show_progress=False)
    original = trainer._write_model

    def dies_at_step_6(folder, model):
        if trainer.step == 6:
            raise OSError("disk full")
        original(folder, model)

    trainer._write_model = dies_at_step_6
    with pytest.raises(OSError, match="disk full"):
        trainer.run()
    assert [p.name for p in list_step_checkpoints(out)] == ["step-0000003"]
    assert (out / ".partial-step-0000006" / SHARDED_STATE).is_dir()  # the half-written one, ignored
    resume_in_process(out)
    assert_same_run(out, one_process_run, relative=None)


# ------------------------------------------------------------------------------------------ torchrun, gloo


def test_fsdp_matches_one_process_and_saves_what_transformers_loads(fsdp_run, one_process_run):
    """Two FSDP processes (the same rows, each holding half of every weight, gradient and moment) against
    one process; then the Hugging Face folder gathered onto the main process: the same weights as one
    process's within the same tolerance, and transformers computes its logits."""
    assert_same_run(fsdp_run, one_process_run)
    sharded = load_model(fsdp_run / "step-0000012")
    alone = load_model(one_process_run / "step-0000012")
    for (name, a), b in zip(alone.named_parameters(), sharded.parameters(), strict=True):
        # the weights drift apart as the losses do: measured at most 2.8e-7 absolute, for weights up to 1.02
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(fsdp_run / "step-0000012").eval()
    tokens = torch.randint(0, sharded.args.vocab_size, (2, 16))
    with torch.no_grad():
        # float32, the same weights; transformers' RoPE (rotate_half) and attention order the sums otherwise
        # (measured 3e-7 on logits of magnitude ~5, as in test_training's one-process check)
        torch.testing.assert_close(hf_model(tokens).logits, sharded(tokens), rtol=1e-5, atol=1e-5)
    assert (fsdp_run / "step-0000012" / SHARDED_STATE / "__1_0.distcp").exists()  # one per process


def test_fsdp_with_activation_checkpointing_tied_embeddings_and_the_chunked_loss_matches_one_process(
    corpus, tmp_path
):
    """Activation checkpointing under FSDP; the tied matrix is both the root unit's embedding and the output
    weight that the chunked loss reads directly from the gathered root."""
    settings = dict(tie_embeddings=True, loss_chunk_size=16, max_steps=6)
    trained(flags(corpus, tmp_path / "one", **settings))
    trained(flags(corpus, tmp_path / "fsdp", parallel="fsdp", activation_checkpointing=True, **settings), 2)
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")


def test_ddp_with_activation_checkpointing_matches_one_process(corpus, tmp_path, one_process_run):
    trained(flags(corpus, tmp_path / "ddp", parallel="ddp", activation_checkpointing=True), processes=2)
    assert_same_run(tmp_path / "ddp", one_process_run)


@pytest.mark.slow
def test_muon_under_ddp_and_fsdp_matches_one_process(corpus, tmp_path):
    """--optimizer muon with two processes. DDP: each process orthogonalizes the whole all-reduced
    gradient. FSDP: each holds half of every matrix (a DTensor), and torch's Muon runs its Newton-Schulz
    matmuls on the DTensors, which gather what each product needs. Muon's iteration runs in bfloat16, which
    turns the few-ulp differences of the reduction into bf16 roundings of some entries: the losses then
    differ by up to 1.9e-4 relative over these 12 steps (measured at --muon-lr 0.02: DDP 1.9e-4, FSDP
    1.2e-4; at the default 0.01: 1.3e-4, 1.4e-4), so they are compared within 1e-3. Orthogonalizing each process's half alone would move them by far more (it is another
    update altogether)."""
    trained(flags(corpus, tmp_path / "one", optimizer="muon"))
    for parallel in ("ddp", "fsdp"):
        trained(flags(corpus, tmp_path / parallel, optimizer="muon", parallel=parallel), processes=2)
        assert_same_run(tmp_path / parallel, tmp_path / "one", relative=1e-3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_killed_fsdp_run_resumes_exactly_and_continues_with_one_process(
    corpus, tmp_path, fsdp_run, one_process_run
):
    """Both processes are killed (SIGKILL: no chance to save) once a checkpoint exists. Resumed by two
    processes, the run is bit for bit the uninterrupted one; its copy resumed by one process continues the
    same run (within the tolerance of one process against two)."""
    out = tmp_path / "killed"
    port, workers = free_port(), []
    for rank in range(2):  # the processes torchrun would start, started here so they can be killed
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
        command = [sys.executable, "train.py", *flags(corpus, out, parallel="fsdp")]
        workers.append(subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 300
    while not list_step_checkpoints(out):
        assert all(worker.poll() is None for worker in workers), workers[0].communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
        worker.communicate()
    saved = list_step_checkpoints(out)
    assert saved[-1].name != "step-0000012", "the run ended before it could be killed"
    shutil.copytree(out, tmp_path / "alone")

    trained(["--out", str(out), "--resume"], processes=2)
    assert_same_run(out, fsdp_run, relative=None)
    trained(["--out", str(tmp_path / "alone"), "--resume"], processes=1)
    assert_same_run(tmp_path / "alone", one_process_run)


def test_a_one_process_checkpoint_resumes_under_fsdp_with_two(corpus, tmp_path, one_process_run):
    out = tmp_path / "grows"
    interrupted_run(corpus, out, stop_after=5)
    trained(["--out", str(out), "--resume", "--parallel", "fsdp"], processes=2)
    assert_same_run(out, one_process_run)


def test_fsdp_fine_tunes_with_lora_from_an_init_checkpoint_like_one_process(
    corpus, tmp_path, one_process_run
):
    """--init-from under FSDP: the main process reads the checkpoint and broadcasts it, each process
    keeping its pieces; LoRA's frozen base and trainable adapters share the FSDP units."""
    # the model's shape comes from --init-from; its tokenizer too
    settings = dict(init_from=one_process_run, lora_rank=4, max_steps=6, sample_tokens=4, model={})
    trained(flags(corpus, tmp_path / "one", **settings))
    trained(flags(corpus, tmp_path / "fsdp", parallel="fsdp", **settings), processes=2)
    assert_same_run(tmp_path / "fsdp", tmp_path / "one")
    assert (tmp_path / "fsdp" / "step-0000006" / "adapter" / "adapter_model.safetensors").exists()


def test_fsdp_refuses_fp16_in_one_line(corpus, tmp_path):
    result = train(flags(corpus, tmp_path / "fp16", parallel="fsdp", dtype="fp16"), processes=2)
    assert result.returncode != 0
    assert "error: --parallel fsdp trains in bf16 or fp32" in result.stderr
    assert "Traceback" not in result.stderr.split("error: --parallel")[0][-200:]


@pytest.mark.slow
def test_fsdp_compiles_each_block(corpus, tmp_path, one_process_run):
    """(Slow: 40 s with a cold compiler cache on 2 cores.) --compile under FSDP: each block compiled before it is sharded (a C++ compiler is needed on a CPU).
    Inductor generates its own float32 kernels for this CPU's vector width, fusing and ordering reductions
    otherwise than ATen: measured 9e-8 relative here; rel 1e-4 allows for other CPUs' code."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile needs a C++ compiler on a CPU")
    out = tmp_path / "compiled"
    trained(flags(corpus, out, parallel="fsdp", compile=True, activation_checkpointing=True, max_steps=3), 2)
    ours = read_metrics(out)
    theirs = dict(read_metrics(one_process_run))  # the first 3 steps of a 12-step run: the same lr
    for step, loss in ours:
        assert loss == pytest.approx(theirs[step], rel=1e-4), step


# ------------------------------------------------------------------------- llama-mini torchrun's exits


def test_ctrl_c_under_llama_mini_torchrun_saves_and_exits_130_in_one_line(corpus, tmp_path):
    """Ctrl-C at a terminal signals the whole foreground group: the launcher and both processes; torchrun
    then passes the signal on again (the processes take that echo for the same Ctrl-C). The processes
    save, the first says where in one line, and the launcher exits 130 without torchrun's traceback."""
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "llama_mini.launch", "--nproc_per_node=2", "--standalone",
               "train.py", *flags(corpus, out, max_steps=400, eval_interval=3)]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while not list_step_checkpoints(out):
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)  # as the terminal does
    err = launcher.communicate(timeout=120)[1]
    assert launcher.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err and "closing signal" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted at step")]
    assert len(lines) == 1, err[-3000:]
    step = int(lines[0].split()[3].rstrip(":"))
    assert list_step_checkpoints(out)[-1].name == f"step-{step:07d}"


def test_a_mistake_under_llama_mini_torchrun_is_one_line_and_exit_2(corpus, tmp_path):
    """Both processes meet the mistake; only the first says it, and the launcher adds nothing."""
    command = [sys.executable, "-m", "llama_mini.launch", "--nproc_per_node=2", "--standalone",
               "train.py", *flags(corpus, tmp_path / "fp16", parallel="fsdp", dtype="fp16")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "error: --parallel fsdp trains in bf16 or fp32: fp16's loss scaling is not supported on sharded "
        "gradients here; pass --dtype bf16 (or fp32), or --parallel ddp"
    ], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_weighted_mixture_under_ddp_matches_one_process(corpus, tmp_path):
    """`--data A:W --data B:W` with two processes: the mixture's batch is a function of (seed, step) that
    the processes split between them, so DDP sees the one process's batches and losses, and each source's
    validation bits per byte is reported beside the total."""
    folder, tokenizer = corpus
    second = tmp_path / "second"
    second.mkdir()
    for path in sorted(folder.glob("doc*.txt"))[:12]:  # another source: half the documents, reversed lines
        (second / path.name).write_text("\n".join(reversed(path.read_text().splitlines())))
    arguments = [a for a in flags(corpus, tmp_path / "unused") if a not in (str(folder),)]
    data = arguments.index("--data")
    arguments[data : data + 1] = ["--data", f"{folder}:0.75", "--data", f"{second}:0.25"]
    out_flag = arguments.index("--out") + 1
    for name, processes, parallel in (("one", 1, []), ("ddp", 2, ["--parallel", "ddp"])):
        arguments[out_flag] = str(tmp_path / name)
        trained([*arguments, *parallel], processes=processes)
    assert_same_run(tmp_path / "ddp", tmp_path / "one")
    evaluations = read_metrics(tmp_path / "ddp", "eval", "val_bpb/second")
    assert evaluations and all(math.isfinite(value) and value > 0 for _, value in evaluations)
