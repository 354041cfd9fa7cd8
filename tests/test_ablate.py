"""The FFN ablation: matched parameters, the table and plot of a tiny run, resume, statistics, the CLI."""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from llama_mini.data import MANIFEST
from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.ffn import FEED_FORWARDS
from llama_mini.model.sizes import parameter_counts
from llama_mini.settings import help_text
from llama_mini.study import ablate
from llama_mini.study.ablate import (
    SHAZEER_TABLE1,
    AblationConfig,
    findings,
    gated_gap,
    main,
    plot_curves,
    read_results,
    run_ablation,
    runner,
    spearman,
    summarize,
)
from llama_mini.study.ablate.config import MODEL_DEFAULTS, MODEL_SETTINGS, TRAIN_DEFAULTS, TRAIN_SETTINGS
from llama_mini.tokenizer import Tokenizer
from llama_mini.train.config import TrainConfig, read_run_config
from llama_mini.train.data_feed import shared_data_folder

# dim 48 keeps the FFNs matched: 8 * 48 / 3 = 128 and 4 * 48 = 192 are multiples of 16.
TINY = dict(
    vocab_size=300,
    dim=48,
    n_layers=2,
    n_heads=2,
    multiple_of=16,
    max_seq_len=32,
    max_steps=2,
    batch_size=4,
    warmup_steps=1,
    eval_steps=2,
    device="cpu",
)


def write_corpus(folder: Path, documents: int = 12, seed: int = 0) -> Path:
    """A few KB of sentences from a small grammar, one .txt per document."""
    rng = random.Random(seed)
    subjects = ["the king", "a fool", "my lord", "the queen", "this knight"]
    verbs = ["speaks of", "dreams of", "fights for", "weeps for", "laughs at"]
    objects = ["the crown", "a rose", "the storm", "his honour", "the night"]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(30)]
        (folder / f"doc{index:02d}.txt").write_text("\n".join(lines).capitalize())
    return folder


