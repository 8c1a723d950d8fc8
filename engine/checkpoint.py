"""Checkpoints: the atomic save, the one reader, and building a model from a checkpoint.

A checkpoint is one plain dict (nanoGPT): model, optimizer, scaler, iteration, validation state,
best metric and the resolved config. It is written to a temporary file in the same folder, flushed to
disk and renamed, so a crash, a power loss or a full disk leaves the previous file intact; it is read with
``torch.load(weights_only=True)``, which refuses pickles that would run code.
"""

from __future__ import annotations

import copy
import errno
import io
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configs import UserError, check_same_model, differences, validate_config
from models.segmentor import build_model

REQUIRED_KEYS = ("model", "config")
TRAINING_KEYS = ("optimizer", "scaler", "iteration", "validated", "best_miou", "config_changes")  # to resume
GROUPING_KEYS = ("model.deform.offset_lr_mult", "train.no_decay_norm_bias")  # they decide the optimizer's groups


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     **record: Any) -> dict[str, Any]:
    """The checkpoint of a training: one plain dict (nanoGPT) of the model, optimizer and scaler states and
    ``record`` (train.py's: iteration, validated, best_miou, config, config_changes, environment). No RNG state:
    every iteration seeds torch from the config seed and its number, the data from the sample's position."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, **record}


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a uniquely named temporary file, fsync, rename, fsync of the folder.

    On any failure the temporary file is removed and the old ``path`` stays as it was. A failed write is a
    UserError: for a full disk (``torch.save`` reports it as Errno 28, then ``RuntimeError: unexpected pos``) one
    paragraph with the folder, the checkpoint's size and the free space; for other errors the reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = _os_error(err) if isinstance(err, Exception) else None  # Ctrl-C stays Ctrl-C
        if cause is None:
            raise
        raise UserError(_write_failed_message(state, path, cause)) from None
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_checkpoint(source: Path, name: Path) -> None:
    """Give the checkpoint ``source`` a second name ``name`` (a hard link, atomically replacing ``name``): no copy.

    ``source`` is later replaced by a rename, never rewritten, so ``name`` keeps these weights. A filesystem
    without hard links gets a copy.
    """
    tmp = name.with_name(f".{name.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, name)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, or one it was raised while handling (torch.save's RuntimeError)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def _write_failed_message(state: dict[str, Any], path: Path, err: OSError) -> str:
    """The paragraph for a checkpoint that could not be written: a full disk in its own words, else the reason."""
    kept = (f"The previous {path.name} is intact" if path.is_file() else f"No {path.name} existed before") + (
        " (the new one was written to a temporary file, now removed).")
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return (f"could not write the checkpoint {path} ({err.strerror or err}). {kept} Fix the folder's permissions "
                f"or free disk space, then continue the run with --resume auto.")
    needed, free = io.BytesIO(), shutil.disk_usage(path.parent).free
    torch.save(state, needed)  # in memory, to tell its size
    return (
        f"the disk is full: the checkpoint {path} needs {needed.getbuffer().nbytes / 1e6:,.1f} MB and the disk holding {path.parent} "
        f"has {free / 1e6:,.1f} MB free ({err.strerror or err}). {kept} Make room for it there (old runs, other "
        f"checkpoints) or move the run to a bigger disk, then continue it with --resume auto."
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by train.py (tensors only, onto the CPU) by this version of the repository.

    Raises UserError, naming the file and what to do, when it is missing, unreadable or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist or is not a file. Give the path of a checkpoint written by "
            f"train.py, for example runs/def-conv-v2/last.pt."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, pickles, non-checkpoint files: many exception types
        raise UserError(_unreadable_message(path, err)) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(
            f"checkpoint {path} has no {' or '.join(repr(k) for k in missing)} entry, so it was not written "
            f"by train.py (which saves the model weights and the config). Give a last.pt or best.pt from a run folder."
        )
    if not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["config"].get("model"), dict):
        raise UserError(f"checkpoint {path} holds no usable config (no 'model' section); it was not written by train.py.")
    validate_config(checkpoint["config"], f"the config stored in checkpoint {path}")
    return checkpoint


def restore(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, config: dict[str, Any]) -> None:
    """Load a training checkpoint's weights, optimizer and scaler state; the settings of ``config`` (the resumed run's
    momentum, weight decay, offset learning-rate multiplier) win over the checkpoint's."""
    model.load_state_dict(checkpoint["model"])
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError:  # another offset_lr_mult or no_decay_norm_bias merged or split the parameter groups
        changed = [f"{key} {old} -> {new}" for key, (old, new) in
                   differences(checkpoint["config"], config, GROUPING_KEYS).items()]
        raise UserError(
            f"--resume: {', '.join(changed) or 'the parameter groups'} groups the parameters differently from the "
            f"checkpoint, so its optimizer state does not fit. Resume with the checkpoint's value, or start a new run."
        ) from None
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    if checkpoint["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(checkpoint["scaler"])


def newest_checkpoint(paths: list[Path]) -> Path | None:
    """Of the checkpoints among ``paths`` that exist, the one at the highest iteration (the first of a tie), or None.

    Only the iteration is read (the file memory-mapped, its tensors left on disk); a file that cannot be read as a
    checkpoint raises load_checkpoint's UserError naming it.
    """
    def iteration(path: Path) -> int:
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["iteration"])
        except Exception:  # whatever is wrong with the file, the reader says it in its own words
            return int(load_checkpoint(path).get("iteration", 0))  # none: start_or_resume refuses it

    return max((path for path in paths if path.is_file()), key=iteration, default=None)


