"""One home per setting: a dataclass field carries its default, its help text and its choices.

Every setting of llama_mini (the model's `ModelArgs`, training's `TrainConfig`, generation's
`SamplingConfig`, the ablation's `AblationConfig`) is a dataclass field declared with `setting(...)`:

    width: int = setting(192, "how wide the thing is")
    kind: Literal["plain", "fancy"] = setting("plain", "which kind of thing")

The default is the field's default, the help text lives in the field's metadata, and a `Literal` type
names the allowed values. From those definitions alone this module makes

    - the command-line flags (`add_flags`: `--width`, `--kind {plain,fancy}`, `--no-compile`, ...),
    - the check of choices (`choice_problems`, called by each dataclass's validation),
    - strict construction from saved or written settings (`from_dict`: an unknown key is an error that names
      it, so a renamed field never vanishes silently on resume), and
    - configuration files (`read_config_file` / `write_config_file`: TOML, one table per dataclass, each
      value checked against its field's type: `type_problem`),

so a setting's help text, default and choices are written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

from llama_mini.errors import ConfigError
from llama_mini.files import atomic_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomllib's predecessor, the same parser under another name
    import tomli as tomllib

__all__ = [
    "add_flags",
    "choice_problems",
    "choices",
    "from_dict",
    "help_text",
    "read_config_file",
    "setting",
    "type_problem",
    "write_config_file",
]

T = TypeVar("T")


def setting(
    default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable | None = None, flag: bool = True
) -> Any:
    """A dataclass field with its help text. `factory` builds a mutable default (a list, a dict);
    `flag=False` keeps the field off the command line (settings set by code or by a config file only)."""
    metadata = {"help": help, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_text(cls: type, name: str) -> str:
    """The help text of setting `name` of `cls`."""
    return next(field for field in dataclasses.fields(cls) if field.name == name).metadata.get("help", "")


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _without_none(kind: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True  # a union of several types has no one parser
    return kind, False


def choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The values a `Literal[...]` setting (or each item of a `list[Literal[...]]` one) allows; None for a
    free setting."""
    kind, _ = _without_none(_type_of(cls, name))
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def _fits(value: Any, kind: Any) -> bool:
    """Whether `value`, as a TOML file spells it, is a value of type `kind` (an int is a float too)."""
    kind, nullable = _without_none(kind)
    if value is None or kind is Any:
        return nullable or kind is Any
    origin = typing.get_origin(kind)
    if origin is Literal:
        return value in typing.get_args(kind)
    if origin in (list, tuple):
        items = typing.get_args(kind)
        return isinstance(value, (list, tuple)) and all(_fits(item, items[0]) for item in value)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(kind))
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _type_name(kind: Any) -> str:
    kind, nullable = _without_none(kind)
    origin = typing.get_origin(kind)
    if origin is Literal:
        name = "one of " + ", ".join(map(repr, typing.get_args(kind)))
    elif origin in (list, tuple):
        name = f"a list of {_type_name(typing.get_args(kind)[0])}"
    elif origin in (typing.Union, types.UnionType):
        name = " or ".join(_type_name(option) for option in typing.get_args(kind))
    else:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
            kind, getattr(kind, "__name__", str(kind))
        )
    return name + (" (or left out for none)" if nullable else "")


def type_problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with `value` for setting `name` of `cls` as a config file wrote it, or None."""
    kind = _type_of(cls, name)
    if _fits(value, kind):
        return None
    return f"{name} = {value!r} must be {_type_name(kind)}"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def choice_problems(settings: Any) -> list[str]:
    """One message per field of `settings` whose value is not among its Literal choices."""
    problems = []
    for field in dataclasses.fields(settings):
        allowed = choices(type(settings), field.name)
        if allowed is None:
            continue
        value = getattr(settings, field.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        wrong = [item for item in values if item is not None and item not in allowed]
        if wrong:
            shown = wrong[0] if len(values) == 1 and not isinstance(value, (list, tuple)) else wrong
            problems.append(
                f"{flag_name(field.name)} must be one of {', '.join(map(str, allowed))}, got {shown!r}"
            )
    return problems


def from_dict(cls: type[T], values: dict[str, Any], where: str = "settings") -> T:
    """Build `cls` from a dict (a saved config, a config file's table); an unknown key is a ConfigError
    naming it, never silently dropped."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table of settings, got {type(values).__name__}")
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(map(repr, unknown))} in {where}; known: {', '.join(known)}"
        )
    return cls(**values)


