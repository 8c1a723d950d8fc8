"""Checkpoints: the atomic save under failure, and what the reader says about files it cannot use."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import types
from pathlib import Path

import pytest
import torch

from configs import UserError
from engine import checkpoint as checkpoint_module
from engine.checkpoint import load_checkpoint, save_checkpoint


class RunsCode:
    """An object whose unpickling would call os.system: what a malicious checkpoint holds."""

    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


class FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes free: a write past it fails with Errno 28, as on a full disk."""

    room = 100_000

    def write(self, data: bytes) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


@pytest.mark.parametrize("buffered", [False, True])
def test_a_full_disk_is_one_paragraph_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             buffered: bool) -> None:
    """Issue 23, item 7: on a full disk the real torch.save raises Errno 28 and then ``RuntimeError: unexpected pos``
    (unbuffered), or Errno 28 alone when it flushes a big buffer at the end; either way one paragraph says
    the disk is full, where, how much the checkpoint needs, and that the previous file is intact (it is)."""
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1}, path)
    opener = (lambda name, mode: io.BufferedWriter(FullDisk(name, mode), 1 << 26)) if buffered else FullDisk
    monkeypatch.setattr(checkpoint_module, "open", opener, raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=1_000_000))
    with pytest.raises(UserError) as info:
        save_checkpoint({"iteration": 2, "w": torch.zeros(750_000)}, path)  # 3.0 MB
    message = str(info.value)
    assert message.startswith(f"the disk is full: the checkpoint {path} needs 3.0 MB and the disk holding {tmp_path} "
                              f"has 1.0 MB free (No space left on device). The previous last.pt is intact")
    assert "--resume" in message and "\n" not in message
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_other_write_errors_are_named_and_other_errors_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.pt"

    def denied(obj: object, f: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoint_module.torch, "save", denied)
    expected = f"could not write the checkpoint {path} (Permission denied). No best.pt existed before"
    with pytest.raises(UserError, match=re.escape(expected)):
        save_checkpoint({"iteration": 1}, path)

    def unpicklable(obj: object, f: object) -> None:
        raise RuntimeError("cannot pickle a lambda")

    monkeypatch.setattr(checkpoint_module.torch, "save", unpicklable)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint({"iteration": 1}, path)
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_that_would_run_code_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(), "config": {}}, path)
    with pytest.raises(UserError, match="would run code") as info:
        load_checkpoint(path)
    assert "probably truncated" not in str(info.value)


@pytest.mark.parametrize("content,expected", [
    (os.urandom(4096), "not a PyTorch checkpoint"),
    (b"", "is empty"),
])
def test_random_bytes_are_not_called_foreign_objects(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=expected) as info:
        load_checkpoint(path)
    assert "objects other than tensors ()" not in str(info.value)


def test_a_truncated_checkpoint_is_called_damaged(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}, "config": {"model": {}}}, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(UserError, match="truncated or damaged"):
        load_checkpoint(path)
