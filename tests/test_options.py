"""Config dataclasses define the CLI: fast_sae.options turns fields into click options and back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fast_sae.options import build, click_options, from_options, option_values, parse_list, setting


@dataclass
class Inner:
    enabled: bool = setting(False, flag="inner", help="Switch the inner part on.")
    size: int = setting(3, help="Inner size.")
    hidden_value: str = setting("x", cli=False, help="Set by code.")


@dataclass
class Outer:
    out: Path = setting(short="-o", help="Where.")
    layers: list[int] = setting(default_factory=lambda: [3, 15], help="Layers.")
    rates: tuple[float, ...] = setting((0.5, 1.0), help="Rates.")
    mode: str = setting("a", choices=("a", "b"), help="Mode.")
    limit: int | None = setting(None, help="Limit.")
    progress: bool = setting(True, help="Progress.")
    inner: Inner = setting(default_factory=Inner, prefix="in-", help="Inner part.")


def _command(overrides: bool = False) -> click.Command:
    @click.command()
    @click_options(Outer, overrides=overrides)
    def cmd(**params):
        cfg = from_options(Outer, params) if not overrides else option_values(Outer, params)
        click.echo(repr(cfg))

    return cmd


def test_fields_become_options_with_defaults_and_help() -> None:
    result = CliRunner().invoke(_command(), ["--help"])
    text = result.output
    for flag in ("-o, --out PATH", "--layers N,N,...", "--rates X,X,...", "--mode [a|b]", "--limit INTEGER",
                 "--progress / --no-progress", "--inner / --no-inner", "--in-size INTEGER"):
        assert flag in text, flag
    assert "[default: 3,15]" in text and "[default: 0.5,1]" in text and "hidden-value" not in text


def test_values_round_trip_into_the_dataclass() -> None:
    cmd = _command()
    r = CliRunner().invoke(cmd, ["-o", "x", "--layers", "1, 2,", "--mode", "b", "--no-progress", "--inner",
                                 "--in-size", "7", "--rates", "2"])
    assert r.exit_code == 0, r.output
    expected = Outer(out=Path("x"), layers=[1, 2], rates=(2.0,), mode="b", progress=False,
                     inner=Inner(enabled=True, size=7))
    assert r.output.strip() == repr(expected)
    r = CliRunner().invoke(cmd, ["-o", "x"])
    assert r.output.strip() == repr(Outer(out=Path("x")))


def test_override_mode_reports_only_what_was_given() -> None:
    r = CliRunner().invoke(_command(overrides=True), ["--out", "x", "--in-size", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr({"out": Path("x"), "progress": False, "inner": {"size": 4}})


def test_bad_values_are_one_line_errors() -> None:
    r = CliRunner().invoke(_command(), ["-o", "x", "--layers", "1,two"])
    assert r.exit_code == 2 and "'two' in '1,two': expected a comma-separated list of int" in r.output
    with pytest.raises(click.BadParameter):
        parse_list("1.5", int)
    assert parse_list("a, b,,c", str) == ["a", "b", "c"]


@pytest.mark.parametrize("values, message", [
    ({"out": "x", "layers": ["a"]}, "cfg: layers[0]: expected an integer, got 'a'"),
    ({"out": "x", "limit": 2.5}, "cfg: limit: expected an integer, got 2.5"),
    ({"out": "x", "progress": "yes"}, "cfg: progress: expected true or false"),
    ({"out": "x", "colour": 1}, "cfg: unknown field 'colour'"),
    ({"out": "x", "inner": {"size": "big"}}, "cfg.inner: size: expected an integer"),
])
def test_build_checks_types(values, message) -> None:
    with pytest.raises(ValueError) as err:
        build(Outer, values, where="cfg")
    assert message in str(err.value)


def test_build_accepts_a_scalar_for_a_list_and_ints_for_floats() -> None:
    cfg = build(Outer, {"out": "x", "layers": 5, "rates": [1, 2]})
    assert cfg.layers == [5] and cfg.rates == (1.0, 2.0) and cfg.out == Path("x")


def test_a_field_without_help_is_refused() -> None:
    @dataclass
    class Bad:
        x: int = 1

    with pytest.raises(TypeError, match="Bad.x"):
        click_options(Bad)


def test_to_args_rebuilds_the_same_config() -> None:
    """to_args is from_options' inverse: what the harvest hands to its run in the vLLM venv."""
    from fast_sae.options import to_args

    cfg = Outer(out=Path("x y"), layers=[1, 2], rates=(0.1, 1e-7), mode="b", limit=5, progress=False,
                inner=Inner(enabled=True, size=7))
    args = to_args(cfg)
    assert "--no-progress" in args and "--limit" in args
    r = CliRunner().invoke(_command(), args)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(cfg)
    assert "--limit" not in to_args(Outer(out=Path("x")))  # None stays unset
    assert CliRunner().invoke(_command(), to_args(Outer(out=Path("x")))).output.strip() == repr(Outer(out=Path("x")))

    # a None the command line cannot express (the field's default is not None) is refused, not dropped
    with pytest.raises(ValueError, match="--layers: None"):
        to_args(Outer(out=Path("x"), layers=None))  # type: ignore[arg-type]
