"""The inspector: analytic counts, hidden sizes, FLOPs and KV bytes against the model built on meta; the CLI."""

import json

import pytest

from llama_mini.checkpoint import save_pretrained
from llama_mini.model.presets import get_preset
from llama_mini.model.sizes import count_parameters
from llama_mini.model.transformer import Transformer
from llama_mini.study.inspector import (
    inspect_model,
    main,
    shape_walk,
)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_shape_walk_runs_on_meta_and_ends_in_batch_seq_vocab():
    walk = shape_walk(get_preset("llama3-8b"), batch_size=2, seq_len=8)
    assert walk["source"].startswith("measured")
    assert walk["steps"][0]["module"] == "tok_embeddings"
    assert walk["steps"][-1] == {
        "module": "output",
        "shape": [2, 8, 128256],
        "formula": ("B", "T", "vocab"),
        "expected": [2, 8, 128256],
    }


def test_shape_walk_measures_what_the_formulas_predict():
    for name in ("tiny", "llama3-8b"):
        for step in shape_walk(get_preset(name))["steps"]:
            assert step["shape"] == step["expected"], step["module"]


def test_shape_walk_follows_the_order_of_the_forward_pass():
    modules = [step["module"] for step in shape_walk(get_preset("tiny"))["steps"]]
    layer0 = [m for m in modules if m.startswith("layers.0")]
    assert layer0 == [
        "layers.0.attention_norm",
        "layers.0.attention.wq",
        "layers.0.attention.wk",
        "layers.0.attention.wv",
        "layers.0.attention.wo",
        "layers.0.attention",
        "layers.0.ffn_norm",
        "layers.0.feed_forward.w1",
        "layers.0.feed_forward.w3",
        "layers.0.feed_forward.w2",
        "layers.0.feed_forward",
        "layers.0",
    ]
    assert modules[-2:] == ["norm", "output"]


def test_shape_walk_falls_back_to_the_formulas_if_meta_fails(monkeypatch):
    def refuse(self, tokens, start_pos=0):
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(Transformer, "forward", refuse)
    args = get_preset("tiny")
    walk = shape_walk(args)
    assert walk["source"].startswith("computed from the formulas")
    assert [s["module"] for s in walk["steps"]][-1] == "output"
    assert all(step["shape"] == step["expected"] for step in walk["steps"])


def test_report_of_llama3_8b_gives_total_kv_bytes_and_summarised_layers(capsys):
    code, out, err = run_cli(capsys, "--preset", "llama3-8b")
    assert code == 0 and err == ""
    assert "8,030,261,248" in out
    assert "131,072 bytes" in out
    assert "(1, 8, 128256)" in out
    assert "layers.1 .. layers.31: the same 12 shapes as layers.0" in out
    assert "equal, part by part, to count_parameters" in out


def test_json_report_is_machine_readable(capsys):
    code, out, _ = run_cli(capsys, "--preset", "tiny", "--json", "--dtype", "fp32")
    report = json.loads(out)
    assert code == 0
    assert report["parameters"]["total"] == count_parameters(Transformer(get_preset("tiny")))["total"]
    assert report["kv_cache"]["bytes_per_token"] == 2 * 2 * 2 * 16 * 4


def test_ffn_flag_replaces_the_variant(capsys):
    code, out, _ = run_cli(capsys, "--preset", "llama-7b", "--ffn", "relu")
    assert code == 0 and "FFN hidden size h = 16384" in out


def test_inspect_model_reports_the_built_models_counts():
    report = inspect_model(get_preset("stories15m"), name="stories15m")
    assert report["parameters"] == report["parameters_of_built_model"]
    assert report["name"] == "stories15m"


def test_checkpoint_is_inspected_from_its_config_alone(capsys, tmp_path):
    args = get_preset("tiny")
    save_pretrained(Transformer(args), tmp_path)
    (tmp_path / "model.safetensors").unlink()  # the weights are never read
    code, out, err = run_cli(capsys, "--checkpoint", str(tmp_path))
    assert code == 0, err
    assert f"{count_parameters(Transformer(args))['total']:,}" in out


def test_a_run_folder_is_inspected_through_its_best_checkpoint(capsys, tmp_path):
    save_pretrained(Transformer(get_preset("tiny")), tmp_path / "best")
    code, out, err = run_cli(capsys, "--checkpoint", str(tmp_path))
    assert code == 0, err
    assert err == f"loading {tmp_path / 'best'} (the checkpoint of run folder {tmp_path})\n"
    assert f"{count_parameters(Transformer(get_preset('tiny')))['total']:,}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "llama-9000"], "unknown preset 'llama-9000'"),
        (["--checkpoint", "/no/such/folder"], "does not exist"),
        ([], "one of the arguments --preset --checkpoint is required"),
        (["--preset", "tiny", "--seq-len", "65"], "--seq-len 65"),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(capsys, argv, message):
    code = main(argv)  # every mistake returns 2, argparse's own (a missing flag) included
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err
