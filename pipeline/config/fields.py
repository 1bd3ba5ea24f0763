"""The typed-config machinery every stage shares: fields with their help and valid range,
coercion of YAML and command-line values, one option per field, generic validation.

A config class is a dataclass whose fields are made with `opt(default, help, bounds=...,
choices=..., nonempty=...)`; it is either flat (a stage's options: `PrepareConfig`,
`EvaluateConfig`, one `--field` each) or made of sections (the training `Config`:
`--section.field`). `build_config` resolves dataclass defaults <- preset <- command line,
then `validate` checks every field against its declared range and calls the class's own
`check()` for rules that relate several fields. Torch-free: `pipeline prepare` imports it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..utils import PipelineError


# ---------------------------------------------------------------- declared ranges

@dataclass(frozen=True)
class Bounds:
    """An interval written as in mathematics: "[0, 1)", "(0, inf)", "[1, inf)".

    NaN lies in no interval, and an open end at infinity keeps infinities out, so
    "(0, inf)" also means "finite"."""
    low: float
    high: float
    low_open: bool
    high_open: bool

    _SYNTAX = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])$")

    @classmethod
    def parse(cls, text: str) -> "Bounds":
        match = cls._SYNTAX.match(text)
        if not match:
            raise ValueError(f"bounds {text!r}: write an interval such as '[0, 1)' or '(0, inf)'")
        left, low, high, right = match.groups()
        return cls(float(low), float(high), left == "(", right == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)', 'a finite number': what the value must be."""
        low, high = _number(self.low), _number(self.high)
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low == -math.inf:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(int(value)) if float(value).is_integer() else repr(value)


@dataclass(frozen=True)
class Rule:
    """What a field declares beyond its type. For lists and tuples, `bounds` and
    `choices` apply to every element and `nonempty` to the list itself."""
    bounds: Bounds | None = None
    choices: tuple | None = None
    nonempty: bool = False


def opt(default: Any, help: str, *, bounds: str | None = None, choices: tuple | None = None,
        nonempty: bool = False) -> Any:
    """A config field with its `--help` text and its valid values (lists are copied per
    instance). `bounds` is an interval ("[0, 1)"), `choices` the allowed values,
    `nonempty` refuses "" and []."""
    rule = Rule(Bounds.parse(bounds) if bounds else None,
                tuple(choices) if choices is not None else None, nonempty)
    metadata = {"help": help, "rule": rule}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def sections(cls: type) -> Iterator[tuple[str, type]]:
    """(name, dataclass) of every section of config class `cls`, in order: the fields
    whose type is itself a dataclass (`Config.model`, `Config.optim`, ...)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield f.name, hints[f.name]


def config_fields(cls: type | None = None) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, type hint) of every value field of config class `cls` (the
    training `Config` by default): `section.field` inside sections, `field` at the top
    level of a flat stage config (`PrepareConfig`, `EvaluateConfig`)."""
    cls = cls or _training_config()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            inner = typing.get_type_hints(hints[f.name])
            for g in dataclasses.fields(hints[f.name]):
                yield f"{f.name}.{g.name}", g, inner[g.name]
        else:
            yield f.name, f, hints[f.name]


def _training_config() -> type:
    from .sections import Config  # the default of every generic function here

    return Config


def get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0], True
    return hint, False


def element_type(hint: Any) -> Any:
    """The scalar type of a field: its own, or that of its list/tuple elements."""
    inner, _ = unwrap_optional(hint)
    if typing.get_origin(inner) in (list, tuple):
        args = typing.get_args(inner)
        return args[0] if args else str
    return inner


# ---------------------------------------------------------------- dict <-> dataclass

