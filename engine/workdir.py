"""The work dir of a run: whether a start may use it, whether a restart resumes, its lock, and its record.

A work dir holding a checkpoint (last.pt, best.pt) or the record of a run belongs to that run: a new run is
refused there and ``--resume`` continues it; ``--resume auto`` continues it when last.pt exists and starts
otherwise, so one command line serves starts and restarts (torchrun --max-restarts, a SLURM requeue). A record
of a start that never reached a checkpoint (config.yaml, tb/) of the same experiment is started over. While a
training runs, ``.lock`` keeps a second one out (``Lock``).
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from configs import UserError, resume_changes

ARTEFACTS = ("config.yaml", "last.pt", "best.pt", "tb")
CHECKPOINTS = ("last.pt", "best.pt")


def wants_resume(work_dir: Path, mode: str | None) -> bool:
    """Whether a run resumes: ``--resume`` (mode ``last``) always, ``--resume auto`` when last.pt exists."""
    return mode == "last" or (mode == "auto" and (work_dir / "last.pt").is_file())


def check_work_dir(work_dir: Path, config: dict[str, Any], resume: bool) -> str | None:
    """Refuse a start that would overwrite another run, or a resume without last.pt.

    Returns a line to print when a start replaces the record of a start that never reached a checkpoint.
    """
    if resume:
        if not (work_dir / "last.pt").is_file():
            raise UserError(f"--resume was given but {work_dir / 'last.pt'} does not exist. Use --resume auto to "
                            f"start when there is nothing to resume, or name the run's folder with --work-dir.")
        return None
    found = [name for name in ARTEFACTS if (work_dir / name).exists()]
    if not found:
        return None
    saved = _read_record(work_dir / "config.yaml")
    if saved is not None and not any(name in found for name in CHECKPOINTS):
        try:
            resume_changes(saved, config, str(work_dir / "config.yaml"))
        except UserError:
            pass  # another experiment's record: refused below
        else:
            return f"starting over in {work_dir}: it holds only the record of a start that never reached a checkpoint"
    what = "a run of this config" if saved == config else (
        f"a run of a different config ({work_dir / 'config.yaml'})" if saved else f"another run ({', '.join(found)})")
    raise UserError(
        f"the work dir {work_dir} already holds {what}. To continue it, add --resume auto (the same command line "
        f"starts and restarts); to start another run, give --work-dir DIR (or delete {work_dir}). Nothing was overwritten."
    )


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
        probe.unlink()
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

    A thread refreshes the file's modification time every ``refresh_s`` seconds while it is held. A lock is stale,
    and taken over, when its process is gone (same host), when it names this process but this process does not
    hold it (a restart that got the old pid), or when nobody refreshed it for ``stale_s`` seconds (any host: a node
    that crashed).
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
                self._remove_if_stale()
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

    def _remove_if_stale(self) -> None:
        holder = lock_holder(self.path)
        if holder is None:
            self.path.unlink(missing_ok=True)
            return
        raise UserError(
            f"{self.what} is in use by {holder} (lock file {self.path}). Two processes must not write it at once: wait "
            f"for that one, or choose another output. A lock that nobody refreshes for {self.stale_s / 60:.0f} minutes "
            f"(a crashed node) is taken over."
        )

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        Lock.held.discard(self.path.resolve())
        self.path.unlink(missing_ok=True)


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file ``path`` ("process P on HOST, refreshed N s ago"), or None: no lock, or a stale one."""
    try:
        owner, age = json.loads(path.read_text(encoding="utf-8")), time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return None if not path.exists() else "an unknown process"
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
