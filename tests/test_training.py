"""Training: schedule, gradient accumulation, checkpoints, exact resume, signals, DDP, guards, the CLI."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import train as train_cli
from llama_mini.checkpoint import load_model
from llama_mini.data import MANIFEST, TokenSplit
from llama_mini.errors import ConfigError, DataError
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.ops.loss import NextTokenLoss, cross_entropy
from llama_mini.tokenizer import train_tokenizer
from llama_mini.train import (
    METRICS,
    TrainConfig,
    Trainer,
    TrainingError,
    accumulate_gradients,
    learning_rate,
    list_step_checkpoints,
)

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(dim=32, n_layers=2, n_heads=2, multiple_of=16, max_seq_len=32)


def synthetic_corpus(documents: int = 24, sentences: int = 40, seed: int = 0) -> list[str]:
    """Sentences from a small grammar: real structure for a model to learn, no downloads."""
    rng = random.Random(seed)
    subjects = ["the king", "a fool", "my lord", "the queen", "this knight", "her maid"]
    verbs = ["speaks of", "dreams of", "fights for", "weeps for", "laughs at", "waits for"]
    objects = ["the crown", "a rose", "the storm", "his honour", "the night", "sweet music"]
    texts = []
    for _ in range(documents):
        lines = [
            f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
            for _ in range(sentences)
        ]
        texts.append("\n".join(lines))
    return texts


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for index, text in enumerate(synthetic_corpus()):
        (folder / f"doc{index:02d}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory, corpus_dir) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    train_tokenizer(texts, path, vocab_size=300)
    return path


def make_config(corpus_dir, tokenizer_path, out, **overrides) -> TrainConfig:
    settings = dict(
        data=str(corpus_dir),
        out=str(out),
        tokenizer=str(tokenizer_path),
        max_steps=8,
        batch_size=4,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        eval_interval=4,
        eval_steps=2,
        log_interval=1,
        sample_tokens=0,
        device="cpu",
        dtype="fp32",  # auto is bf16 on a CPU with AMX: the tests' numbers are float32's on every CPU
    )
    return TrainConfig(**{**settings, **overrides})


def stop_after(trainer: Trainer, steps: int) -> None:
    """Make `trainer` stop, as on Ctrl-C, once it has taken `steps` steps (it then saves a checkpoint)."""
    step = trainer.train_step

    def stopping(index: int) -> float:
        trainer.stop_requested = index == steps - 1
        return step(index)

    trainer.train_step = stopping


def read_metrics(out: Path, kind: str = "train") -> list[dict]:
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [line for line in lines if line["type"] == kind]


# ------------------------------------------------------------------------------------------ schedule


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    config = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4, eval_interval=10)
    assert learning_rate(0, config) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert learning_rate(4, config) == pytest.approx(5e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)  # warmup ends at the peak
    assert learning_rate(10, config) == pytest.approx(1e-3)  # cosine starts at the peak
    assert learning_rate(60, config) == pytest.approx(5.5e-4)  # halfway: the mean of lr and min_lr
    assert learning_rate(110, config) == pytest.approx(1e-4)  # the floor at max_steps
    assert learning_rate(500, config) == pytest.approx(1e-4)  # and after


# ------------------------------------------------------------------------------------------ gradients


def test_micro_batches_give_the_gradients_of_one_big_batch():
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, **TINY_MODEL)
    model = Transformer(args).double()
    tokens = torch.randint(0, 64, (8, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]

    cross_entropy(model(x), y).backward()
    big_batch = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    micro_batches = ((x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2))
    loss = accumulate_gradients(NextTokenLoss(model), micro_batches, 4, torch.device("cpu"), torch.float32)
    assert loss == pytest.approx(cross_entropy(model(x), y).item(), rel=1e-9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big_batch[name], rtol=1e-6, atol=1e-9, msg=name)


# ------------------------------------------------------------------------------------------ runs


def test_run_writes_metrics_checkpoints_and_a_loadable_model(corpus_dir, tokenizer_path, tmp_path):
    config = make_config(corpus_dir, tokenizer_path, tmp_path / "run", keep_last=1)
    trainer = Trainer(config, TINY_MODEL, show_progress=False)
    summary = trainer.run()
    out = tmp_path / "run"
    assert summary.step == 8 and not summary.interrupted
    assert [m["step"] for m in read_metrics(out)] == list(range(1, 9))
    evals = read_metrics(out, "eval")
    assert [e["step"] for e in evals] == [4, 8]
    assert all(e["val_bpb"] > 0 for e in evals)
    assert [p.name for p in list_step_checkpoints(out)] == ["step-0000008"]  # keep_last=1
    assert (out / "best" / "model.safetensors").exists()
    assert (out / "best" / "tokenizer.model").exists()
    reloaded = load_model(out / "step-0000008").eval()
    tokens = torch.randint(0, reloaded.args.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), trainer.raw_model.eval()(tokens), rtol=0, atol=0)
    # What train.py writes, transformers loads as it is, with the same logits.
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM.from_pretrained(out / "step-0000008").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, reloaded(tokens), rtol=1e-5, atol=1e-5)
    best_step = min(evals, key=lambda e: e["val_loss"])["step"]
    best_state = json.loads((out / "best" / "trainer_state.json").read_text())
    assert best_state["step"] == best_step


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(
    corpus_dir, tokenizer_path, tmp_path, optimizer
):
    settings = dict(max_steps=10, eval_interval=5, optimizer=optimizer)
    model = {**TINY_MODEL, "dropout": 0.1}  # dropout too: its random state must resume exactly
    whole = make_config(corpus_dir, tokenizer_path, tmp_path / "whole", **settings)
    Trainer(whole, model, show_progress=False).run()

    broken = make_config(corpus_dir, tokenizer_path, tmp_path / "broken", **settings)
    trainer = Trainer(broken, model, show_progress=False)
    original_step = trainer.train_step

    def interrupt_after_step_3(step):
        loss = original_step(step)
        if step == 2:  # the signal arrives during the third step
            trainer.stop_requested = True
        return loss

    trainer.train_step = interrupt_after_step_3
    summary = trainer.run()
    assert summary.interrupted and summary.step == 3
    assert (tmp_path / "broken" / "step-0000003").exists()

    resumed = Trainer(
        make_config(corpus_dir, tokenizer_path, tmp_path / "broken", **settings),
        {},
        resume=True,
        show_progress=False,
    )
    assert resumed.step == 3
    resumed.run()
    expected = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "whole")]
    got = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "broken")]
    assert got == expected  # bit for bit, step for step
    evals = [(e["step"], e["val_loss"]) for e in read_metrics(tmp_path / "whole", "eval")]
    assert [(e["step"], e["val_loss"]) for e in read_metrics(tmp_path / "broken", "eval")] == evals


def test_short_run_learns_well_below_the_unigram_entropy(corpus_dir, tokenizer_path, tmp_path):
    config = make_config(
        corpus_dir,
        tokenizer_path,
        tmp_path / "learn",
        max_steps=60,
        eval_interval=60,
        eval_steps=8,
        batch_size=8,
    )
    summary = Trainer(config, {**TINY_MODEL, "dim": 64, "n_heads": 4}, show_progress=False).run()
    # The unigram entropy: the loss of the best model that ignores context entirely.
    val = TokenSplit(tmp_path / "learn" / "data", "val")
    tokens = val.read(0, len(val))
    counts = Counter(tokens.tolist())
    total = sum(counts.values())
    unigram_entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert summary.val_loss < 0.6 * unigram_entropy, (summary.val_loss, unigram_entropy)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(
    corpus_dir, tokenizer_path, tmp_path, monkeypatch
):
    config = make_config(corpus_dir, tokenizer_path, tmp_path / "nan", max_steps=8, eval_interval=2)
    trainer = Trainer(config, TINY_MODEL, show_progress=False)
    original = trainer.train_step

    def poisoned(step):
        return float("nan") if step == 5 else original(step)

    trainer.train_step = poisoned
    with pytest.raises(
        TrainingError, match="loss became nan at step 6; the last good checkpoint is .*step-0000004"
    ):
        trainer.run()
    assert [p.name for p in list_step_checkpoints(tmp_path / "nan")] == ["step-0000002", "step-0000004"]


# ------------------------------------------------------------------------------------------ guards


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(lr=-1.0), ConfigError, "need 0 < --lr"),
        (dict(val_fraction=1.5), ConfigError, "--val-fraction must be between 0 and 1"),
        (dict(preset="llama9"), ConfigError, "--preset must be one of tiny, .*, got 'llama9'"),
        (dict(keep_last=0), ConfigError, "--keep-last must be positive"),
    ],
)
def test_invalid_training_settings_are_refused_before_any_work(
    corpus_dir, tokenizer_path, tmp_path, overrides, error, message
):
    with pytest.raises(error, match=message):
        make_config(corpus_dir, tokenizer_path, tmp_path / "x", **overrides)


def test_invalid_model_shape_is_refused_before_the_data_is_prepared(corpus_dir, tokenizer_path, tmp_path):
    config = make_config(corpus_dir, tokenizer_path, tmp_path / "bad")
    with pytest.raises(ConfigError, match="dim \\(30\\) must be divisible by n_heads \\(4\\)"):
        Trainer(config, {**TINY_MODEL, "dim": 30, "n_heads": 4}, show_progress=False)
    assert not (tmp_path / "bad" / "data").exists()


def test_missing_and_empty_corpus_are_clear_errors(tokenizer_path, tmp_path):
    with pytest.raises(DataError, match="not found"):
        Trainer(make_config(tmp_path / "nowhere.txt", tokenizer_path, tmp_path / "a"), TINY_MODEL)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="empty"):
        Trainer(make_config(tmp_path / "empty.txt", tokenizer_path, tmp_path / "b"), TINY_MODEL)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_folder_is_a_clear_error(corpus_dir, tokenizer_path, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(ConfigError, match="cannot write to --out"):
        Trainer(make_config(corpus_dir, tokenizer_path, locked / "run"), TINY_MODEL)


def test_out_folder_that_is_a_file_is_a_clear_error(corpus_dir, tokenizer_path, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="--out .*file is a file, not a folder: choose"):
        Trainer(make_config(corpus_dir, tokenizer_path, tmp_path / "file"), TINY_MODEL)


def test_resume_without_a_checkpoint_and_restart_over_one_are_refused(corpus_dir, tokenizer_path, tmp_path):
    with pytest.raises(ConfigError, match="--resume: no checkpoint in"):
        Trainer(make_config(corpus_dir, tokenizer_path, tmp_path / "new"), TINY_MODEL, resume=True)
    Trainer(
        make_config(corpus_dir, tokenizer_path, tmp_path / "old", max_steps=4),
        TINY_MODEL,
        show_progress=False,
    ).run()
    with pytest.raises(ConfigError, match="already holds checkpoints of a run: pass --resume"):
        Trainer(make_config(corpus_dir, tokenizer_path, tmp_path / "old"), TINY_MODEL)
    with pytest.raises(ConfigError, match="--dim 64 conflicts with the checkpoint's dim 32"):
        Trainer(make_config(corpus_dir, tokenizer_path, tmp_path / "old"), {"dim": 64}, resume=True)


def test_resume_refuses_another_optimizer(corpus_dir, tokenizer_path, tmp_path):
    """The checkpoint holds one optimizer's state (AdamW's moments or Muon's momentum): another cannot
    continue from it."""
    Trainer(
        make_config(corpus_dir, tokenizer_path, tmp_path, max_steps=2), TINY_MODEL, show_progress=False
    ).run()
    with pytest.raises(ConfigError, match="--optimizer muon differs from the resumed run's adamw"):
        Trainer(TrainConfig(out=str(tmp_path)), {}, resume=True, resume_overrides={"optimizer": "muon"})


def test_sequence_longer_than_the_data_is_a_clear_error(tmp_path, tokenizer_path):
    (tmp_path / "short.txt").write_text("The king speaks.\n\nThe queen laughs.")
    with pytest.raises((ConfigError, DataError), match="lower --max-seq-len"):
        Trainer(make_config(tmp_path / "short.txt", tokenizer_path, tmp_path / "s"), TINY_MODEL)


# ------------------------------------------------------------------------------------------ command line


def run_cli(args, capsys):
    code = train_cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_flags(corpus_dir, tokenizer_path, **settings) -> list[str]:
    """train.py flags for a tiny run on the test corpus; `settings` (underscores for dashes) override them."""
    flags = dict(
        data=corpus_dir, tokenizer=tokenizer_path, device="cpu", dtype="fp32", batch_size=2, eval_steps=1,
        sample_tokens=0, dim=32, n_layers=1, n_heads=2, max_seq_len=16, multiple_of=16,
    )  # fmt: skip
    flags.update(settings)
    return [item for name, value in flags.items() for item in ("--" + name.replace("_", "-"), str(value))]


def test_cli_trains_and_prints_a_summary_and_sample(corpus_dir, tokenizer_path, tmp_path, capsys):
    flags = cli_flags(corpus_dir, tokenizer_path, out=tmp_path / "cli", max_steps=4, eval_interval=2)
    code, out, err = run_cli([*flags, "--sample-tokens", "8"], capsys)
    assert code == 0, err
    assert "done: 4 steps" in out and "bits/byte" in out
    assert "--- sample ---" in out
    saved = json.loads((tmp_path / "cli" / "best" / "config.json").read_text())
    assert saved["hidden_size"] == 32 and saved["num_hidden_layers"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-steps", "ten"], "error: argument --max-steps: invalid int value: 'ten' (see --help)"),
        (["--ffn", "swigloo"], "error: argument --ffn: invalid choice: 'swigloo'"),
        (["--data", "/no/such/corpus.txt", "--device", "cpu"], "error: corpus /no/such/corpus.txt not found"),
    ],
)
def test_cli_user_mistakes_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(train_cli.main([*args, "--out", str(tmp_path / "o")]))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.startswith(message), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_a_run_shorter_than_the_eval_interval_evaluates_and_saves_its_last_step(
    corpus_dir, tokenizer_path, tmp_path, capsys
):
    """The first command a newcomer types: a few steps, with the default --eval-interval of 100."""
    out = tmp_path / "short"
    flags = [item for item in cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=3) if item]
    code, stdout, err = run_cli(flags, capsys)
    assert code == 0, err
    assert "done: 3 steps" in stdout and "bits/byte" in stdout
    assert [e["step"] for e in read_metrics(out, "eval")] == [3]
    assert [p.name for p in list_step_checkpoints(out)] == ["step-0000003"]
    assert (out / "best" / "model.safetensors").exists()


def test_a_run_stopped_before_its_first_evaluation_still_leaves_best(corpus_dir, tokenizer_path, tmp_path):
    config = make_config(corpus_dir, tokenizer_path, tmp_path / "stop", max_steps=8, eval_interval=100)
    trainer = Trainer(config, TINY_MODEL, show_progress=False)
    original = trainer.train_step

    def stop_after_two(step):
        loss = original(step)
        trainer.stop_requested = step == 1  # as Ctrl-C during the second step would
        return loss

    trainer.train_step = stop_after_two
    summary = trainer.run()
    assert summary.interrupted and summary.step == 2
    best = load_model(tmp_path / "stop" / "best")
    for name, tensor in best.state_dict().items():
        torch.testing.assert_close(tensor, trainer.raw_model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_cli_help_shows_defaults(capsys):
    assert train_cli.main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # as read, whatever argparse's line breaks
    for expected in ("--data", "(default: shakespeare)", "--n-kv-heads", "--compile, --no-compile", "--ffn"):
        assert expected in help_text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_128_plus_the_signal(
    corpus_dir, tokenizer_path, tmp_path, signum
):
    out = tmp_path / "sig"
    flags = cli_flags(
        corpus_dir, tokenizer_path, out=out, max_steps=100000, eval_interval=100000, log_interval=1
    )
    command = [sys.executable, str(REPO / "train.py"), *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not (out / METRICS).exists() or len(read_metrics(out)) < 3:
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    checkpoints = list_step_checkpoints(out)
    assert len(checkpoints) == 1
    assert "interrupted at step" in err and "--resume" in err
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert step >= 3 and checkpoints[0].name == f"step-{step:07d}"


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process(corpus_dir, tokenizer_path, tmp_path):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed")
    common = cli_flags(
        corpus_dir, tokenizer_path, max_steps=4, eval_interval=2, eval_steps=2, batch_size=4, grad_accum=2,
        n_layers=2, max_seq_len=32, log_interval=1,
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "train.py", *common, "--out", str(tmp_path / "one")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "train.py",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        single = [m[key] for m in read_metrics(tmp_path / "one", kind)]
        double = [m[key] for m in read_metrics(tmp_path / "two", kind)]
        assert len(single) == len(double) > 0
        for a, b in zip(single, double, strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_cli_resume_takes_the_checkpoints_settings_and_explicit_flags(
    corpus_dir, tokenizer_path, tmp_path, capsys
):
    common = ["--out", str(tmp_path / "r"), "--device", "cpu", "--sample-tokens", "0"]
    first = cli_flags(corpus_dir, tokenizer_path, max_steps=4, eval_interval=4)
    code, out, err = run_cli([*first, *common], capsys)
    assert code == 0, err
    # Resume with only a longer run asked for: every other setting (model, data, eval) comes from the
    # checkpoint, and --eval-interval 6 is valid against the new --max-steps 12, not the default 500.
    code, out, err = run_cli(["--resume", "--max-steps", "12", "--eval-interval", "6", *common], capsys)
    assert code == 0, err
    assert "done: 12 steps" in out
    assert [e["step"] for e in read_metrics(tmp_path / "r", "eval")] == [4, 6, 12]
    state = json.loads((tmp_path / "r" / "step-0000012" / "trainer_state.json").read_text())
    assert state["model_args"]["dim"] == 32 and state["train_config"]["batch_size"] == 2


def test_runs_with_other_seeds_share_the_split_and_can_share_prepared_data(
    corpus_dir, tokenizer_path, tmp_path
):
    shared = tmp_path / "shared-data"
    first = Trainer(
        make_config(corpus_dir, tokenizer_path, tmp_path / "s1", seed=1, data_dir=str(shared)), TINY_MODEL
    )
    manifest = first.train_data.folder / MANIFEST  # in the tokenizer's folder of the shared one
    assert manifest.parent.parent == shared
    written = manifest.stat().st_mtime_ns
    second = Trainer(
        make_config(corpus_dir, tokenizer_path, tmp_path / "s2", seed=2, data_dir=str(shared)), TINY_MODEL
    )
    assert manifest.stat().st_mtime_ns == written  # reused, not written again
    assert not (tmp_path / "s1" / "data").exists()
    assert first.val_data.meta == second.val_data.meta
    # and without a shared folder, a different --seed still gives the same validation documents
    third = Trainer(make_config(corpus_dir, tokenizer_path, tmp_path / "s3", seed=3), TINY_MODEL)
    assert third.val_data.meta.tokens == first.val_data.meta.tokens
    assert (third.val_data.read(0, len(third.val_data)) == first.val_data.read(0, len(first.val_data))).all()


# ------------------------------------------------------------------------------------------ mixtures


@pytest.fixture(scope="module")
def three_corpora(tmp_path_factory, corpus_dir) -> list[str]:
    """The test corpus and two more folders of the same grammar: a mixture of three sources."""
    folders = [corpus_dir]
    for seed, name in ((1, "plays"), (2, "poems")):
        folder = tmp_path_factory.mktemp(name)
        for index, text in enumerate(synthetic_corpus(documents=12, seed=seed)):
            (folder / f"doc{index:02d}.txt").write_text(text)
        folders.append(folder)
    return [f"{folders[0]}:0.7", f"{folders[1]}:0.2", f"{folders[2]}:0.1"]


@pytest.mark.slow
def test_a_three_source_mixture_trains_reports_each_source_and_resumes_exactly(
    three_corpora, corpus_dir, tokenizer_path, tmp_path, capsys
):
    settings = dict(data=three_corpora, max_steps=6, eval_interval=3)
    whole = make_config(corpus_dir, tokenizer_path, tmp_path / "whole", **settings)
    Trainer(whole, TINY_MODEL, show_progress=False).run()
    names = [Path(spec.rsplit(":", 1)[0]).name for spec in three_corpora]
    for name in names:  # each source prepared on its own, in a folder named for it
        assert (tmp_path / "whole" / "data" / name / MANIFEST).is_file()
    evaluation = read_metrics(tmp_path / "whole", "eval")[-1]
    weighted = sum(w * evaluation[f"val_bpb/{n}"] for w, n in zip((0.7, 0.2, 0.1), names, strict=True))
    assert evaluation["val_bpb"] == pytest.approx(weighted, rel=1e-12)
    assert len({evaluation[f"val_bpb/{n}"] for n in names}) == 3  # three splits, three numbers
    record = (tmp_path / "whole" / "config.toml").read_text()
    assert f"data = {json.dumps(three_corpora)}" in record

    broken = make_config(corpus_dir, tokenizer_path, tmp_path / "broken", **settings)
    trainer = Trainer(broken, TINY_MODEL, show_progress=False)
    original_step = trainer.train_step

    def interrupt_after_step_2(step):
        loss = original_step(step)
        trainer.stop_requested = trainer.stop_requested or step == 1
        return loss

    trainer.train_step = interrupt_after_step_2
    assert trainer.run().step == 2
    resumed = Trainer(
        make_config(corpus_dir, tokenizer_path, tmp_path / "broken", **settings), {}, resume=True,
        show_progress=False,
    )  # fmt: skip
    resumed.run()
    for kind in ("train", "eval"):
        expected = read_metrics(tmp_path / "whole", kind)
        got = read_metrics(tmp_path / "broken", kind)
        keys = ("step", "loss") if kind == "train" else ("step", "val_loss", *(f"val_bpb/{n}" for n in names))
        assert [[m[k] for k in keys] for m in got] == [[m[k] for k in keys] for m in expected]

    # a --resume that names another mixture is refused in one line, before any work
    other = [*three_corpora[:2], three_corpora[2].replace(":0.1", ":0.3")]
    flags = ["--resume", "--out", str(tmp_path / "broken"), "--device", "cpu"]
    capsys.readouterr()  # what the runs above wrote
    code, _, err = run_cli([*flags, *(item for spec in other for item in ("--data", spec))], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "--data" in err and "differs from the resumed run's" in err


def test_repeated_data_flags_make_a_mixture_and_one_keeps_a_plain_value(capsys):
    from llama_mini.train.command import build_parser

    parser = build_parser()
    assert parser.parse_args(["--data", "a.txt:2", "--data", "b.txt"]).data == ["a.txt:2", "b.txt"]
    assert TrainConfig(data=parser.parse_args(["--data", "a.txt"]).data).data == "a.txt"