def tiny_config(corpus: Path, out: Path, **overrides) -> AblationConfig:
    return AblationConfig.from_settings(
        **{
            **TINY,
            "variants": ["relu", "swiglu"],
            "seeds": [0],
            "data": str(corpus),
            "out": str(out),
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny ablation, relu and swiglu, 1 seed, 2 steps: (config, outcome, log lines)."""
    root = tmp_path_factory.mktemp("ablation")
    config = tiny_config(write_corpus(root / "corpus"), root / "out")
    lines: list[str] = []
    return config, run_ablation(config, log=lines.append), lines


def fake_result(variant: str, seed: int, val_loss: float, settings: dict | None = None) -> dict:
    return {
        "variant": variant,
        "seed": seed,
        "gated": FEED_FORWARDS[variant].gated,
        "ffn_hidden_dim": 256 if FEED_FORWARDS[variant].gated else 384,
        "ffn_parameters": 294912,
        "parameters": 1000000,
        "val_loss": val_loss,
        "val_bpb": val_loss / 2,
        "tokens_per_second": 1000.0,
        "settings": settings or {},
    }


def test_default_settings_give_every_variant_the_same_ffn_parameters():
    config = AblationConfig()
    counts = {
        variant: parameter_counts(config.model_args(variant))["feed_forward"] for variant in FEED_FORWARDS
    }
    assert len(set(counts.values())) == 1, counts


def test_every_run_is_train_config_and_model_args_with_only_the_ablations_defaults_changed():
    """The runs' settings come from TrainConfig and ModelArgs: the fields the ablation does not set keep
    their declared defaults, and the ones it sets have the values its results were made with."""
    config = AblationConfig()
    run = config.train_config(2, Path("runs/x"))
    ablation_values = dict(
        vocab_size=2048, split_seed=0, max_steps=200, batch_size=8, lr=2e-3, min_lr=2e-4, warmup_steps=20,
        weight_decay=0.1, dtype="fp32",
        eval_steps=40, seed=2, out="runs/x", eval_interval=200, log_interval=10, keep_last=1, sample_tokens=0,
    )  # fmt: skip
    declared = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        expected = ablation_values.get(field.name, getattr(declared, field.name))
        assert getattr(run, field.name) == expected, field.name
    model = config.model_args("geglu", vocab_size=300)
    assert model == ModelArgs(dim=96, n_heads=4, multiple_of=32, max_seq_len=128, ffn="geglu", vocab_size=300)


def test_the_ablation_declares_no_training_or_model_setting_again():
    own = {field.name for field in dataclasses.fields(AblationConfig)}
    shared = {field.name for cls in (TrainConfig, ModelArgs) for field in dataclasses.fields(cls)}
    assert own & shared == {"out"}  # the ablation's folder; each run's own out is TrainConfig's
    assert set(TRAIN_DEFAULTS) <= set(TRAIN_SETTINGS) and set(MODEL_DEFAULTS) <= set(MODEL_SETTINGS)


def test_flags_carry_the_help_of_train_config_and_model_args_with_the_ablations_defaults(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words
    assert f"--max-steps MAX_STEPS {help_text(TrainConfig, 'max_steps')} (default: 200)" in text
    assert f"--dim DIM {help_text(ModelArgs, 'dim')} (default: 96)" in text
    assert f"--n-kv-heads N_KV_HEADS {help_text(ModelArgs, 'n_kv_heads')} (default: None)" in text


def test_from_settings_puts_each_setting_where_it_is_declared():
    config = AblationConfig.from_settings(variants=["relu"], max_steps=7, lr=1e-3, dim=64, n_kv_heads=2)
    assert config.variants == ["relu"] and config.train.max_steps == 7 and config.train.lr == 1e-3
    assert config.train.min_lr == 2e-4  # the ablation's, not derived from --lr
    assert config.model.dim == 64 and config.model.n_kv_heads == 2 and config.model.multiple_of == 32
    with pytest.raises(ConfigError, match="unknown ablation setting\\(s\\) 'grad_accum'"):
        AblationConfig.from_settings(grad_accum=2)


def test_a_shared_setting_changed_from_python_is_part_of_the_results_settings():
    config = AblationConfig()
    assert "grad_accum" not in config.settings() and "dropout" not in config.settings()
    changed = dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, grad_accum=2),
        model=dataclasses.replace(config.model, dropout=0.1),
    )
    assert changed.settings() == {**config.settings(), "grad_accum": 2, "dropout": 0.1}


def test_tiny_ablation_writes_a_table_with_both_rows(finished):
    _, outcome, _ = finished
    table = outcome["table"].read_text()
    assert "| relu | no | 192 | 36,864 |" in table
    assert "| swiglu | yes | 128 | 36,864 |" in table
    assert "Shazeer 65k log-ppl" in table


def test_tiny_ablation_writes_png_plots_of_losses_and_curves(finished):
    _, outcome, _ = finished
    for plot in (outcome["plot"], outcome["curves"]):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("logged", [[1, 2, 3], [6]], ids=["three steps", "one step"])
def test_training_curves_have_whole_step_ticks(logged, tmp_path, monkeypatch):
    """Runs logged at steps 1 to 3, or at step 6 alone, would get ticks at 1.25, 1.5, ... or 5.8, 5.9, ...
    from matplotlib's default locator."""
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    curves = {
        variant: {
            "gated": FEED_FORWARDS[variant].gated,
            "per_seed": {0: {step: 5.0 / step for step in logged}},
        }
        for variant in ("relu", "swiglu")
    }
    assert plot_curves(curves, tmp_path / "curves.png")
    losses, gap = drawn[0].axes
    for axes in (losses, gap):
        low, high = axes.get_xlim()
        ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
        assert len(ticks) >= min(2, len(logged)) and all(tick == round(tick) for tick in ticks), ticks


def test_each_finished_run_is_one_line_of_results(finished):
    config, _, _ = finished
    results = read_results(Path(config.out) / ablate.RESULTS)
    assert [(r["variant"], r["seed"], r["steps"]) for r in results] == [("relu", 0, 2), ("swiglu", 0, 2)]
    assert all(r["settings"] == config.settings() for r in results)


def test_runs_share_one_tokenizer_and_data_and_drop_checkpoints(finished):
    config, _, _ = finished
    out = Path(config.out)
    data = shared_data_folder(out / "data", Tokenizer(out / "tokenizer.model"))  # every run's --data-dir
    assert (out / "tokenizer.model").exists() and (data / MANIFEST).exists()
    run = out / "runs" / "relu-seed0"
    assert (run / "metrics.jsonl").exists()
    assert not (run / "data").exists() and not (run / "best").exists() and not list(run.glob("step-*"))


def test_resume_trains_only_the_runs_not_yet_finished(finished, monkeypatch, tmp_path):
    config, _, _ = finished
    out = tmp_path / "out"
    shutil.copytree(config.out, out)  # a copy: the fixture's folder stays as the tiny run left it
    trained = []

    def fake_train(config, variant, seed, tokenizer_path, data_dir, out, settings):
        trained.append((variant, seed))
        return {**fake_result(variant, seed, 5.0, settings), "seconds": 1.0, "device": "cpu"}

    monkeypatch.setattr(runner, "_train_one", fake_train)
    extended = dataclasses.replace(config, out=str(out), variants=["relu", "gelu", "swiglu"])
    outcome = run_ablation(extended, log=lambda line: None)
    assert trained == [("gelu", 0)]
    assert [row["variant"] for row in outcome["summary"]] == ["relu", "gelu", "swiglu"]


def with_settings(config: AblationConfig, **changes) -> AblationConfig:
    """`config` with some of its training (TRAIN_SETTINGS) or model (MODEL_SETTINGS) settings changed."""
    train = {name: value for name, value in changes.items() if name in TRAIN_SETTINGS}
    model = {name: value for name, value in changes.items() if name in MODEL_SETTINGS}
    return dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, **train),
        model=dataclasses.replace(config.model, **model),
    )


