"""`llama-mini`: one command with a subcommand per job, one error convention, and the old entry points
(`python train.py`, `python -m llama_mini.X`) still working."""

import importlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_mini import cli

REPO = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_pyproject_installs_the_llama_mini_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["llama-mini"].partition(":")
    assert getattr(importlib.import_module(module), function) is cli.main


def test_no_command_prints_the_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ("train", "generate", "convert", "inspect", "plots", "ablate"):
        assert f"  {name} " in out


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: unknown command 'trian'; choose one of: train, generate")
        and err.count("\n") == 1
    )


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_answers_help_under_its_own_name(name, capsys):
    assert cli.main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: llama-mini {name} ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--max-steps", "ten"],
            "error: argument --max-steps: invalid int value: 'ten' (see --help)",
        ),
        (["generate", "--checkpoint", "/no/such/folder"], "error: checkpoint /no/such/folder does not exist"),
        (["convert", "/no/such/folder", "/tmp/x"], "error: checkpoint folder /no/such/folder does not exist"),
        (["inspect", "--preset", "llama9"], "error: unknown preset 'llama9'; choose one of: tiny, "),
        (["plots", "glu"], "error: the following arguments are required: --out (see --help)"),
        (["ablate", "--variants", "tanh"], "error: argument --variants: invalid choice: 'tanh'"),
    ],
)
def test_every_command_reports_a_mistake_as_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    [
        ["train.py"],
        ["generate.py"],
        ["-m", "llama_mini"],
        ["-m", "llama_mini.convert"],
        ["-m", "llama_mini", "inspect"],
        ["-m", "llama_mini.plots"],
        ["-m", "llama_mini.ablate"],
    ],
)
def test_the_scripts_and_python_m_entry_points_still_run(command):
    result = subprocess.run(
        [sys.executable, *command, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_ctrl_c_while_the_script_is_still_loading_exits_130_without_a_traceback(script):
    process = subprocess.Popen(
        [sys.executable, script, "--help"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # importing torch takes longer than this: the signal lands during the imports
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode in (130, 0), err  # 0: the imports had already finished and --help printed
    assert "Traceback" not in err


REQUIRED_ARGUMENTS = {
    "generate": ["--checkpoint", "x"],
    "convert": ["src", "dst"],
    "inspect": ["--preset", "tiny"],
    "plots": ["--out", "x", "--runs", "x"],
}


def long_flags(help_text: str) -> list[str]:
    return sorted(set(re.findall(r"(--[a-z][a-z0-9-]{3,})", help_text)))


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_refuses_a_prefix_of_its_flags(name, capsys):
    """A flag means one thing: argparse's default would read `--max-step 5` as `--max-steps 5`, so adding a
    flag could change what an old command line means. Every command refuses each prefix."""
    command = [name, "training"] if name == "plots" else [name]  # plots' flags belong to its subcommands
    required = REQUIRED_ARGUMENTS.get(name, [])  # argparse reports missing ones before unknown ones
    script = ["train.py"] if name == "torchrun" else []  # torchrun's flags come before the script
    assert cli.main([*command, "--help"]) == 0
    flags = long_flags(capsys.readouterr().out)
    assert len(flags) >= 2, flags
    for flag in flags:
        prefix = flag[:-1]
        if prefix in flags or prefix.endswith("-"):
            continue
        code = cli.main([*command, *required, prefix, "1", *script])
        assert code == 2, f"{name} accepted {prefix} for {flag}"
        assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err


def test_train_reads_no_abbreviation_of_log_interval(capsys):
    assert cli.main(["train", "--log-int", "5"]) == 2
    assert "unrecognized arguments: --log-int 5" in capsys.readouterr().err


def test_no_runnable_module_sits_beside_a_module_named_like_the_standard_library():
    """`python llama_mini/X.py` puts X's folder first on sys.path: a llama_mini/inspect.py beside it would
    then be imported as `inspect` by torch itself. So no module or package in a folder holding a script
    (a module with a `__main__` block) is named like a standard library module."""
    package = REPO / "llama_mini"
    folders = {path.parent for path in package.rglob("*.py") if '__name__ == "__main__"' in path.read_text()}
    assert package in folders and package / "study" in folders  # cli.py and inspector.py are scripts
    names = {
        path.stem for folder in folders for path in folder.iterdir() if path.suffix == ".py" or path.is_dir()
    }
    assert "cli" in names and "plots" in names
    assert names & sys.stdlib_module_names == set()
