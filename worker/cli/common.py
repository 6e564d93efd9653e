"""Options and helpers shared by every CLI command.

Every command takes ``--config FILE`` (default ``$RETINALGPT_CONFIG``); list and show commands take
``--json``. Errors end the command with exit code 1 and one line on stderr saying why.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console

from worker import logsetup
from worker.config import ConfigError, Settings, load_settings

console = Console(soft_wrap=True)
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: $RETINALGPT_CONFIG).", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

P = ParamSpec("P")
R = TypeVar("R")


class CommandError(Exception):
    """An expected failure of a command: printed as one line, exit code 1."""


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def settings(config: Path | None) -> Settings:
    """Load the configuration for a command; a wrong value ends it with one line naming the key."""
    try:
        loaded = load_settings(config)
    except ConfigError as exc:
        fail(str(exc))
    logsetup.apply(loaded.log_level, phi=loaded.logging.phi)
    return loaded


def one_line_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn expected failures (:class:`CommandError`, :class:`ConfigError`) into one line and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (CommandError, ConfigError) as exc:
            fail(str(exc))

    return wrapper


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
