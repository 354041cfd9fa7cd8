"""Plots: every command writes a non-empty image (Agg backend, temp folders), the curves are the model's own
functions, and every mistake is one line on stderr with exit code 2."""

import json
import random
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from llama_mini.checkpoint import save_pretrained
from llama_mini.model.ffn import FEED_FORWARDS, GATED_FEED_FORWARDS
from llama_mini.model.presets import get_preset
from llama_mini.model.transformer import Transformer
from llama_mini.study import plots
from llama_mini.study.plots import glu
from llama_mini.study.plots.style import figure_style, new_figure
from llama_mini.tokenizer import Tokenizer, train_tokenizer

matplotlib.use("Agg")  # no display in tests; figures are written to files only

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_images(paths, image_format: str = "png") -> None:
    assert paths
    for path in map(Path, paths):
        data = path.read_bytes()
        assert path.suffix == f".{image_format}" and len(data) > 1000, path
        if image_format == "png":
            assert data.startswith(PNG_SIGNATURE), path
        else:
            assert b"<svg" in data[:2000], path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def write_metrics(folder: Path, steps: int = 40, seed: int = 0) -> Path:
    """A metrics.jsonl as training.py writes it: a train line every 10 steps, an eval line every 20."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    lines = []
    for step in range(10, steps + 1, 10):
        loss = 8.0 - step / 10 + rng.random() * 0.1
        lines.append(
            {
                "type": "train",
                "step": step,
                "tokens": step * 4096,
                "loss": loss,
                "lr": 1e-3 * step / steps,
                "tokens_per_second": 5000 + rng.random() * 100,
                "time": 1.0 * step,
            }
        )
        if step % 20 == 0:
            lines.append(
                {
                    "type": "eval",
                    "step": step,
                    "tokens": step * 4096,
                    "val_loss": loss + 0.1,
                    "val_bpb": 2.0,
                    "time": 1.0 * step,
                }
            )
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "sleep", "dream", "die", "and"]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)]
    return train_tokenizer(["\n".join(lines) + "\n"], folder / "tokenizer.model", 300).model_path


def save_tiny_checkpoint(folder: Path, tokenizer_path: Path, ffn: str) -> Path:
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=300, ffn=ffn))
    save_pretrained(model, folder, tokenizer_path=tokenizer_path)
    return folder


# --------------------------------------------------------------------------------------------- the commands


def test_activations_command_writes_the_atlas_and_one_panel_per_function(tmp_path, capsys):
    assert plots.main(["activations", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    expected = ["activations"] + [f"activation_{panel.name}" for panel in plots.ACTIVATIONS]
    assert [Path(path).stem for path in printed] == expected
    assert_images(printed)


def test_glu_command_writes_every_gated_variant(tmp_path, capsys):
    assert plots.main(["glu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(path).stem for path in printed] == ["glu"] + [f"glu_{name}" for name in GATED_FEED_FORWARDS]
    assert_images(printed)


def test_svg_format_writes_svg_files(tmp_path):
    assert_images(plots.plot_training([write_metrics(tmp_path / "run")], tmp_path / "img", "svg"), "svg")


def test_training_command_overlays_runs_from_folders_and_files(tmp_path, capsys, monkeypatch):
    first = write_metrics(tmp_path / "baseline").parent  # a run folder
    second = write_metrics(tmp_path / "wider", seed=1)  # a metrics.jsonl path
    drawn = catch_figures(monkeypatch)
    assert plots.main(["training", "--runs", str(first), str(second), "--out", str(tmp_path / "img")]) == 0
    assert [Path(path).name for path in capsys.readouterr().out.split()] == ["training.png"]
    step_axes = drawn[0].axes[0]
    labels = [line.get_label() for line in step_axes.get_lines()]
    assert labels == [
        f"baseline (best val {best_val_loss(first):.3f}): train",
        "baseline: validation",
        f"wider (best val {best_val_loss(second):.3f}): train",
        "wider: validation",
    ]
    assert list(step_axes.get_lines()[2].get_xdata()) == [10, 20, 30, 40]  # the second run's train steps


def catch_figures(monkeypatch) -> list:
    """The figures saved from now on, in order (still written to their files)."""
    drawn = []
    save = Figure.savefig

    def savefig(figure, *args, **kwargs):
        drawn.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return drawn


def best_val_loss(run: Path) -> float:
    path = run / "metrics.jsonl" if run.is_dir() else run
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return min(record["val_loss"] for record in records if record["type"] == "eval")


def test_run_labels_are_folder_names(tmp_path):
    runs = [write_metrics(tmp_path / "a" / "demo"), write_metrics(tmp_path / "b" / "demo"), tmp_path / "c"]
    (tmp_path / "c").mkdir()
    labels = plots.run_labels(runs)
    assert labels == [str(runs[0]), str(runs[1]), "c"]  # duplicates fall back to the path as given


@pytest.mark.parametrize("ffn", ["swiglu", "relu"])
def test_ffn_stats_command_draws_one_row_per_layer_with_the_initial_model(
    ffn, tokenizer_path, tmp_path, capsys, monkeypatch
):
    """Rows: the layers; columns: a, act(a) and, for gated variants, act(a) * w3 x; --compare-init adds the
    outline of a freshly initialised model to every panel."""
    checkpoint = save_tiny_checkpoint(tmp_path / "model", tokenizer_path, ffn)
    drawn = catch_figures(monkeypatch)
    argv = ["ffn-stats", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "img"), "--compare-init"]
    assert plots.main([*argv, "--text", "to be or not to be"]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(path).name for path in printed] == ["ffn_stats.png"]
    assert_images(printed)
    columns = 3 if ffn in GATED_FEED_FORWARDS else 2
    panels = drawn[0].axes
    assert len(panels) == get_preset("tiny").n_layers * columns
    assert panels[0].get_title() == "layer 0: a = w1 x" and panels[columns].get_title().startswith(
        "layer 1: "
    )
    legend = [text.get_text() for text in drawn[0].legends[0].get_texts()]
    assert legend[:2] == ["trained", "at initialisation"]


def test_ffn_stats_of_a_run_folder_reads_its_best_checkpoint_and_says_so(tokenizer_path, tmp_path, capsys):
    run = tmp_path / "run"
    save_tiny_checkpoint(run / "best", tokenizer_path, "swiglu")
    printed = plots.plot_ffn_stats(run, tmp_path / "img", text="to be or not to be")  # fits: not cut
    assert [Path(path).name for path in printed] == ["ffn_stats.png"]
    assert capsys.readouterr().err == f"loading {run / 'best'} (the checkpoint of run folder {run})\n"


def test_ffn_stats_says_when_it_cuts_a_long_text_and_to_how_many_tokens(tokenizer_path, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "model", tokenizer_path, "swiglu")
    long_text = tmp_path / "long.txt"
    long_text.write_text("to be or not to be that is the question\n" * 40)
    tokens = len(Tokenizer(tokenizer_path).encode(long_text.read_text(), bos=True))
    max_seq_len = get_preset("tiny").max_seq_len
    assert tokens > max_seq_len
    argv = ["ffn-stats", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "img")]
    assert plots.main([*argv, "--text-file", str(long_text)]) == 0
    err = capsys.readouterr().err
    assert err == (
        f"note: the text is {tokens:,} tokens; cut to the model's max_seq_len, its first {max_seq_len} tokens\n"
    )
    assert plots.main([*argv, "--text", "to be or not to be"]) == 0
    assert capsys.readouterr().err == ""  # a text that fits is not cut, and nothing is said


def test_glu_surface_legend_sits_outside_the_heat_map():
    with figure_style():
        figure = new_figure(15, 4.6)
        axes = figure.subplots(1, 3)
        glu._draw_glu_row(figure, axes, plots.GLU_VARIANTS[-1])
        figure.draw_without_rendering()
        heat, legend = axes[0].get_window_extent(), axes[0].get_legend().get_window_extent()
    assert legend.height > 0 and legend.y1 < heat.y0  # wholly below the map


# --------------------------------------------------------------------------------------------- the curves


def test_swiglu_unit_is_silu_gate_times_value_with_both_slices():
    unit = plots.gated_unit("swiglu")
    x = torch.linspace(-4, 4, 41, dtype=torch.float64)
    torch.testing.assert_close(plots.glu_values(unit, x, x), x * x * torch.sigmoid(x))  # diagonal
    torch.testing.assert_close(plots.glu_values(unit, x, torch.ones_like(x)), F.silu(x))  # b = 1
    a, b = torch.randn(2, 100, dtype=torch.float64)
    torch.testing.assert_close(plots.glu_values(unit, a, b), F.silu(a) * b)


def test_every_variant_panel_names_a_gated_feed_forward():
    assert [variant.ffn for variant in plots.GLU_VARIANTS] == list(GATED_FEED_FORWARDS)


def test_autograd_derivatives_match_closed_forms():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    s = torch.sigmoid(x)
    torch.testing.assert_close(plots.derivative(torch.sigmoid, x), s * (1 - s))
    torch.testing.assert_close(plots.derivative(torch.tanh, x), 1 - torch.tanh(x) ** 2)
    torch.testing.assert_close(plots.derivative(F.silu, x), s * (1 + x * (1 - s)))


@pytest.mark.parametrize("ffn", list(FEED_FORWARDS))
def test_hooked_hidden_activations_reproduce_the_feed_forward(ffn):
    """w2 applied to the caught hidden activations gives the feed-forward's own output, for every variant:
    the gate activation chosen for `ffn` is the one its forward uses."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", ffn=ffn, swish_beta=1.7)).eval()
    outputs = []
    handle = model.layers[1].feed_forward.register_forward_hook(lambda _m, _i, out: outputs.append(out[0]))
    stats = plots.feed_forward_statistics(model, torch.randint(0, 256, (20,)))
    handle.remove()
    hidden = stats[1].hidden if stats[1].hidden is not None else stats[1].activated
    with torch.no_grad():
        torch.testing.assert_close(model.layers[1].feed_forward.w2(hidden), outputs[0])
    assert (stats[1].hidden is None) == (ffn not in GATED_FEED_FORWARDS)
    assert len(stats) == 2 and stats[0].gate.shape == (20, model.layers[0].feed_forward.hidden_dim)


