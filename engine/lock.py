"""Locks: one writer at a time for a work dir (``.lock``) or an output file, across processes and hosts.

A lock file names its holder (process and host) and its holder refreshes its modification time while it holds it
(the heartbeat), so a lock whose holder died is told from one in use, on this host and on another (``Lock``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from configs import UserError


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class Lock:
    """``with Lock(path, what):`` holds the lock file ``path`` for one writer of ``what``; UserError if it is taken.

    A thread refreshes the file's modification time every ``refresh_s`` seconds while it is held (the heartbeat). A
    lock is stale, and taken over, when its process is gone (same host), when it names this process but this process
    does not hold it (a restart that got the old pid), or when nobody refreshed it for ``stale_s`` seconds (any host:
    a node that crashed). A lock held on this host by a live process is refused at once. A lock from another host (or
    one that names no owner) is watched instead, saying so: if its heartbeat goes on, the holder is alive and the lock
    is refused; if it has stopped, the lock is taken over once stale, at most ``stale_s`` after its last refresh (a
    job requeued onto another node after a node crash waits instead of failing).
    """

    refresh_s, stale_s = 60.0, 300.0
    held: set[Path] = set()  # the lock files this process holds

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self._done = threading.Event()

    def __enter__(self) -> Lock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_when_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.owner, f)
            Lock.held.add(self.path.resolve())
            threading.Thread(target=self._refresh, daemon=True).start()
            return self
        raise UserError(f"could not take the lock {self.path}; another process is starting on {self.what} right now.")

    def _refresh(self) -> None:
        while not self._done.wait(self.refresh_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone or unreachable for a moment: the next refresh tries again

    def _take_over_when_stale(self) -> None:
        """Remove the lock file once it is stale; UserError while a live process holds it (see the class)."""
        first, told = _modified(self.path), False
        while (holder := lock_holder(self.path)) is not None:
            modified = _modified(self.path)
            if _on_this_host(self.path) or (modified or 0) > (first or 0):  # a live process, or a heartbeat
                raise UserError(
                    f"{self.what} is in use by {holder} (lock file {self.path}). Two processes must not write it at "
                    f"once: wait for that one, or choose another output. A lock that nobody refreshes for "
                    f"{self.stale_s / 60:.0f} minutes (a crashed node) is taken over."
                )
            left = self.stale_s - (time.time() - (modified or 0))
            if not told:
                print(f"waiting for the lock {self.path}, held by {holder}: a live holder refreshes it every "
                      f"{self.refresh_s:.0f} s (then this start stops); if its node crashed, it is taken over when "
                      f"nobody refreshed it for {self.stale_s:.0f} s, in at most {max(left, 0):.0f} s.", flush=True)
                told = True
            time.sleep(min(self.refresh_s / 4, max(left, 0) + 0.01))
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        Lock.held.discard(self.path.resolve())
        try:
            self.path.unlink(missing_ok=True)
        except OSError as err:  # a filesystem remounted read-only: the lock names a process that is ending
            print(f"could not remove the lock file {self.path} ({err.strerror or err}); the next start on this host "
                  f"takes it over, since its process is gone.", file=sys.stderr)


def _modified(path: Path) -> float | None:
    """The modification time of ``path`` (the lock's last heartbeat), or None when it is gone."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _owner(path: Path) -> dict[str, Any] | None:
    """The lock file's JSON object (pid, host), or None where it cannot be read as one."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _on_this_host(path: Path) -> bool:
    """Whether the lock file ``path`` names a process of this host (whose liveness can be checked directly)."""
    owner = _owner(path)
    return owner is not None and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file ``path`` ("process P on HOST, refreshed N s ago"), or None: no lock, or a stale one."""
    owner, age = _owner(path), time.time() - (_modified(path) or 0)
    if owner is None:
        if not path.exists():
            return None
        return None if age > Lock.stale_s else f"an unknown process (the lock file names none), made {age:.0f} s ago"
    pid, host = owner.get("pid"), owner.get("host")
    same_host = host == socket.gethostname() and isinstance(pid, int)
    ours_before = pid == os.getpid() and path.resolve() not in Lock.held  # a restart that was given the old pid
    if age > Lock.stale_s or (same_host and (ours_before or not _process_alive(pid))):
        return None
    return f"process {pid} on {host}, refreshed {age:.0f} s ago"


def output_lock(path: Path) -> Lock:
    """The lock of one output file (an evaluation's --json or --per-image): ``.NAME.lock`` beside it."""
    return Lock(path.with_name(f".{path.name}.lock"), f"the output {path}")
