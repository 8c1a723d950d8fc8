"""The work dir of a run: whether a start may use it, where a restart resumes, its lock, and its record.

train.py calls three functions here, at its start: ``hold_work_dir`` (rank 0 holds the folder: writable, locked, the
leftovers of interrupted writes removed), ``start_or_resume`` (the checkpoint a run continues from, or a refusal)
and, once the start succeeded, ``write_record`` (config.yaml).

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from configs import KEYS, RESUME_FIXED, UserError, differences, resume_changes
from engine.checkpoint import TRAINING_KEYS, load_checkpoint, newest_checkpoint
from engine.lock import Lock

ARTEFACTS = ("config.yaml", "last.pt", "best.pt", "tb")
CHECKPOINTS = ("last.pt", "best.pt")
# What the writes of a training leave when a kill cuts them short: checkpoints and the record are written to a
# temporary file and renamed (engine.checkpoint, write_whole); the folder is probed with a file (make_writable_folder).
TEMPORARIES = (".last.pt.*.tmp", ".best.pt.*.tmp", ".config.yaml.*.tmp", ".write_test.*")


@contextmanager
def hold_work_dir(work_dir: Path, rank: int) -> Iterator[None]:
    """On rank 0 (the process that writes files): make ``work_dir`` and check it is writable, hold its lock while the
    block runs, and remove what interrupted writes left there (saying so). Other ranks hold nothing."""
    if rank != 0:
        yield
        return
    make_writable_folder(work_dir, "Give --work-dir a folder you can write to (the work dir), with free space.")
    with Lock(work_dir / ".lock", f"the work dir {work_dir}"):
        if removed := remove_temporaries(work_dir):
            print(f"removed what interrupted writes left in {work_dir}: {', '.join(removed)}")
        yield


def start_or_resume(work_dir: Path, mode: str | None, config: dict[str, Any],
                    rank: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str]:
    """The checkpoint a run continues from (None: it starts), its ``config_changes`` with this resume's changes
    added, and the line that says which.

    ``mode`` is ``--resume``'s (None, ``last`` or ``auto``). A start that would overwrite another run (checked on
    rank 0), a resume without a checkpoint and a resume that changes the model or the recipe (``resume_changes``)
    are UserErrors naming the file or the keys. A resume keeps the number of micro-batches that
    ``train.accum_steps: auto`` chose at the start (``config`` is set to it).
    """
    point = resume_point(work_dir, mode)
    if point is None:
        note = check_work_dir(work_dir, config) if rank == 0 else None
        return None, [], note or f"starting a new run in {work_dir}"
    checkpoint = load_checkpoint(point)
    if missing := [key for key in TRAINING_KEYS if key not in checkpoint]:
        raise UserError(f"{point} holds no {', '.join(repr(key) for key in missing)}: it is not a training checkpoint of "
                        f"train.py (weights alone?), so no run can continue from it. Move it out of {work_dir} to start "
                        f"a new run there, or resume from a last.pt or best.pt that train.py wrote.")
    if config["train"]["accum_steps"] == "auto":
        config["train"]["accum_steps"] = checkpoint["config"]["train"]["accum_steps"]
    changes = list(checkpoint["config_changes"])
    if diff := resume_changes(checkpoint["config"], config, str(point)):
        changes.append({"iteration": checkpoint["iteration"], "changes": diff})
    return checkpoint, changes, f"resuming {point} at iteration {checkpoint['iteration']}"


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
        what = (f"another run ({', '.join(found)})" if saved is None else "a run of this config"
                if _same_config(saved, config) else f"a run of a different config ({record})")
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
    if differ := differences(saved, config, RESUME_FIXED):
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


def _same_config(saved: dict[str, Any], config: dict[str, Any]) -> bool:
    """Whether the record ``saved`` is of ``config`` (``train.accum_steps: auto`` matches the number it chose)."""
    auto = {"train.accum_steps"} if config["train"]["accum_steps"] == "auto" else set()
    return set(differences(saved, config, KEYS)) <= auto


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
