"""The gradcli command line's application: the Typer app, the entry point :func:`main` with
its error handling and exit codes, the check for an option given twice, and the stop requests
(SIGINT/SIGTERM) the stages poll.

Errors a user can fix print one line on stderr and exit with the code documented in the
README (2 bad input, 3 stale store, 130 interrupted); ``--debug`` shows the traceback. The
commands live beside this module, one per stage (:mod:`gradcli.cli`); this module holds what
all of them share at run time and knows none of them.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from typing import Annotated

import typer
from rich.console import Console
from typer.exceptions import TyperException

from gradcli import __version__
from gradcli.cli.options import Tracebacks, complete
from gradcli.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    BadInputError,
    GradcliError,
    Interrupted,
)

app = typer.Typer(
    name="gradcli",
    help="Out-of-distribution detection with low-dimensional gradients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)

# Typer (0.29 on) raises its own exceptions and no longer depends on click.
USAGE_ERRORS = (TyperException,)
STOPS = (KeyboardInterrupt, typer.Abort)


class StopRequests:
    """SIGINT/SIGTERM ask the running stage to stop at its next chunk boundary.

    A second SIGINT stops at once (the default handler's KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            if err.is_terminal:  # someone at a terminal sees it was heard; pipelines get one line
                again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
                err.print(
                    f"{signal.Signals(signum).name}: stopping at the next chunk boundary{again}",
                    highlight=False,
                )

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)


# Hidden old spellings of an option, counted with the option itself ("given twice").
ALIASES = {"--id": "--id-test"}


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Out-of-distribution detection with low-dimensional gradients."""


_COMMANDS: dict[str | None, typer.core.TyperGroup] = {}


def _command(name: str | None = None):
    """The app's command tree (built once per ``name``), with help that shows no value for a
    flag and a name instead of a Python type for options that take several values.

    Every command is complete (all its options) when ``name`` is None, else command ``name``
    alone: the others show their own options only, enough to list them (``gradcli --help``)
    without importing what their detector and head options are declared in."""
    if name not in _COMMANDS:
        for info in app.registered_commands:
            command_name = info.name or info.callback.__name__.replace("_", "-")
            if name is None or command_name == name:
                complete(info.callback)
        root = typer.main.get_command(app)
        for command in [root, *getattr(root, "commands", {}).values()]:
            context = command.make_context(command.name or "gradcli", [], resilient_parsing=True)
            for param in command.get_params(context):
                if getattr(param, "is_flag", False):
                    param.metavar = ""
                elif getattr(param, "multiple", False) and param.metavar is None:
                    param.metavar = "TEXT"
        _COMMANDS[name] = root
    return _COMMANDS[name]


def _options_given(root, args: list[str]) -> list[tuple[str, object]]:
    """The options of the command line, in order: (the name as typed, its parameter), for
    the named command's known options (an unknown one is Typer's to name)."""
    position = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if position is None:
        return []
    command = getattr(root, "commands", {}).get(args[position])
    if command is None:
        return []
    by_name = {}
    for param in command.params:
        for name in (*param.opts, *getattr(param, "secondary_opts", ())):
            by_name[name] = param
    given = []
    tokens = iter(args[position + 1 :])
    for token in tokens:
        if token == "--":
            break
        if not token.startswith("-"):
            continue
        name = token.split("=", 1)[0]
        param = by_name.get(name)
        if param is None:
            continue  # unknown: Typer names it
        if not getattr(param, "is_flag", False) and "=" not in token:
            next(tokens, None)  # the option's value
        given.append((name, param))
    return given


def _check_repeats(given: list[tuple[str, object]]) -> None:
    """Refuse an option given twice unless it takes several values (a list option): the last
    one would otherwise silently win. A flag given twice alike (``--quiet -q``) says the same
    thing twice and is let through; a flag and its negation are refused."""
    seen: dict[str, tuple[str, bool | None]] = {}
    for name, param in given:
        if getattr(param, "multiple", False) or getattr(param, "count", False):
            continue
        canonical = ALIASES.get(param.opts[0], param.opts[0])
        flag = getattr(param, "is_flag", False)
        value = name not in getattr(param, "secondary_opts", ()) if flag else None
        if canonical in seen:
            first, before = seen[canonical]
            if flag and value == before:
                continue
            if flag:
                raise BadInputError(f"{first} and {name} contradict each other; give one")
            if first == name:
                raise BadInputError(f"{name} given twice; give it once")
            raise BadInputError(f"{first} and {name} name the same option; give it once")
        seen[canonical] = (name, value)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app and maps errors to one-line messages and exit codes."""
    args = sys.argv[1:] if argv is None else list(argv)
    Tracebacks.on = False  # set by the shared --debug option as the command line is parsed
    try:
        named = next((a for a in args if not a.startswith("-")), "")
        command = _command(named)
        given = _options_given(command, args)
        # --debug also covers errors found before Typer parses the command line
        Tracebacks.remember(any(getattr(p, "name", None) == "debug" for _, p in given))
        _check_repeats(given)
        # Typer hands back an Exit's code, and turns a Ctrl-C that reaches it into Exit(130).
        code = command(args=args, prog_name="gradcli", standalone_mode=False)
    except typer.Exit as stop:
        code = stop.exit_code
    except USAGE_ERRORS as problem:
        return _usage_error(problem)
    except STOPS:
        code = EXIT_INTERRUPTED
    except GradcliError as problem:
        if Tracebacks.on:  # the traceback, then the same line and exit code as without --debug
            traceback.print_exc()
        prefix = "interrupted" if isinstance(problem, Interrupted) else "error"
        err.print(f"{prefix}: {problem}", highlight=False, soft_wrap=True, markup=False)
        return problem.exit_code
    except Exception as problem:  # an internal error: one line unless --debug
        if Tracebacks.on:
            raise
        err.print(
            f"internal error: {type(problem).__name__}: {problem} (rerun with --debug for details)",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERNAL
    if code == EXIT_INTERRUPTED:
        err.print("interrupted; rerun the same command to resume from the last finished chunk")
    return code if isinstance(code, int) else 0


def _usage_error(problem: Exception) -> int:
    """A mistyped command line: one line naming the option and where its help is."""
    code = getattr(problem, "exit_code", 2) or 2
    message = problem.format_message() if hasattr(problem, "format_message") else str(problem)
    if not message:  # no arguments at all: Typer has printed the help already
        return code
    context = getattr(problem, "ctx", None)
    command = context.command_path if context is not None else "gradcli"
    err.print(
        f"error: {message.rstrip('.')}; see '{command} --help'",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )
    return code