# --------------------------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    "content, says",
    [
        (None, "no such file"),
        ("", "holds no train or eval records"),
        ('{"type": "train", "step": 10\n', "line 1 is not JSON"),
        ('{"type": "train", "step": 10, "tokens": 5}\n', "line 1 (train) has no number 'loss'"),
    ],
)
def test_bad_metrics_log_is_one_line_error_naming_the_file(content, says, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert plots.main(["training", "--runs", str(run), "--out", str(tmp_path / "img")]) == 2
    err = one_line_error(capsys)
    assert str(run / "metrics.jsonl") in err and says in err


def test_ffn_stats_mistakes_are_one_line_errors(tokenizer_path, tmp_path, capsys):
    out = str(tmp_path / "img")
    assert plots.main(["ffn-stats", "--checkpoint", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "does not exist" in one_line_error(capsys)
    checkpoint = save_tiny_checkpoint(tmp_path / "model", tokenizer_path, "swiglu")
    assert plots.main(["ffn-stats", "--checkpoint", str(checkpoint), "--text", "  ", "--out", out]) == 2
    assert "the text is empty" in one_line_error(capsys)
    missing = str(tmp_path / "missing.txt")
    assert (
        plots.main(["ffn-stats", "--checkpoint", str(checkpoint), "--text-file", missing, "--out", out]) == 2
    )
    assert "no such file" in one_line_error(capsys)


def test_usage_mistakes_are_one_line_errors(tmp_path, capsys):
    assert plots.main(["histogram", "--out", str(tmp_path)]) == 2
    one_line_error(capsys)
    assert plots.main(["glu"]) == 2  # --out is required
    one_line_error(capsys)
    assert plots.main(["glu", "--out", str(tmp_path), "--format", "jpeg"]) == 2
    one_line_error(capsys)
    out_file = tmp_path / "file"
    out_file.write_text("")
    assert plots.main(["glu", "--out", str(out_file)]) == 2
    assert "is a file" in one_line_error(capsys)


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plots.main(["glu", "--out", str(tmp_path)]) == 2
    assert "pip install 'llama_mini[plot]'" in one_line_error(capsys)


def test_training_command_takes_runs_as_arguments_and_draws_loss_by_wall_time(tmp_path, capsys, monkeypatch):
    first = write_metrics(tmp_path / "lr-1e-3").parent
    second = write_metrics(tmp_path / "lr-3e-3", seed=1).parent
    drawn = catch_figures(monkeypatch)
    assert plots.main(["training", str(first), str(second), "--out", str(tmp_path / "img")]) == 0
    assert [Path(path).name for path in capsys.readouterr().out.split()] == ["training.png"]
    step_axes, token_axes, time_axes = drawn[0].axes[:3]
    assert [line.get_label() for line in time_axes.get_lines()][1::2] == [
        "lr-1e-3: validation",
        "lr-3e-3: validation",
    ]
    assert time_axes.get_xlabel() == "seconds since the start"
    # the clock starts one window (the first record's tokens at its tokens/s) before the first record
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if record["type"] == "train"]
    start = train[0]["time"] - train[0]["tokens"] / train[0]["tokens_per_second"]
    assert list(time_axes.get_lines()[0].get_xdata()) == pytest.approx(
        [record["time"] - start for record in train]
    )
    assert time_axes.get_lines()[1].get_marker() == "o"  # the validation points are marked


def test_training_command_without_runs_is_one_line(tmp_path, capsys):
    assert plots.main(["training", "--out", str(tmp_path / "img")]) == 2
    assert "no runs given" in one_line_error(capsys)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is new in torch 2.9")
def test_newton_schulz_command_draws_the_spectra_before_and_after_muon(tokenizer_path, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "model", tokenizer_path, "swiglu")
    argv = ["newton-schulz", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "img")]
    assert plots.main([*argv, "--text", "to be or not to be, that is the question"]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(path).name for path in printed] == ["newton_schulz.png"]
    assert_images(printed)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is new in torch 2.9")
def test_muons_update_has_the_gradients_singular_vectors_and_flat_singular_values():
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(48, 16, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(16, 16, generator=generator))
    spread = torch.logspace(0, -2, 16)
    update = plots.muon_update(left @ torch.diag(spread) @ right.T)
    projected = left.T @ update @ right  # diagonal, within bf16's rounding: Muon's matmuls are bf16
    off_diagonal = projected - torch.diag(torch.diagonal(projected))
    assert off_diagonal.abs().max() < 0.05
    values = torch.linalg.svdvals(update)
    assert values.min() > 0.5 and values.max() < 1.5  # spread 100x before
    expected = plots.newton_schulz_polynomial(spread / spread.norm(), 5)  # p acts on each singular value
    torch.testing.assert_close(torch.diagonal(projected), expected, rtol=0, atol=0.05)
