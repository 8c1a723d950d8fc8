"""The work dir of a run: whether it may be used, its lock, and its record (config.yaml).

A work dir holding any run artefact (config.yaml, last.pt, best.pt, tb/) belongs to that run: a new run
is refused there, ``--resume`` continues it. While a training runs, ``.lock`` (owner pid and host)
keeps a second training out; a lock whose process is gone (same host) is stale and taken over. The same lock
keeps a second evaluation from writing an output file (``.NAME.lock`` beside it) while one writes it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import yaml

from configs import UserError, upgrade_config

ARTEFACTS = ("config.yaml", "last.pt", "best.pt", "tb")
LOCK_NAME = ".lock"


def check_work_dir(work_dir: Path, config: dict[str, Any], resume: bool) -> None:
    """Refuse a new run over a work dir that holds another run's artefacts, or --resume without last.pt."""
    last = work_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise UserError(f"--resume was given but {last} does not exist. Start without --resume, or name the run's folder with --work-dir.")
        return
    if work_dir.exists() and not work_dir.is_dir():
        raise UserError(f"the work dir {work_dir} is a file, not a folder. Give --work-dir a folder path.")
    found = [name for name in ARTEFACTS if (work_dir / name).exists()]
    if not found:
        return
    saved_path = work_dir / "config.yaml"
    saved = None
    if saved_path.is_file():
        try:
            saved = upgrade_config(yaml.safe_load(saved_path.read_text()), str(saved_path))
        except (yaml.YAMLError, UserError, AttributeError, TypeError):
            saved = None  # not a config this code understands: still another run's
    if saved == config:
        what = "a run of this config"
    elif saved is None:
        what = f"another run ({', '.join(found)})"
    else:
        what = f"a run of a different config ({saved_path})"
    raise UserError(
        f"the work dir {work_dir} already holds {what}. To continue it, add --resume; to start another run, "
        f"give --work-dir DIR (or delete {work_dir}). Nothing was overwritten."
    )


def make_writable_folder(folder: Path, advice: str) -> None:
    """Create ``folder`` and write a probe file there now, so a read-only or full disk fails before any work.

    Raises UserError naming the folder, the reason and ``advice``.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to {folder} ({err.strerror or err}). {advice}") from None


def prepare_work_dir(work_dir: Path) -> None:
    """Create the work dir and check that files can be written there (UserError naming the folder otherwise)."""
    make_writable_folder(work_dir, "Give --work-dir a folder you can write to (the work dir), with free space.")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class WorkDirLock:
    """``with WorkDirLock(work_dir):`` holds ``work_dir/.lock`` for one training; UserError if another holds it.

    ``WorkDirLock.for_output(path)`` holds ``.NAME.lock`` beside the output file ``path`` for one writer.
    """

    def __init__(self, work_dir: Path, lock_name: str = LOCK_NAME, held: str = "", advice: str = "") -> None:
        self.path = work_dir / lock_name
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = held or f"the work dir {work_dir}"
        self.advice = advice or "Two trainings must not share a work dir: wait for it, give --work-dir DIR"

    @classmethod
    def for_output(cls, path: Path) -> "WorkDirLock":
        """The lock of one output file (an evaluation's --json or --per-image)."""
        return cls(path.parent, f".{path.name}.lock", f"the output {path}",
                   "Two processes must not write the same file: wait for it, give another path")

    def __enter__(self) -> "WorkDirLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise UserError(f"could not take the lock {self.path}; another process is starting to use {self.held}.")

    def _remove_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            owner = {}
        pid, host = owner.get("pid"), owner.get("host")
        if host == self.owner["host"] and isinstance(pid, int) and not _process_alive(pid):
            self.path.unlink(missing_ok=True)  # its process is gone: a crash or kill -9 left it
            return
        where = f"process {pid} on {host}" if pid else "another process"
        raise UserError(
            f"{self.held} is in use by {where} (lock file {self.path}). {self.advice}, or, if that process is surely "
            f"gone (another machine that crashed), delete {self.path}."
        )

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def write_record(work_dir: Path, config: dict[str, Any]) -> None:
    """Write the run's resolved config to ``work_dir/config.yaml`` atomically (a temporary file, then a rename)."""
    path = work_dir / "config.yaml"
    tmp = path.with_name(f".config.yaml.{os.getpid()}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({err.strerror or err}). Check the free space and permissions.") from None
