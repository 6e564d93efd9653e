"""``retinalgpt config check``: validate the configuration and print the effective values."""

from __future__ import annotations

import typer

from worker.cli.common import ConfigOption, JsonOption, console, print_json, settings


def check(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """Validate the configuration and print the effective configuration (secrets masked)."""
    effective = settings(config)
    data = effective.masked()
    if json_output:
        print_json(data)
        return
    source = effective._toml_file or "defaults and environment only"
    console.print(f"[green]configuration OK[/] ({source})")
    _print_tree(data)


def _print_tree(data: dict, indent: int = 0) -> None:
    for key, value in data.items():
        pad = "  " * indent
        if isinstance(value, dict):
            console.print(f"{pad}[bold]{key}[/]")
            _print_tree(value, indent + 1)
        else:
            console.print(f"{pad}{key} = {value!r}", highlight=False)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Configuration utilities.", no_args_is_help=True)
    group.command("check")(check)
    app.add_typer(group, name="config")