class FieldValueError(PipelineError):
    """A value that cannot become its field's type; `where` is e.g. 'config.train.seed'."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where} {problem}")
        self.where, self.problem = where, problem


def from_dict(cls, data: dict[str, Any] | None, where: str = "config"):
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys are an error,
    old names of renamed fields (`cls.RENAMED`) are read as their current ones."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise PipelineError(f"{where} must be a mapping of field: value, got {data!r}")
    data = current_names(cls, data, where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise PipelineError(f"unknown field(s) {', '.join(unknown)} in {where}; "
                            f"valid fields: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    return cls(**kwargs)


def current_names(cls, data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """`data` with the old spelling of every renamed field of `cls` and of its sections
    (a config class's `RENAMED = {old: new}`) replaced by the current one. Both spellings
    with different values in the same mapping is an error naming both."""
    if not isinstance(data, dict):
        return data  # from_dict says what is wrong with it
    out = dict(data)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in out and out[new] != value:
            raise PipelineError(f"{where} sets both {old} and {new} ({old} is the old name of "
                                f"{new}); keep only {new}")
        out[new] = value
    for name, section in sections(cls):
        if isinstance(out.get(name), dict):
            out[name] = current_names(section, out[name], f"{where}.{name}")
    return out


def renamed_options(cls: type) -> dict[str, list[str]]:
    """Current dotted field -> its old dotted spellings, over `cls` and its sections."""
    pairs = [(old, new) for old, new in getattr(cls, "RENAMED", {}).items()]
    pairs += [(f"{name}.{old}", f"{name}.{new}") for name, section in sections(cls)
              for old, new in getattr(section, "RENAMED", {}).items()]
    out: dict[str, list[str]] = {}
    for old, new in pairs:
        out.setdefault(new, []).append(old)
    return out


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce YAML/CLI values to the field type (lists from "a,b" strings, tuples from
    lists, ints to floats...). Ranges are `validate`'s business, not this one's."""
    inner, _optional = unwrap_optional(hint)
    if value is None:
        return None  # only optional fields may be unset: validate says so otherwise
    if typing.get_origin(inner) in (list, tuple):
        if isinstance(value, str):
            value = _split_list(value, where)
        if not isinstance(value, (list, tuple)):
            raise FieldValueError(where, f"expects a list, got {value!r}")
        out = [_coerce(v, element_type(inner), where) for v in value]
        return tuple(out) if typing.get_origin(inner) is tuple else out
    return _coerce_scalar(value, inner, where)


def _split_list(text: str, where: str) -> list[Any]:
    """A list typed as text: `8,5,5,5`, `8 5 5 5`, or `[8, 5, 5, 5]` (YAML/JSON, the form
    --help shows defaults in). The elements stay strings, coerced like any typed value."""
    if not text.lstrip().startswith("["):
        return [v for v in text.replace(",", " ").split() if v]
    try:
        # BaseLoader: every scalar a string, so `[yes]` is the word, not a boolean.
        value = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, list):
        raise FieldValueError(where, f"expects a list such as [8, 5, 5] or 8,5,5, got {text!r}")
    return value


def format_value(value: Any) -> str:
    """A value as the command line takes it back: lists and tuples in YAML flow form
    (`[8, 8, 8, 6, 5]`), anything else as str()."""
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(_plain(value), default_flow_style=True, width=math.inf).strip()
    return str(value)