# Modules whose functions a pickle can call to run commands or code: such a global means an attack, not an accident.
_CODE_RUNNING = ("posix", "nt", "os", "subprocess", "builtins", "sys", "shutil", "socket", "importlib", "runpy", "pty",
                 "code", "ctypes", "pickle", "marshal", "webbrowser")


def _unreadable_message(path: Path, err: Exception) -> str:
    """What went wrong reading ``path``, in words: code-running pickles, foreign objects, damage, or not a checkpoint."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed|\n|$)", text)
    name = found.group(1).strip() if found else ""
    if name:
        if name.split(".")[0] in _CODE_RUNNING:
            return (
                f"checkpoint {path} is a pickle that would run code when loaded (it calls {name}); it was refused and "
                f"nothing in it was executed. It was not written by this repository's train.py: do not use it, and get "
                f"the checkpoint from the run folder it came from."
            )
        return (
            f"checkpoint {path} holds objects other than tensors and plain Python values ({name}), so it cannot be read "
            f"safely with torch.load(weights_only=True). It was not written by this repository's train.py; save only "
            f"tensors, numbers, strings, lists and dicts in it."
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return (f"checkpoint {path} is empty (0 bytes): a copy that failed or a file created but never written. Use the "
                f"other checkpoint of the run (last.pt or best.pt) or copy it again.")
    if head == b"PK\x03\x04":  # torch.save's zip format, cut short or corrupted
        return (
            f"could not read checkpoint {path} ({type(err).__name__}): the file is truncated or damaged (a copy or a run "
            f"that stopped while writing it). Copy it again or use the other checkpoint of the run (last.pt or best.pt)."
        )
    return (
        f"could not read checkpoint {path} ({type(err).__name__}): it is not a PyTorch checkpoint (no torch.save zip "
        f"archive). Give a last.pt or best.pt written by train.py."
    )


def build_model_from_checkpoint(
    checkpoint: dict[str, Any], path: str | Path, config_override: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the checkpoint's model and load its weights strictly; return ``(model, config)``.

    The model section always comes from the checkpoint. With ``config_override`` (the user's
    ``--config``) the two must describe the same model, and its other sections (data, eval) are used.
    """
    saved = checkpoint["config"]
    if config_override is None:
        config = copy.deepcopy(saved)
    else:
        wanted_name = f"config '{config_override.get('config_name', '--config')}'"
        check_same_model(saved, config_override, f"checkpoint {path}", wanted_name)
        config = copy.deepcopy(config_override)
        config["model"] = copy.deepcopy(saved["model"])
    model, _ = build_model(config, load_pretrained=False)
    state = checkpoint["model"]
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path}: 'model' is a {type(state).__name__}, not a state dict.")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit the model its config describes: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}. The file was written by "
            f"different code or edited; nothing was loaded."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(str(err).split())[:400]
        raise UserError(f"checkpoint {path} does not fit the model its config describes: {detail}") from None
    return model, config
