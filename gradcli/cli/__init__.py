"""The gradcli command line: parses options, calls the library, reports.

``app`` (the Typer app, :func:`main`, exit codes), ``options`` (every shared flag, declared
once), ``parse`` and ``common`` (option values, opening a run, printing a summary) and one
module of commands per stage: ``extract``, ``embed``, ``fit``, ``score``, ``evaluate`` and
``info`` (methods, inspect, datasets, demo, version).
"""

from __future__ import annotations

from importlib import import_module

from gradcli.cli.app import _command, app, main

# Importing a command module registers its commands, in the order `gradcli --help` lists them.
COMMAND_MODULES = ("extract", "embed", "fit", "score", "evaluate", "info")
for _module in COMMAND_MODULES:
    import_module(f"gradcli.cli.{_module}")

__all__ = ["COMMAND_MODULES", "_command", "app", "main"]