def _coerce_scalar(value: Any, hint: Any, where: str) -> Any:
    wanted = {bool: "true or false", int: "int", float: "float", str: "a string"}.get(hint)
    if wanted is None:
        return value
    refused = FieldValueError(where, f"expects {wanted}, got {value!r}")
    if isinstance(value, (dict, list, tuple)):
        raise refused
    if hint is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise refused
    if isinstance(value, bool):  # YAML's `yes` is no number and no name
        raise refused
    try:
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value.strip()) if isinstance(value, str) else int(value)
        if hint is float:
            return float(value)
    except (ValueError, OverflowError):
        raise refused from None
    return str(value)


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A YAML preset: a file path, or a name shipped in pipeline/presets/ (e.g. `vqvae`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        preset = resources.files("pipeline") / "presets" / f"{name_or_path}.yaml"
        if not preset.is_file():
            raise PipelineError(f"config {name_or_path!r} is neither a YAML file nor a preset; "
                                f"presets: {', '.join(list_presets())}")
        text = preset.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PipelineError(f"config {name_or_path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"config {name_or_path} must be a YAML mapping")
    return data


def list_presets() -> list[str]:
    folder = resources.files("pipeline") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def to_yaml(cfg: Any) -> str:
    """Any config dataclass as YAML (tuples as lists), the form `load_preset` reads back."""
    return yaml.safe_dump(_plain(dataclasses.asdict(cfg)), sort_keys=False)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- command line

def add_config_arguments(parser: argparse.ArgumentParser, aliases: dict[str, str],
                         cls: type | None = None,
                         title: str = "config fields (override the preset)") -> None:
    """One `--section.field` (or `--field` for a flat stage config) option per field of
    config class `cls` (the training `Config` by default), plus short aliases.

    `aliases` maps a short flag (e.g. ``--max-steps``) to a dotted path
    (``train.max_steps``). The old spelling of a renamed field (`RENAMED`) is an option
    too. Values are kept as strings and coerced by `from_dict`; defaults are shown in a
    form the option takes back (`format_value`).
    """
    group = parser.add_argument_group(title)
    renamed = renamed_options(cls or _training_config())
    for dotted, f, _hint in config_fields(cls):
        old_spellings = [f"--{old}" for old in renamed.get(dotted, [])]
        flags = [f"--{dotted}"] + [a for a, d in aliases.items() if d == dotted] + old_spellings
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        bounds = f.metadata["rule"].bounds
        valid = f"; {bounds.describe()}" if bounds else ""
        shown = format_value(default)
        group.add_argument(*flags, dest=dotted, default=None, metavar="V",
                           help=f"{text} (default: {shown}{valid})".replace("%", "%%"))


def flat_flag(name: str) -> str:
    """How a user types field `name` of a flat stage config: `batch_size` -> `--batch-size`."""
    return f"--{name.replace('_', '-')}"


def flat_aliases(cls: type) -> dict[str, str]:
    """The hyphenated spelling of every multi-word field of flat config class `cls`
    (`--batch-size` for `batch_size`, beside `--batch_size`)."""
    return {flat_flag(name): name for name, _, _ in config_fields(cls) if "_" in name}


def mark_required(parser: argparse.ArgumentParser, dests: tuple[str, ...]) -> None:
    """Make the options of `dests` required (argparse has no public way to mark an option
    that add_config_arguments added)."""
    for action in parser._actions:
        if action.dest in dests:
            action.required = True


def build_config(preset: str | None, args: argparse.Namespace,
                 defaults: dict[str, Any] | None = None,
                 aliases: dict[str, str] | None = None, cls: type | None = None) -> Any:
    """Dataclass defaults <- `defaults` <- preset <- command-line values, then validate.
    `cls` is the config class (the training `Config` by default); `aliases` (short flag
    -> dotted field; the training ones by default) let messages name the flag typed."""
    cls = cls or _training_config()
    aliases = _training_aliases() if aliases is None else aliases
    # Old spellings become current ones per layer, so a later layer overrides either.
    data = current_names(cls, merge({}, defaults or {}))
    if preset:
        data = merge(data, current_names(cls, load_preset(preset), f"config {preset}"))
    known = {dotted for dotted, _, _ in config_fields(cls)}
    for key, value in vars(args).items():
        if key in known and value is not None:
            set_dotted(data, key, value)
    try:
        cfg = from_dict(cls, data)
    except FieldValueError as e:
        name = OptionName(e.where.removeprefix("config."), aliases)
        raise PipelineError(name.says(e.problem)) from None
    validate(cfg, aliases)
    return cfg


def _training_aliases() -> dict[str, str]:
    from .sections import ALIASES

    return ALIASES


# ---------------------------------------------------------------- validation

@dataclass(frozen=True)
class OptionName:
    """How messages name a field: `--optim.lr` first (what the problem follows), then the
    short flags that set it (`alias_note`); `short` is the flag a user most likely typed."""
    dotted: str
    aliases: dict[str, str] | None = None  # None: the dotted option only

    @property
    def option(self) -> str:
        return f"--{self.dotted}"

    @property
    def flags(self) -> list[str]:
        return [a for a, d in (self.aliases or {}).items() if d == self.dotted]

    @property
    def short(self) -> str:
        return (self.flags or [self.option])[0]

    @property
    def alias_note(self) -> str:
        return f" (alias {', '.join(self.flags)})" if self.flags else ""

    def says(self, problem: str) -> str:
        """'--optim.lr must be > 0, got -1.0 (alias --lr)'."""
        return f"{self.option} {problem}{self.alias_note}"


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def _scalar_problem(value: Any, hint: Any, rule: Rule) -> str | None:
    """What is wrong with one value (a field's, or one element of a list field), as
    'must be ..., got ...'; None when it is valid."""
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint in (int, float):
        kinds = int if hint is int else (int, float)
        if not isinstance(value, kinds) or isinstance(value, bool):
            return f"must be {'an integer' if hint is int else 'a number'}, got {value!r}"
        if rule.bounds is not None and value not in rule.bounds:
            return f"must be {rule.bounds.describe()}, got {value!r}"
    elif hint is str:
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
        if rule.nonempty and not value:
            return "must not be empty"
        if _CONTROL_CHARACTER.search(value):
            return f"must not contain control characters, got {value!r}"
    if rule.choices is not None and value not in rule.choices:
        return f"must be one of {', '.join(map(str, rule.choices))}, got {value!r}"
    return None


def field_problem(value: Any, hint: Any, rule: Rule, name: OptionName) -> str | None:
    """The message for a field value outside what its type and `rule` allow, else None."""
    inner, optional = unwrap_optional(hint)
    if value is None:
        return None if optional else name.says("must be set, got null")
    container = typing.get_origin(inner)
    if container not in (list, tuple):
        if rule.choices is not None and isinstance(value, str) and value not in rule.choices:
            also = f" (option {name.option})" if name.short != name.option else ""
            return (f"unknown {name.short} {value!r}; choose one of "
                    f"{', '.join(map(str, rule.choices))}{also}")
        problem = _scalar_problem(value, inner, rule)
        return name.says(problem) if problem else None
    if not isinstance(value, (list, tuple)):
        return name.says(f"must be a list, got {value!r}")
    args = typing.get_args(inner)
    if container is tuple and Ellipsis not in args and len(value) != len(args):
        return name.says(f"needs exactly {len(args)} values, got {len(value)}: {list(value)}")
    if rule.nonempty and not value:
        return name.says("must not be empty")
    element_rule = dataclasses.replace(rule, nonempty=element_type(inner) is str)
    for item in value:
        problem = _scalar_problem(item, element_type(inner), element_rule)
        if problem:
            return name.says(f"{list(value)}: each value {problem}")
    return None


def field_problems(cfg: Any, aliases: dict[str, str] | None = None) -> list[str]:
    """One message per field of config `cfg` whose value is outside its declared range."""
    aliases = _training_aliases() if aliases is None else aliases
    problems = []
    for dotted, f, hint in config_fields(type(cfg)):
        value = get_dotted(cfg, dotted)
        problem = field_problem(value, hint, f.metadata["rule"], OptionName(dotted, aliases))
        if problem:
            problems.append(problem)
    return problems


def validate(cfg: Any, aliases: dict[str, str] | None = None) -> None:
    """Catch configs that cannot work before any process starts; say what to change.
    First every field against its declared range, then the rules between fields: the
    config class's own `check()` method, if it has one."""
    problems = field_problems(cfg, aliases)
    if problems:
        raise PipelineError("; ".join(problems))
    check = getattr(cfg, "check", None)
    if callable(check):
        check()


def undeclared_fields(cls: type | None = None) -> list[str]:
    """Numeric fields (or lists of numbers) that declare neither bounds nor choices.
    Strings and booleans are covered by their type."""
    return [dotted for dotted, f, hint in config_fields(cls)
            if element_type(hint) in (int, float)
            and f.metadata["rule"].bounds is None and f.metadata["rule"].choices is None]


def require_declared(cls: type) -> type:
    """Class decorator of every config class: a numeric field without its declared range
    is a bug, caught when the module is imported rather than when a user hits it."""
    missing = undeclared_fields(cls) if _has_values(cls) else []
    if missing:
        raise TypeError(f"{cls.__name__}: fields without a declared range: {', '.join(missing)}")
    return cls


def _has_values(cls: type) -> bool:
    return any(True for _ in config_fields(cls))
