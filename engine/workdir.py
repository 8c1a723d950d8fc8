"""The work dir of a run: whether a start may use it, where a restart resumes, its lock, and its record.

A work dir holding a checkpoint (last.pt, best.pt) or the record of a run belongs to that run: a new run is
refused there, and ``--resume`` continues it from its newest checkpoint (the one at the highest iteration: last.pt,
or best.pt when a validation wrote it after the last last.pt). ``--resume auto`` does the same and starts when
there is no checkpoint, so one command line serves starts and restarts (torchrun --max-restarts, a SLURM requeue).
While a training runs, ``.lock`` keeps a second one out (``Lock``).

What a kill at any moment leaves in a work dir, and what ``--resume auto`` does then (tests/test_operations.py
builds each state; the first column names it there)::

    state       the work dir holds                        the kill came                         --resume auto
    empty       nothing (or not even the folder)          before the work dir was checked       starts
    record      config.yaml                               before tb/ was made                   starts over
    logs        config.yaml, tb/                          before the first checkpoint           starts over
    best        config.yaml, tb/, best.pt                 after a validation, before last.pt    resumes best.pt
    last        config.yaml, tb/, last.pt                 after last.pt, before a validation    resumes last.pt
    both        config.yaml, tb/, last.pt, best.pt        after last.pt                         resumes last.pt
    best-newer  config.yaml, tb/, last.pt, newer best.pt  after a validation, before last.pt    resumes best.pt

In every state the killed run's ``.lock`` may be left (taken over at once when its process is gone from this host;
from another host, waited for until it is stale: ``Lock``), and a write the kill cut short leaves its temporary
file (``.NAME.*.tmp``, ``TEMPORARIES``): ``remove_temporaries`` removes them, saying so. "Starts over" holds for the
record of the same experiment; another experiment's record or checkpoint is refused, naming the file or the keys
that differ, and nothing is written.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from configs import RESUME_FIXED, UserError, flatten
from engine.checkpoint import newest_checkpoint

ARTEFACTS = ("config.yaml", "last.pt", "best.pt", "tb")
CHECKPOINTS = ("last.pt", "best.pt")
# What the writes of a training leave when a kill cuts them short: checkpoints and the record are written to a
# temporary file and renamed (engine.checkpoint, write_whole); the folder is probed with a file (make_writable_folder).
TEMPORARIES = (".last.pt.*.tmp", ".best.pt.*.tmp", ".config.yaml.*.tmp", ".write_test.*")


def resume_point(work_dir: Path, mode: str | None) -> Path | None:
    """The checkpoint a start continues from, or None to start: with ``--resume`` (mode ``last``) or ``--resume
    auto``, the newest checkpoint of the work dir (last.pt or best.pt, by iteration; last.pt when they tie).

    UserError for ``--resume`` in a work dir without a checkpoint.
    """
    if mode is None:
        return None
    found = newest_checkpoint([work_dir / name for name in CHECKPOINTS])
    if found is None and mode == "last":
        raise UserError(f"--resume was given but {work_dir} holds no checkpoint (last.pt or best.pt). Use --resume "
                        f"auto to start when there is nothing to resume, or name the run's folder with --work-dir.")
    return found


def check_work_dir(work_dir: Path, config: dict[str, Any]) -> str | None:
    """Refuse a start that would overwrite another run (a start: no checkpoint is resumed).

    Returns a line to print when a start replaces the record of a start of this experiment that never reached a
    checkpoint.
    """
    found = [name for name in ARTEFACTS if (work_dir / name).exists()]
    if not found:
        return None
    saved = _read_record(work_dir / "config.yaml")
    if any(name in found for name in CHECKPOINTS):  # a start: --resume auto would have resumed them
        record = work_dir / "config.yaml"
        what = ("a run of this config" if saved == config else f"a run of a different config ({record})" if saved
                else f"another run ({', '.join(found)})")
        raise UserError(
            f"the work dir {work_dir} already holds {what}. To continue it, add --resume auto (the same command line "
            f"starts and restarts); to start another run, give --work-dir DIR (or delete {work_dir}). Nothing was "
            f"overwritten."
        )
    if saved is None:
        raise UserError(
            f"the work dir {work_dir} already holds {', '.join(found)} but no readable config.yaml, so it is not known "
            f"which run wrote them. Give --work-dir DIR for this run, or delete {work_dir}. Nothing was overwritten."
        )
    recorded, wanted = flatten(saved), flatten(config)
    differ = [key for key in RESUME_FIXED if recorded.get(key) != wanted.get(key)]
    if differ:
        raise UserError(
            f"the work dir {work_dir} already holds the record ({work_dir / 'config.yaml'}) of a start of another "
            f"experiment that never reached a checkpoint ({', '.join(differ)} differ). To start this run, give "
            f"--work-dir DIR, or delete {work_dir} if that start is not wanted. Nothing was overwritten."
        )
    return f"starting over in {work_dir}: it holds only the record of a start that never reached a checkpoint"


def remove_temporaries(work_dir: Path) -> list[str]:
    """Remove the temporary files that interrupted writes of a training left in ``work_dir`` (``TEMPORARIES``);
    their names. Call it holding the work dir's lock: no other training writes there then."""
    found = sorted({path for pattern in TEMPORARIES for path in work_dir.glob(pattern)})
    for path in found:
        path.unlink(missing_ok=True)
    return [path.name for path in found]


def _read_record(path: Path) -> dict[str, Any] | None:
    """The config a run recorded in its work dir, or None when there is none this code can read."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def make_writable_folder(folder: Path, advice: str) -> None:
    """Create ``folder`` and write a probe file there now, so a read-only or full disk fails before any work.

    Raises UserError naming the folder, the reason and ``advice``.
    """
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write to {folder}: it is a file, not a folder. {advice}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)  # a training that starts there removes the probes of killed processes
    except OSError as err:
        raise UserError(f"cannot write to {folder} ({err.strerror or err}). {advice}") from None


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


def _on_this_host(path: Path) -> bool:
    """Whether the lock file ``path`` names a process of this host (whose liveness can be checked directly)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(owner, dict) and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file ``path`` ("process P on HOST, refreshed N s ago"), or None: no lock, or a stale one."""
    try:
        owner, age = json.loads(path.read_text(encoding="utf-8")), time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        if not path.exists():
            return None
        age = time.time() - (_modified(path) or 0)
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


def write_whole(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file beside it, then a rename), making the folder:
    a reader never sees half a file, and a failed or interrupted write leaves the old one. Text is written as UTF-8,
    whatever the locale. UserError naming the file when it cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as err:
        if tmp.exists():  # exists() is False, not an error, under a parent that is a file
            tmp.unlink()
        if not isinstance(err, OSError):  # Ctrl-C stays Ctrl-C
            raise
        raise UserError(f"could not write {path} ({err.strerror or err}). Check the path, the free space and the "
                        f"permissions.") from None


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON in ``path``, written whole (``write_whole``): every JSON output goes through here."""
    write_whole(path, json.dumps(data, indent=2) + "\n")


def write_image(path: Path, image: Image.Image, **options: Any) -> None:
    """``image`` in the format its suffix names (PIL's ``options``, like ``quality``), written whole (``write_whole``)."""
    buffer = io.BytesIO()
    image.save(buffer, format=Image.registered_extensions()[path.suffix.lower()], **options)
    write_whole(path, buffer.getvalue())


def write_record(work_dir: Path, config: dict[str, Any]) -> None:
    """Write the run's resolved config to ``work_dir/config.yaml``, whole (``write_whole``)."""
    write_whole(work_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