# ---------------------------------------------------------------------------------------------------------
# Command-line flags
# ---------------------------------------------------------------------------------------------------------


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_or_none(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse names it in its messages
    return parse_or_none


def _parser_for(kind: Any) -> Callable[[str], Any] | None:
    """How to read one command-line value of type `kind` (None: a type with no flag form)."""
    if typing.get_origin(kind) is Literal:
        return type(typing.get_args(kind)[0])
    if kind in (int, float, str):
        return kind
    return None


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: Any = None,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Add one flag per setting of `cls` (dashes for underscores); return the field names added.

    Flags not given stay out of the parsed namespace (argparse.SUPPRESS), so callers can tell an explicit
    choice from a default. `defaults` (an instance of `cls`) supplies the defaults shown in the help;
    `only` / `exclude` pick the fields. bool settings get --x / --no-x; `X | None` settings accept "none";
    list settings take one or more values, and their flag may be repeated; settings with no command-line
    form (dicts) are skipped.
    """
    defaults = defaults if defaults is not None else cls()
    wanted = set(only) if only is not None else None
    added = []
    for field in dataclasses.fields(cls):
        if not field.metadata.get("flag", True) or field.name in exclude:
            continue
        if wanted is not None and field.name not in wanted:
            continue
        kind, nullable = _without_none(_type_of(cls, field.name))
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            # `X | list[X]` (one value, or several): the flag takes one or more, as a list setting's does
            kind = next((arg for arg in typing.get_args(kind) if typing.get_origin(arg) is list), kind)
        default = getattr(defaults, field.name)
        options: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "help": f"{field.metadata.get('help', '')} (default: {_shown(default)})",
        }
        if kind is bool:
            parser.add_argument(flag_name(field.name), action=argparse.BooleanOptionalAction, **options)
            added.append(field.name)
            continue
        allowed = choices(cls, field.name)
        if typing.get_origin(kind) is list:
            # one or more values, and the flag may be repeated: `--x a b` and `--x a --x b` give [a, b]
            options.update(nargs="+", action="extend", type=_parser_for(typing.get_args(kind)[0]))
        else:
            parse = _parser_for(kind)
            if parse is None:
                continue
            options["type"] = _optional(parse) if nullable else parse
        if allowed is not None:
            options["choices"] = list(allowed)  # shown as {a,b,...} in the usage and help
        else:
            options["metavar"] = field.name.upper()
        parser.add_argument(flag_name(field.name), **options)
        added.append(field.name)
    return added


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# Configuration files (TOML)
# ---------------------------------------------------------------------------------------------------------


def read_config_file(path: str | Path, tables: dict[str, type]) -> dict[str, dict[str, Any]]:
    """The tables of a TOML configuration file, e.g. {"train": {...}, "model": {...}}.

    `tables` maps each allowed table name to its settings class; an unknown table or key, or a value of the
    wrong type (a string for a number, 20.7 for a number of steps), is a ConfigError naming it and the file;
    ranges and combinations are checked when the caller builds its settings.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigError(
            f"cannot read --config {path} ({error.strerror or error}); check the path"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path} is not valid TOML ({error}); fix the file") from None
    unknown_tables = sorted(set(document) - set(tables))
    if unknown_tables:
        raise ConfigError(
            f"--config {path}: unknown table or key {', '.join(map(repr, unknown_tables))} at the top level; "
            f"settings go in the tables {', '.join(f'[{name}]' for name in tables)}"
        )
    result = {}
    for name, cls in tables.items():
        values = document.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"--config {path}: {name} must be a table ([{name}]), not a value")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"--config {path}: unknown setting(s) {', '.join(map(repr, unknown))} in [{name}]; "
                f"known: {', '.join(sorted(known))}"
            )
        for key, value in values.items():
            problem = type_problem(cls, key, value)
            if problem:
                raise ConfigError(f"--config {path}: [{name}] {problem}; fix the file")
        result[name] = dict(values)
    return result


def write_config_file(
    path: str | Path,
    tables: dict[str, dict[str, Any]],
    header: str = "",
    derived: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write `tables` (name -> settings dict) as TOML that `read_config_file` reads back to the same values.

    TOML has no null: a setting whose value is None is written as a comment, and reads back as its default,
    which is None for every such setting. `derived` (table -> name -> value) gives the values that None
    stands for where the settings derive them from others: shown in that comment, marked "(derived)".
    Written by hand rather than with a TOML writer package: the values are only strings, numbers, booleans,
    lists of them and one level of inline tables, which JSON's escaping already spells as valid TOML (a test
    reads every written file back with tomllib).
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, values in tables.items():
        lines += ["", f"[{name}]"]
        for key, value in values.items():
            if value is None and key in (derived or {}).get(name, {}):
                lines.append(f"# {key} = {_toml_value(derived[name][key])}  (derived)")
            elif value is None:
                lines.append(f"# {key} = (none)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    with atomic_file(path) as file:
        file.write(("\n".join(lines) + "\n").encode("utf-8"))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to TOML")