def test_results_made_with_other_settings_are_refused(finished):
    config, _, _ = finished
    changed = with_settings(config, max_steps=3)
    with pytest.raises(ConfigError, match="max_steps 2 -> 3"):
        run_ablation(changed, log=lambda line: None)


def test_every_run_trains_with_the_ablations_settings_its_variant_and_its_seed(finished):
    """What each run actually trained with: the config.toml its Trainer wrote (llama_mini/train/run_folder)."""
    config, _, _ = finished
    for variant in config.variants:
        train, model = read_run_config(Path(config.out) / "runs" / f"{variant}-seed0" / "config.toml")
        assert (model["ffn"], model["dim"], model["multiple_of"], model["weight_init"]) == (
            variant,
            48,
            16,
            "scaled",
        )
        assert (train["seed"], train["max_steps"], train["split_seed"], train["lr"]) == (0, 2, 0, 2e-3)
    assert with_settings(config, weight_init="gpt2").model_overrides("relu")["weight_init"] == "gpt2"


def results_from_before_the_init_setting(config: AblationConfig, out: Path) -> None:
    """A results.jsonl as llama_mini wrote it before `weight_init` existed: GPT-2's init, no such setting,
    and multi-head attention written as n_kv_heads None."""
    settings = {key: value for key, value in config.settings().items() if key != "weight_init"}
    assert settings["n_kv_heads"] == config.model.n_heads
    settings["n_kv_heads"] = None
    out.mkdir(parents=True)
    (out / ablate.RESULTS).write_text(json.dumps(fake_result("relu", 0, 5.0, settings)) + "\n")


def test_results_from_before_the_init_setting_extend_an_ablation_with_init_gpt2(
    finished, tmp_path, monkeypatch
):
    config, _, _ = finished
    old = dataclasses.replace(with_settings(config, weight_init="gpt2"), out=str(tmp_path / "out"))
    results_from_before_the_init_setting(old, tmp_path / "out")
    monkeypatch.setattr(
        runner, "_train_one", lambda *args: pytest.fail("the run is already in results.jsonl")
    )
    outcome = run_ablation(dataclasses.replace(old, variants=["relu"]), log=lambda line: None)
    assert [(r["variant"], r["val_loss"]) for r in outcome["results"]] == [("relu", 5.0)]


def test_results_from_before_the_init_setting_are_refused_by_the_scaled_init(finished, tmp_path):
    config, _, _ = finished
    new = dataclasses.replace(config, out=str(tmp_path / "out"))
    results_from_before_the_init_setting(new, tmp_path / "out")
    with pytest.raises(ConfigError, match="weight_init 'gpt2' -> 'scaled'"):
        run_ablation(new, log=lambda line: None)


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(fake_result("relu", 0, 5.0)) + "\n" + '{"variant": "sw')
    assert [r["variant"] for r in read_results(path)] == ["relu"]


def test_summary_gives_mean_std_and_both_rankings():
    results = [
        fake_result(v, s, 4.0 + 0.01 * i + 0.001 * s) for i, v in enumerate(FEED_FORWARDS) for s in (0, 1)
    ]
    rows = summarize(results, list(FEED_FORWARDS))
    relu = rows[0]
    assert relu["val_loss"] == pytest.approx(4.0005) and relu["val_loss_std"] == pytest.approx(
        0.000707, abs=1e-6
    )
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    shazeer = {row["variant"]: row["shazeer_rank"] for row in rows}
    assert shazeer == {
        "geglu": 1,
        "swiglu": 2,
        "reglu": 3,
        "bilinear": 4,
        "glu": 5,
        "gelu": 6,
        "swish": 7,
        "relu": 8,
    }
    # rank differences relu..swiglu: -7, -4, -4, -1, 1, 3, 6, 6; squares sum to 164
    assert spearman(rows) == pytest.approx(1 - 6 * 164 / (8 * (8 * 8 - 1)))


