"""Checkpoints: the atomic save under failure, and what the reader says about files it cannot use."""

from __future__ import annotations

import errno
import os
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


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"iteration": 1}, path)

    def disk_full(obj: object, f: object) -> None:
        f.write(b"partial bytes")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(OSError):
        save_checkpoint({"iteration": 2}, path)
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


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
