"""Every `authproxy serve` setting, declared once: its flag, its `AUTHPROXY_*` variable,
its default and its help. The flags, `--help`, the `ServeConfig` they make and the
README's flag table (`markdown_table`, checked by a test) all come from `SERVE`.

A default is the `ServeConfig` field's own default (`runtime/config.py`), so it is written
in one place; a setting that is not part of `ServeConfig` (logging) declares its own.
Every flag has the variable `AUTHPROXY_<FLAG>` (dashes become underscores; a `--no-X`
switch reads `AUTHPROXY_X=false`); repeatable flags take a comma-separated list there.
Flags win over the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from authproxy.keys.sources import FetchSettings
from authproxy.policy.values import parse_duration
from authproxy.runtime.config import ServeConfig

ENV_PREFIX = "AUTHPROXY_"
#: Kinds of setting: a value, a repeatable value, a switch that turns something on, and a
#: `--no-X` switch that turns off something on by default.
VALUE, LIST, ON, OFF = "value", "list", "on", "off"
_UNSET = object()


def env(variable: str) -> str | None:
    return os.environ.get(variable) or None


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper()


def env_list(variable: str) -> list[str]:
    value = env(variable)
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def env_bool(variable: str, default: bool) -> bool:
    value = env(variable)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


def duration(value: str) -> float:
    """A positive duration (`500ms`, `1s`, `30d`, ...); argparse turns ValueError into a
    usage error."""
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0:
        raise ValueError(value)
    return seconds


duration.__name__ = "duration"  # argparse names the type in its error message


def count(value: str) -> int:
    """A whole number >= 1 (argparse turns ValueError into a usage error)."""
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}")
    return number


def admin_address(value: str) -> str:
    return f"127.0.0.1:{value}" if value.isdigit() else value


@dataclass(frozen=True)
class Setting:
    flag: str
    #: The `ServeConfig` field it sets (`jwks_fetch.timeout`: a `FetchSettings` field), or
    #: None for a setting of the command itself (then `default` is given).
    field: str | None
    help: str
    metavar: str | None = None
    kind: str = VALUE
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    default: Any = _UNSET
    #: How the default reads in `--help` and the README, when its value says too little.
    shown: str | None = None
    #: More for the README's table (links, details) after `help`.
    more: str = ""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def variable(self) -> str:
        """Its environment variable (a `--no-X` switch's is X's)."""
        return env_name(self.flag.replace("--no-", "--"))

    @property
    def env(self) -> str:
        """The variable as `--help` and the README show it (`X=false` for `--no-X`)."""
        return self.variable + ("=false" if self.kind == OFF else "")

    def default_value(self) -> Any:
        if self.default is not _UNSET:
            return self.default
        assert self.field is not None
        owner: Any = ServeConfig
        name = self.field
        if name.startswith("jwks_fetch."):
            owner, name = FetchSettings, name.partition(".")[2]
        spec = {f.name: f for f in dataclasses.fields(owner)}[name]
        if spec.default is not dataclasses.MISSING:
            return spec.default
        if spec.default_factory is not dataclasses.MISSING:
            return spec.default_factory()
        return None

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        value = self.default_value()
        if self.kind in (ON, OFF) or value is None or value in ([], ""):
            return "—"
        if self.parse is duration:
            return _duration_text(value)
        return str(value)


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds}s"


def _one_of(choices: tuple[str, ...], parse: Callable[[str], Any] | None) -> Callable[[str], Any]:
    """A `type` that refuses values outside `choices`: argparse checks `choices` on flags
    but not on defaults, and a default may come from an environment variable."""

    def one_of(value: str) -> Any:
        parsed = parse(value) if parse is not None else value
        if parsed not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {value!r} (choose from {', '.join(choices)})"
            )
        return parsed

    return one_of


def add_flags(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """Each setting as a flag whose default is its environment variable, else its own."""
    for s in settings:
        shown = s.shown_default()
        note = f" (default {shown}; env {s.env})" if shown != "—" else f" (env {s.env})"
        options: dict[str, Any] = {"help": s.help + note, "dest": s.dest}
        if s.kind == LIST:
            options.update(action="append", default=None, metavar=s.metavar)
        elif s.kind == ON:
            options.update(action="store_true", default=env_bool(s.variable, False))
        elif s.kind == OFF:
            options.update(action="store_true", default=not env_bool(s.variable, True))
        else:
            # A variable's text goes through `parse` as a flag's does, so a bad value is a
            # one-line usage error (exit 2), and only for the command that reads it.
            given = env(s.variable)
            default = given if given is not None else (None if s.default is _UNSET else s.default)
            options.update(default=default, metavar=s.metavar)
            if s.choices is not None:
                options["type"] = _one_of(s.choices, s.parse)
            elif s.parse is not None:
                options["type"] = s.parse
        parser.add_argument(s.flag, **options)


def values(args: argparse.Namespace, settings: Iterable[Setting]) -> dict[str, Any]:
    """The `ServeConfig` fields `args` sets (`jwks_fetch.*` included, by their dotted
    names); a field left out keeps its default."""
    out: dict[str, Any] = {}
    for s in settings:
        if s.field is None:
            continue
        value = getattr(args, s.dest)
        if s.kind == LIST:
            value = value or env_list(s.variable)
        elif s.kind == OFF:
            value = not value
        elif value is None:
            continue
        out[s.field] = value
    return out


def markdown_table(settings: Iterable[Setting]) -> str:
    """The README's table of `serve` flags."""
    rows = ["| flag | env var | default | meaning |", "|---|---|---|---|"]
    for s in settings:
        flag = (f"{s.flag} {s.metavar}" if s.metavar else s.flag).replace("|", "\\|")
        repeat = "; repeatable" if s.kind == LIST else ""
        shown = s.shown_default()
        default = shown if shown == "—" or " " in shown else f"`{shown}`"
        meaning = f"{s.help}{repeat}" + (f"; {s.more}" if s.more else "")
        rows.append(f"| `{flag}` | `{s.env}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"