def test_shazeers_own_ordering_has_rank_correlation_one():
    results = [fake_result(v, 0, SHAZEER_TABLE1[v][0]) for v in FEED_FORWARDS]
    assert spearman(summarize(results, list(FEED_FORWARDS))) == pytest.approx(1.0)


def test_gated_gap_is_paired_by_seed():
    # Seed 1 is worse for every variant by 0.5; the gated variants are 0.1 and 0.12 better in the two seeds.
    results = [
        fake_result("relu", 0, 4.0),
        fake_result("swiglu", 0, 3.9),
        fake_result("relu", 1, 4.5),
        fake_result("swiglu", 1, 4.38),
    ]
    gap = gated_gap(results)
    assert gap["gap"] == pytest.approx(-0.11)
    assert gap["standard_error"] == pytest.approx(0.01)
    assert gap["standard_errors"] == pytest.approx(-11.0)


def test_findings_give_the_gap_of_each_seed_and_the_summed_training_time():
    results = [
        {**fake_result(variant, seed, loss), "seconds": 30.0}
        for variant, seed, loss in (
            ("relu", 0, 4.0),
            ("swiglu", 0, 3.9),
            ("relu", 1, 4.5),
            ("swiglu", 1, 4.38),
        )
    ]
    found = findings(summarize(results, ["relu", "swiglu"]), results)
    assert "paired by seed: -0.1100 nats (per seed -0.1000, -0.1200; standard error 0.0100" in found[0]
    assert found[-1].startswith("Training time: 120 s (2.0 min) summed over the 4 runs")


def test_gated_gap_needs_two_seeds():
    assert gated_gap([fake_result("relu", 0, 4.0), fake_result("swiglu", 0, 3.9)]) is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variants", "relu", "tanh"], "invalid choice: 'tanh'"),
        (["--dim", "90"], "dim (90) must be divisible by n_heads (4)"),
        (["--seeds", "1", "1"], "must not repeat"),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(capsys, tmp_path, argv, message):
    code = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err


def test_an_interrupted_run_is_not_recorded_and_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_train_one", lambda *args: None)  # as when Ctrl-C stops a Trainer
    corpus = write_corpus(tmp_path / "corpus")
    argv = ["--variants", "relu", "--seeds", "0", "--data", str(corpus), "--out", str(tmp_path / "out")]
    argv += ["--vocab-size", "300", "--dim", "48", "--n-heads", "2", "--max-seq-len", "32", "--device", "cpu"]
    assert main(argv) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert read_results(tmp_path / "out" / ablate.RESULTS) == []


def test_the_optimizer_keeps_results_apart_and_older_results_count_as_adamw(finished, tmp_path, monkeypatch):
    """Results written before --optimizer existed were AdamW's: they extend an AdamW ablation (whatever
    --muon-lr says, which AdamW does not read) and a Muon ablation refuses to mix with them."""
    config, _, _ = finished
    assert "muon_lr" not in config.settings() and config.settings()["optimizer"] == "adamw"
    muon = with_settings(config, optimizer="muon", muon_lr=0.01)
    assert (muon.settings()["optimizer"], muon.settings()["muon_lr"]) == ("muon", 0.01)
    old = dataclasses.replace(with_settings(config, muon_lr=0.05), out=str(tmp_path / "out"))
    settings = {key: value for key, value in old.settings().items() if key != "optimizer"}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ablate.RESULTS).write_text(json.dumps(fake_result("relu", 0, 5.0, settings)) + "\n")
    monkeypatch.setattr(
        runner, "_train_one", lambda *args: pytest.fail("the run is already in results.jsonl")
    )
    outcome = run_ablation(dataclasses.replace(old, variants=["relu"]), log=lambda line: None)
    assert [(r["variant"], r["val_loss"]) for r in outcome["results"]] == [("relu", 5.0)]
    with pytest.raises(ConfigError, match="optimizer 'adamw' -> 'muon'"):
        run_ablation(dataclasses.replace(muon, out=old.out, variants=["relu"]), log=lambda line: None)
