"""``retinalgpt db upgrade``: migrate the configured database to the newest schema."""

from __future__ import annotations

import logging

import typer

from worker.cli.common import ConfigOption, console, one_line_errors, settings


@one_line_errors
def upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the database (SQLite or PostgreSQL) to the newest schema."""
    from sqlalchemy.exc import SQLAlchemyError

    from worker.db.migrate import upgrade as run_upgrade

    effective = settings(config)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        revision = run_upgrade(effective.database.url)
    except SQLAlchemyError as exc:
        from worker.cli.common import fail

        fail(f"database upgrade failed: {str(exc).splitlines()[0]}")
    console.print(f"database at revision [bold]{revision}[/]", highlight=False)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Database administration.", no_args_is_help=True)
    group.command("upgrade")(upgrade)
    app.add_typer(group, name="db")
