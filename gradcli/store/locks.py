"""Which process computes which stage: claims kept as files under a local store's ``.locks``.

While a command runs, the stages it computes are its alone: a second process computing the
same stage (two PCAs started on one store) stops with a one-line error instead of overwriting
the first one's checkpoints, and a claim whose process is gone (killed) is taken over. This is
a matter of processes on one host, not of zarr, so it lives apart from the store's data.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from gradcli.errors import BadInputError

LOCKS = ".locks"  # which process computes which stage, while it runs


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class StageLocks:
    """The claims one run store holds on the stages its running command computes."""

    def __init__(self) -> None:
        self.held: list[Path] = []

    def claim(self, folder: Path, path: str, what: str | None, url: str) -> None:
        """Claim stage ``path`` of the local store in ``folder`` (at ``url``) for this
        process; a claim of a live process is a one-line error naming ``what``, one of a
        process gone is taken over."""
        lock = folder / LOCKS / (path.replace("/", "~") + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                handle = None
            if handle is not None:
                with os.fdopen(handle, "w") as file:
                    file.write(me)
                self.held.append(lock)
                return
            try:
                owner = lock.read_text().strip()
            except OSError:  # released meanwhile
                continue
            host, _, pid = owner.rpartition(" ")
            if owner == me:
                return
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    lock.unlink()  # left by a killed process
                continue
            raise BadInputError(
                f"another gradcli process (pid {pid} on {host}) is computing {what or path} in "
                f"{url}; wait for it to finish, or use another --store"
            )

    def release(self) -> None:
        """Give up every claim held (the command ends, however it ends)."""
        for lock in self.held:
            with contextlib.suppress(OSError):
                lock.unlink()
            with contextlib.suppress(OSError):  # others may hold claims still
                lock.parent.rmdir()
        self.held = []
