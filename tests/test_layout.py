"""The package's shape: no import cycles, a light `import llama_mini`, one home per setting, the model's
forward free of speed settings."""

import ast
import dataclasses
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llama_mini.eval.command import EvalConfig
from llama_mini.generation.sampling import SamplingConfig
from llama_mini.generation.steps import DecodeOptions
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Attention, Transformer
from llama_mini.runtime import RuntimeSettings
from llama_mini.study.ablate import AblationConfig
from llama_mini.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "llama_mini"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The llama_mini modules `path` imports, anywhere in it (functions included, type-checking blocks
    excluded): `from a.b import c` names module a.b.c if there is one, else a.b."""
    tree = ast.parse(path.read_text())
    type_checking = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    ]
    skipped = {id(child) for block in type_checking for child in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of `graph` closes, as the path around it."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "llama_mini.model.transformer" in graph["llama_mini.checkpoint.io"]  # the graph was read
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The check above can fail: two modules that import each other, even inside a function, are found."""
    (tmp_path / "a.py").write_text("from llama_mini import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import llama_mini.a\n")
    modules = {"llama_mini.a", "llama_mini.b"}
    graph = {"llama_mini.a": imported_modules(tmp_path / "a.py", modules)}
    graph["llama_mini.b"] = imported_modules(tmp_path / "b.py", modules)
    assert find_cycles(graph) == [["llama_mini.a", "llama_mini.b", "llama_mini.a"]]


# The rooms of the house, lowest floor first: a module imports only from its own floor and those below, so
# each floor can be read without the ones above it (the model without checkpoints, generation without the
# trainer). The top floor is the package root and the commands that join the rooms.
FLOORS = [
    {"errors", "files", "settings", "console", "runtime"},
    {"model"},
    {"ops"},
    {"tokenizer"},
    {"data"},
    {"checkpoint"},
    {"generation"},
    {"eval"},
    {"train"},
    {"serve"},
    {"study"},
]
TOP = {"convert", "cli", "plots", "ablate", "launch", "__main__"}  # the commands that join the rooms


def floor_of(module: str) -> int:
    """A module's floor: its room's, except that every command line (a room's command.py) stands on the top
    floor with the others, since a command may join several rooms (`llama-mini eval` reads a run folder)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in TOP or parts[-1] == "command":
        return len(FLOORS)  # llama_mini/__init__.py, the front door, and the commands: above every room
    return next(i for i, rooms in enumerate(FLOORS) if parts[1] in rooms)


def arrows_up(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if floor_of(target) > floor_of(module) and not same_room(module, target)
    ]


def same_room(module: str, target: str) -> bool:
    """Files of one room (package) may import each other: the floors order the rooms."""
    return len(module.split(".")) > 2 and module.split(".")[1] == target.split(".")[1]


def test_no_module_imports_from_a_room_above_its_own():
    """The model reads no files (it imports nothing from checkpoint/), the trainer is not imported by the
    generation loop, and so on: every import points down the house (or along a floor)."""
    graph = import_graph()
    assert all(floor_of(module) is not None for module in graph)  # every module has a room (StopIteration)
    assert not any(
        target.startswith("llama_mini.checkpoint") for target in graph["llama_mini.model.transformer"]
    )
    assert arrows_up(graph) == []


def test_the_floor_check_finds_an_arrow_up():
    """The check above can fail: the model importing the checkpoint code is an arrow running up."""
    graph = {"llama_mini.model.transformer": {"llama_mini.checkpoint.io"}, "llama_mini.checkpoint.io": set()}
    assert arrows_up(graph) == ["llama_mini.model.transformer -> llama_mini.checkpoint.io"]


def test_import_llama_mini_loads_no_triton_no_training_stack_and_no_checkpoint_code():
    code = (
        "import sys, llama_mini; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or m.startswith('llama_mini.ops.k') "
        "or m.startswith(('llama_mini.train', 'llama_mini.checkpoint'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"


SETTINGS_CLASSES = [
    ModelArgs,
    TrainConfig,
    SamplingConfig,
    DecodeOptions,
    RuntimeSettings,
    AblationConfig,
    EvalConfig,
]


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda cls: cls.__name__)
def test_every_command_line_setting_has_its_help_text(cls):
    for field in dataclasses.fields(cls):
        if field.metadata.get("flag", True):
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"


def test_each_settings_help_text_is_written_once_in_the_code():
    """No copy of a setting's help text anywhere else (the old help dicts of train.py, say): every string
    literal of the package and scripts is counted (the parser joins adjacent literals into one)."""
    sources = [*PACKAGE.rglob("*.py"), REPO / "train.py", REPO / "generate.py"]
    literals = [
        node.value
        for path in sources
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    checked = 0
    for cls in SETTINGS_CLASSES:
        for field in dataclasses.fields(cls):
            text = field.metadata.get("help", "")
            if text and text in literals:  # (a help text built from parts is not one literal)
                assert literals.count(text) == 1, f"{cls.__name__}.{field.name}: {text!r}"
                checked += 1
    assert checked > 40


def test_forward_and_attention_read_as_their_formulas():
    """No branch on a speed setting in the two forward passes a student reads first, and each fits on a
    screen; the training loss, fused kernels and compilation live in llama_mini/ops."""
    for function in (Transformer.forward, Transformer.hidden_states, Attention.forward):
        definition = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
        assert definition.end_lineno - definition.lineno < 40, function.__qualname__
        body = (
            definition.body[1:] if isinstance(definition.body[0], ast.Expr) else definition.body
        )  # no docstring
        code = "\n".join(ast.unparse(statement) for statement in body)
        for speed_setting in ("chunk", "kernel", "compile", "targets", "isinstance"):
            assert speed_setting not in code, (function.__qualname__, speed_setting)


def test_weights_meet_a_built_model_in_one_place():
    """Only llama_mini.checkpoint.io.assign_weights calls load_state_dict(..., assign=True): loading a file,
    gathering FSDP's pieces and merging LoRA all go through it (re-tying the embeddings, RoPE's table)."""
    callers = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and any(keyword.arg == "assign" for keyword in node.keywords)
        and ast.unparse(node.func).endswith("load_state_dict")
    ]
    assert len(callers) == 1 and callers[0].startswith("llama_mini/checkpoint/io.py"), callers
