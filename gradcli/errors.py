"""Error types that carry the exit code the CLI returns for them.

Every error a user can cause is a ``GradcliError`` whose message is one line saying what is
wrong and how to fix it; anything else escaping to the CLI is an internal error (exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_STALE_STORE = 3
EXIT_INTERRUPTED = 130


class GradcliError(Exception):
    """Base class: a problem the user can fix; ``str(err)`` is the one-line message."""

    exit_code = EXIT_INTERNAL


class BadInputError(GradcliError):
    """Bad usage or bad input: unknown names, missing files, corrupt data, impossible options."""

    exit_code = EXIT_BAD_INPUT


class StaleStoreError(GradcliError):
    """The run store holds results computed from something else than what was asked for."""

    exit_code = EXIT_STALE_STORE


class Interrupted(GradcliError):
    """Stopped on request (SIGINT/SIGTERM) at a safe point; the message says how to resume."""

    exit_code = EXIT_INTERRUPTED
