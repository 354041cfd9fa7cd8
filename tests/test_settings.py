"""Settings: flags, checks and config files made from one declaration per setting (llama_mini/settings.py),
and train.py's --config, which reproduces a run from its OUT/config.toml."""

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Literal

import pytest
from test_training import cli_flags, corpus_dir, read_metrics, tokenizer_path  # noqa: F401 (fixtures)

import train as train_cli
from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.settings import (
    add_flags,
    choice_problems,
    from_dict,
    read_config_file,
    setting,
    write_config_file,
)
from llama_mini.train.config import TrainConfig, read_run_config, write_run_config


@dataclass
class Example:
    width: int = setting(3, "how wide")
    kind: Literal["plain", "fancy"] = setting("plain", "which kind")
    limit: float | None = setting(None, "an optional limit")
    loud: bool = setting(False, "say it loudly")
    names: list[Literal["a", "b", "c"]] = setting(factory=lambda: ["a"], help="some names")
    secret: dict | None = setting(None, "set by code only", flag=False)


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_flags(parser, Example)
    return vars(parser.parse_args(argv))


def test_flags_are_made_from_the_declarations_and_only_given_flags_are_set():
    assert parse() == {}  # defaults stay with the dataclass, so explicit choices can be told apart
    given = parse("--width", "5", "--kind", "fancy", "--limit", "none", "--loud", "--names", "b", "c")
    assert given == {"width": 5, "kind": "fancy", "limit": None, "loud": True, "names": ["b", "c"]}
    assert Example(**parse("--limit", "0.5", "--no-loud")) == Example(limit=0.5, loud=False)


def test_choices_come_from_the_literal_type_and_help_shows_the_default():
    parser = argparse.ArgumentParser()
    add_flags(parser, Example, defaults=Example(width=7))
    help_text = parser.format_help()
    assert "{plain,fancy}" in help_text and "how wide (default: 7)" in help_text
    assert "--secret" not in help_text  # flag=False
    with pytest.raises(SystemExit):
        parser.parse_args(["--kind", "odd"])


def test_choice_problems_name_the_flag_and_the_values():
    assert choice_problems(Example()) == []
    assert choice_problems(Example(kind="odd", names=["a", "z"])) == [
        "--kind must be one of plain, fancy, got 'odd'",
        "--names must be one of a, b, c, got ['z']",
    ]


def test_from_dict_refuses_an_unknown_key_by_name():
    assert from_dict(Example, {"width": 4}) == Example(width=4)
    with pytest.raises(
        ConfigError, match="unknown setting\\(s\\) 'widht' in the saved run; known: width, kind"
    ):
        from_dict(Example, {"widht": 4}, "the saved run")
    with pytest.raises(ConfigError, match="unknown setting.*'max_step' in the training config"):
        TrainConfig.from_dict({"max_step": 3})


def test_a_config_file_reads_back_every_value_written(tmp_path):
    values = {
        "width": 3,
        "kind": "fancy",
        "limit": float("inf"),
        "loud": True,
        "names": ["a", "c"],
        "secret": {"factor": 1e-05, "quote": 'say "hi"\n\ttab, \u00e9, \U0001d11e'},
    }
    write_config_file(tmp_path / "run.toml", {"one": values, "two": {"limit": None}}, header="a\nheader")
    assert (tmp_path / "run.toml").read_text().startswith("# a\n# header\n")
    read = read_config_file(tmp_path / "run.toml", {"one": Example, "two": Example})
    assert read == {"one": values, "two": {}}  # None is written as a comment: it reads back as absent


def test_a_config_file_with_an_unknown_table_or_key_is_refused_by_name(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nmax_step = 3\n")
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) 'max_step' in \\[train\\]"):
        read_run_config(path)
    path.write_text("max_steps = 3\n")
    with pytest.raises(ConfigError, match="unknown table or key 'max_steps' at the top level"):
        read_run_config(path)
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_run_config(path)
    path.write_text("[model]\nvocab_size = 100\n")
    with pytest.raises(ConfigError, match="vocab_size comes from the tokenizer"):
        read_run_config(path)


def test_the_run_config_round_trips_both_tables(tmp_path):
    config = TrainConfig(data="my.txt", max_steps=7, sample_prompt="\n", compile=None, lr=3e-4)
    args = ModelArgs(dim=64, n_heads=4, ffn="geglu", rope_scaling=None, vocab_size=300)
    write_run_config(tmp_path / "config.toml", config, args)
    train, model = read_run_config(tmp_path / "config.toml")
    assert TrainConfig(**train) == config
    assert ModelArgs(**model, vocab_size=300) == args


def run_cli(argv, capsys):
    code = train_cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_runs_config_toml_reproduces_it_and_flags_override_it(corpus_dir, tokenizer_path, tmp_path, capsys):
    first = tmp_path / "first"
    code, _, err = run_cli(
        [*cli_flags(corpus_dir, tokenizer_path, out=first, max_steps=4, eval_interval=2)], capsys
    )
    assert code == 0, err
    saved = first / "config.toml"
    assert "max_steps = 4" in saved.read_text() and "dim = 32" in saved.read_text()

    again = tmp_path / "again"
    code, _, err = run_cli(["--config", saved, "--out", again], capsys)
    assert code == 0, err
    for kind, key in (("train", "loss"), ("eval", "val_loss")):  # the same run, bit for bit
        assert [m[key] for m in read_metrics(again, kind)] == [m[key] for m in read_metrics(first, kind)]

    shorter = tmp_path / "shorter"
    code, out, err = run_cli(["--config", saved, "--out", shorter, "--max-steps", 2], capsys)
    assert code == 0, err
    assert "done: 2 steps" in out
    state = json.loads((shorter / "step-0000002" / "trainer_state.json").read_text())
    assert state["model_args"]["dim"] == 32 and state["train_config"]["max_steps"] == 2


def test_vocab_size_flag_sizes_the_tokenizer_trained_for_the_run(
    corpus_dir, tokenizer_path, tmp_path, capsys
):
    """--vocab-size is TrainConfig's (the tokenizer's), although ModelArgs has a vocab_size field too."""
    from llama_mini.tokenizer import Tokenizer

    flags = cli_flags(corpus_dir, tokenizer_path, out=tmp_path / "v", max_steps=1)
    flags = flags[: flags.index("--tokenizer")] + flags[flags.index("--tokenizer") + 2 :]  # train one
    code, _, err = run_cli([*flags, "--vocab-size", 300], capsys)
    assert code == 0, err
    assert Tokenizer(tmp_path / "v" / "tokenizer.model").vocab_size == 300
    state = json.loads((tmp_path / "v" / "step-0000001" / "trainer_state.json").read_text())
    assert state["model_args"]["vocab_size"] == 300 and state["train_config"]["vocab_size"] == 300


def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[model]\ndimm = 3\n")
    code, out, err = run_cli(["--config", tmp_path / "bad.toml", "--out", tmp_path / "o"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: --config ") and "unknown setting(s) 'dimm' in [model]" in err
    assert err.count("\n") == 1


def test_train_help_lists_every_setting_with_its_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per flag: argparse wraps to the terminal's width
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for name, default in (("--max-steps", 500), ("--dim", 192), ("--ffn", "swiglu"), ("--dtype", "auto")):
        assert name in out and f"(default: {default})" in out
    assert "{relu,gelu,swish,glu,bilinear,reglu,geglu,swiglu}" in out
    assert "--config FILE" in out and "--no-compile" in out


if sys.version_info < (3, 11):  # the fallback parser for Python 3.10 is tomli, a declared dependency

    def test_tomli_is_available_on_python_3_10():
        import tomli  # noqa: F401
