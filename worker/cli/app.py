"""The ``retinalgpt`` command.

Each module in :mod:`worker.cli` that defines ``register(app)`` adds its commands; modules keep heavy imports
(torch, the model) inside the command functions so that ``node``, ``api`` and delivery never import torch.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

import typer

import worker.cli
from worker import logsetup

app = typer.Typer(
    name="retinalgpt",
    help="RetinalGPT clinical worker: DICOM node, retinal AI pipeline, DICOM SR and FHIR results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(worker.cli.__path__), key=lambda m: m.name):
        if info.name in {"app", "common"}:
            continue
        module = importlib.import_module(f"worker.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_commands()


def main() -> None:
    logsetup.configure(logging.INFO)  # commands re-apply it with the configuration's level and logging.phi
    app()
