"""Command-line options generated from the config dataclasses: each setting is written once.

Why: a stage's config dataclass is what its code, its tests and its saved run files use; the CLI
is only another way to fill it. Declaring each field with ``setting(default, help=...)`` gives its
type, default and help in one place, and ``click_options(Config)`` turns the fields into click
options (``--field-name``, lists as comma-separated values, booleans as ``--x/--no-x``, nested
config dataclasses under a prefix), so defaults and help cannot drift between the two. The stage
CLIs (harvest, train, evaluate, demo) all go through here, which also keeps flag spellings and
list syntax the same everywhere.

Types understood: int, float, str, bool, pathlib.Path, ``X | None``, ``list[int|float|str]``,
``tuple[float, ...]``, and a nested dataclass (its options get a prefix). Anything else needs a
``parse`` function in the field's metadata.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import click

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_SEP = "__"  # click parameter names of nested fields: "<field>__<subfield>"


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            choices: Sequence[str] | None = None, flag: str | None = None, short: str | None = None,
            cli: bool = True, hidden: bool = False, metavar: str | None = None,
            parse: Callable[[str], Any] | None = None, prefix: str | None = None) -> Any:
    """A dataclass field that is also a command-line option.

    ``flag`` overrides the option name (without ``--``); ``cli=False`` keeps a field out of the CLI
    (set by code, e.g. from another option); ``parse`` converts the option's text for types this
    module does not know; ``prefix`` names the option prefix of a nested config dataclass.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag, "short": short,
            "cli": cli, "hidden": hidden, "metavar": metavar, "parse": parse, "prefix": prefix}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def parse_list(text: str, item: Callable[[str], T], what: str = "value") -> list[T]:
    """'a,b,c' -> [item(a), item(b), item(c)]; empty items are skipped. The one list syntax of the CLI."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(item(part))
        except ValueError:
            name = getattr(item, "__name__", "value")
            raise click.BadParameter(f"{part!r} in {text!r}: expected a comma-separated list of {name} "
                                     f"{what}s") from None
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fmt_default(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _converter(tp: Any, meta: dict[str, Any], flag: str) -> tuple[Any, Callable[[Any], Any] | None]:
    """(click type, converter of the raw click value) for a field type."""
    if meta.get("parse"):
        return str, meta["parse"]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        item = args[0]
        if item not in (int, float, str):
            raise TypeError(f"{flag}: list of {item!r} is not supported")
        make = tuple if origin is tuple else list
        return str, lambda text: make(parse_list(text, item, "number" if item is not str else "name"))
    if meta.get("choices"):
        return click.Choice(meta["choices"]), None
    if tp is Path:
        return click.Path(path_type=Path), None
    if tp in (int, float, str):
        return tp, None
    raise TypeError(f"{flag}: field type {tp!r} needs a parse= function")


def _list_metavar(tp: Any) -> str | None:
    if typing.get_origin(tp) not in (list, tuple):
        return None
    return {int: "N,N,...", float: "X,X,...", str: "A,B,..."}.get(typing.get_args(tp)[0])


@dataclasses.dataclass
class _Opt:
    param: str  # click parameter name (nested: a__b)
    path: tuple[str, ...]  # field names from the top config down
    convert: Callable[[Any], Any] | None
    decorator: Callable[[F], F]
    flag: str = ""  # the option's name without "--"


def _options(cls: type, overrides: bool, exclude: set[str], prefix: str = "",
             path: tuple[str, ...] = ()) -> list[_Opt]:
    hints = typing.get_type_hints(cls)
    out: list[_Opt] = []
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if not meta.get("cli", True) or f.name in exclude or ".".join((*path, f.name)) in exclude:
            continue
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting(..., help=...) or cli=False")
        tp, optional = _unwrap_optional(hints[f.name])
        if _is_config(tp):
            sub = meta.get("prefix")
            nested = sub if sub is not None else f.name.replace("_", "-") + "-"
            out += _options(tp, overrides, exclude, prefix + nested,
                            (*path, f.name))
            continue
        name = meta.get("flag") or prefix + f.name.replace("_", "-")
        param = _SEP.join((*path, f.name))
        default = _field_default(f)
        help_text = meta["help"]
        decls = [f"--{name}", param] if tp is not bool else [f"--{name}/--no-{name}", param]
        if meta.get("short"):
            decls.insert(1, meta["short"])
        kwargs: dict[str, Any] = {"hidden": meta.get("hidden", False)}
        convert = None
        if tp is bool:
            kwargs["default"] = None if overrides else default
        else:
            kwargs["type"], convert = _converter(tp, meta, name)
            metavar = meta.get("metavar") or _list_metavar(tp)
            if metavar:
                kwargs["metavar"] = metavar
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            elif overrides or default is None:
                kwargs["default"] = None
            else:
                kwargs["default"] = default if convert is None and not isinstance(default, Path) else \
                    _fmt_default(default)
        shown = default not in (dataclasses.MISSING, None) and not (isinstance(default, (list, tuple)) and not default)
        if shown and (overrides or tp is bool or convert):
            help_text += f"  [default: {_fmt_default(default) if tp is not bool else ('on' if default else 'off')}]"
        elif shown:
            kwargs["show_default"] = True
        kwargs["help"] = help_text
        out.append(_Opt(param, (*path, f.name), convert, click.option(*decls, **kwargs), name))
    return out


def click_options(cls: type, *, overrides: bool = False, exclude: Sequence[str] = ()) -> Callable[[F], F]:
    """Decorator adding one click option per CLI field of dataclass ``cls`` (nested configs included).

    ``overrides=True``: every option defaults to None ("not given"), for commands that merge the
    command line over a config file; the dataclass default is shown in the help instead.
    """
    opts = _options(cls, overrides, set(exclude))

    def decorate(fn: F) -> F:
        for opt in reversed(opts):
            fn = opt.decorator(fn)
        return fn

    return decorate


def option_values(cls: type, params: dict[str, Any], *, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The parsed values of ``cls``'s options that were given (not None), as a nested dict of field
    names: {"downstream": {"max_sequences": 8}, "device": "cpu"}; removes them from ``params``."""
    values: dict[str, Any] = {}
    for opt in _options(cls, True, set(exclude)):
        if opt.param not in params:
            continue
        raw = params.pop(opt.param)
        if raw is None:
            continue
        value = opt.convert(raw) if opt.convert is not None else raw
        node = values
        for key in opt.path[:-1]:
            node = node.setdefault(key, {})
        node[opt.path[-1]] = value
    return values


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from a command line, a TOML/YAML/JSON file or code) as type ``tp``, or ValueError."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: must not be empty")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        out = [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value


def build(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """An instance of ``cls`` from nested field values (missing fields keep their defaults).

    Values are checked against the field types (ints, floats, strings, booleans, paths and lists of
    them; a scalar given for a list becomes a one-item list); a mismatch or an unknown field is a
    ValueError naming ``where`` and the field.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cast(Any, cls))}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        tp, _ = _unwrap_optional(hints[name])
        if _is_config(tp) and isinstance(value, dict):
            kwargs[name] = build(tp, value, f"{where}.{name}")
        elif _is_config(tp) or fields[name].metadata.get("parse"):
            kwargs[name] = value
        else:
            kwargs[name] = _coerce(value, hints[name], f"{where}: {name}")
    return cls(**kwargs)


def from_options(cls: type[T], params: dict[str, Any], *, exclude: Sequence[str] = (),
                 **fixed: Any) -> T:
    """``build(cls, given options + fixed values)``: what a command does with its click parameters."""
    values = option_values(cls, params, exclude=exclude)
    values.update(fixed)
    return build(cls, values)


def to_args(cfg: Any, *, exclude: Sequence[str] = ()) -> list[str]:
    """The command-line arguments that rebuild ``cfg`` through ``click_options(type(cfg))``: the inverse
    of ``from_options``, for handing a config to the same command in another process (e.g. the harvest
    run inside the vLLM venv). Fields at None are left out (their options then default to None)."""
    def text(v: Any) -> str:
        return repr(v) if isinstance(v, float) else str(v)

    out: list[str] = []
    for opt in _options(type(cfg), True, set(exclude)):
        value: Any = cfg
        node: Any = type(cfg)
        for key in opt.path:
            field = {f.name: f for f in dataclasses.fields(node)}[key]
            node = _unwrap_optional(typing.get_type_hints(node)[key])[0]
            value = getattr(value, key)
        if value is None:
            if _field_default(field) is not None:  # the command line cannot say None for this field
                raise ValueError(f"--{opt.flag}: None (the default is {_field_default(field)!r}) cannot be given "
                                 f"on the command line")
            continue
        if isinstance(value, bool):
            out.append(f"--{opt.flag}" if value else f"--no-{opt.flag}")
        elif isinstance(value, (list, tuple)):
            if any("," in text(v) for v in value):
                raise ValueError(f"--{opt.flag}: {value!r} cannot be written as a comma-separated list")
            out += [f"--{opt.flag}", ",".join(text(v) for v in value)]
        else:
            out += [f"--{opt.flag}", text(value)]
    return out
