"""train.accum_steps=auto (trial steps with an injected out-of-memory, the torchrun agreement under gloo, the record,
the resume), the per-forward batch BatchNorm needs, BatchNorm's running statistics under accumulation, and the
out-of-memory paragraph of a training step on the CPU."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import tiny_run, write_ade_tree
from torch import nn

import train
from configs import UserError, batch_split_error, load_config
from engine import evaluation, memory, optim
from engine.checkpoint import load_checkpoint
from engine.distributed import init_distributed, shutdown
from engine.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")
NO_SCALER = torch.amp.GradScaler("cuda", enabled=False)


class Tiny(nn.Module):
    """A segmentation model with one BatchNorm (on its input, so each micro-batch's statistics are its images')."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.bn, self.conv, self.aux = nn.BatchNorm2d(3), nn.Conv2d(3, classes, 3, stride=4, padding=1), nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.bn(x)
        return {"out": self.conv(h), "aux": self.aux(h[..., ::4, ::4])}


def oom_above(limit: int, seen: list[tuple[int, float]]) -> Callable[..., dict[str, torch.Tensor]]:
    """``train_step`` that runs out of CUDA memory for more than ``limit`` images per forward (an injected fault),
    noting each call's images per forward and BatchNorm momentum."""
    real = optim.train_step

    def step(model, optimizer, scaler, images, labels, config):  # type: ignore[no-untyped-def]
        per_forward = images.shape[0] // config["train"]["accum_steps"]
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        seen.append((per_forward, bn.momentum))
        if per_forward > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, optimizer, scaler, images, labels, config)

    return step


@pytest.fixture(scope="module")
def tree(module_dir: Path) -> Path:
    return write_ade_tree(module_dir / "ade" / "ADEChallengeData2016", num_train=8, num_val=2, size=(48, 40))


def overrides(tree: Path, *more: str) -> list[str]:
    """A def-conv-v2 run (demo.yaml) on 32x32 crops with a batch of 8, for seconds on a CPU."""
    return tiny_run(tree, "train.batch_size=8", "train.iters=2", "train.val_interval=2", "train.ckpt_interval=2", *more)


def test_auto_finds_the_fewest_micro_batches_that_fit_records_them_and_a_resume_keeps_them(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """8 images per forward run out of memory, 4 fit: auto takes 2 micro-batches, says why, and config.yaml and the
    checkpoint hold 2; BatchNorm's momentum is scaled for 2; the resume runs no trial and keeps 2."""
    seen: list[tuple[int, float]] = []
    monkeypatch.setattr(memory, "TRIAL_DEVICES", ("cuda", "cpu"))  # the trials, on the CPU
    step = oom_above(4, seen)
    monkeypatch.setattr(memory, "train_step", step)  # the trial steps
    monkeypatch.setattr(train, "train_step", step)  # the run's
    work_dir = tmp_path / "run"
    assert train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree)]) == 0
    out = capsys.readouterr().out
    assert "4 per forward x 2 micro-batch(es)" in out
    assert "train.accum_steps=auto: 4 images per forward x 2 micro-batch(es), 8 did not fit in" in out
    assert "train.accum_steps=auto runs as 2" in out
    assert [p for p, _ in seen[:3]] == [8, 4, 4]  # a trial at 8 (out of memory), two at 4; then the run
    assert [m for _, m in seen[3:]] == pytest.approx([1 - 0.9 ** 0.5] * 2)  # the 2 iterations
    assert yaml.safe_load((work_dir / "config.yaml").read_text())["train"]["accum_steps"] == 2
    assert load_checkpoint(work_dir / "last.pt")["config"]["train"]["accum_steps"] == 2

    seen.clear()
    args = ["--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree, "train.iters=4"), "--resume", "auto"]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "train.accum_steps=auto, kept from the checkpoint" in out and [p for p, _ in seen] == [4, 4]  # no trial
    last = load_checkpoint(work_dir / "last.pt")
    assert last["iteration"] == 4 and last["config"]["train"]["accum_steps"] == 2
    assert all("train.accum_steps" not in change["changes"] for change in last["config_changes"])


def test_auto_that_fits_nothing_is_the_out_of_memory_paragraph(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "TRIAL_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(memory, "train_step", oom_above(1, []))
    config = load_config("demo.yaml", ["train.batch_size=8", "data.crop_size=16", "model.num_classes=5"])
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as err:
        memory.choose_accum_steps(model, build_optimizer(model, config), NO_SCALER, config, 1, False)
    text = str(err.value)
    assert text.startswith("out of memory in training (the trial steps of train.accum_steps=auto) on the CPU")
    assert "2 images per forward (train.batch_size=8 over 1 process(es) x train.accum_steps=4)" in text
    assert "train.accum_steps=" not in text.split("Continue with")[1]  # 4 is the most that splits 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the trials left no trace


def _rank(rank: int, port: int, limits: tuple[int, int], folder: Path) -> None:
    """One process of a 2-process gloo group: trial steps with its own out-of-memory threshold."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        memory.TRIAL_DEVICES = ("cuda", "cpu")
        seen: list[tuple[int, float]] = []
        memory.train_step = oom_above(limits[rank], seen)
        config = load_config("demo.yaml", ["train.batch_size=16", "data.crop_size=16", "model.num_classes=5"])
        model = Tiny()
        chosen, why = memory.choose_accum_steps(model, build_optimizer(model, config), NO_SCALER, config, 2, False)
        (folder / f"{rank}.json").write_text(json.dumps([chosen, why, [p for p, _ in seen]]), encoding="utf-8")
    finally:
        shutdown()


def test_under_torchrun_every_rank_takes_the_largest_number_any_rank_needed(tmp_path: Path) -> None:
    """Two processes (gloo), 8 images each: rank 0 fits all 8 at once, rank 1 only 2 per forward; both take 4."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork_ok = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()  # as tests/test_metric.py
    mp.start_processes(_rank, args=(port, (8, 2), tmp_path), nprocs=2, start_method="fork" if fork_ok else "spawn")
    (chosen0, why0, seen0), (chosen1, why1, seen1) = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert chosen0 == chosen1 == 4
    assert seen0 == [8, 8] and seen1 == [8, 4, 2, 2]  # each rank's own trials
    assert why0.startswith("auto: 2 images per forward x 4 micro-batch(es), the most any of the 2 processes needed "
                           "(the whole 8 fit in ") and why0.endswith(" GiB here)")
    assert why1.startswith("auto: 2 images per forward x 4 micro-batch(es), 4 did not fit in ")


def test_batchnorm_running_statistics_move_once_per_step() -> None:
    """Two micro-batches with the whole batch's statistics move the running mean as one forward of the batch does:
    the momentum is 1 - 0.9 ** (1 / 2) per micro-batch (unscaled, the step would move it 1.9 times as far)."""
    gen = torch.Generator().manual_seed(0)
    half = torch.randn(2, 3, 16, 16, generator=gen) * 3 + 1
    images, labels = torch.cat([half, half]), torch.randint(0, 5, (4, 16, 16), generator=gen)
    moved = {}
    for accum in (1, 2):
        config = load_config("demo.yaml", ["model.num_classes=5", f"train.accum_steps={accum}", "train.batch_size=4"])
        model = Tiny()
        optim.scale_batchnorm_momentum(model, accum)
        optim.train_step(model, build_optimizer(model, config), NO_SCALER, images, labels, config)
        moved[accum] = model.bn.running_mean.clone(), model.bn.running_var.clone()
    torch.testing.assert_close(moved[2][0], moved[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moved[2][1], moved[1][1], rtol=1e-2, atol=0)  # unbiased variance over 512 vs 1024 values
    assert moved[1][0].abs().max() > 0.05  # the statistics did move


@pytest.mark.parametrize(("batch", "accum", "processes", "synced", "refused"), [
    (16, 8, 1, False, False),  # 2 per forward
    (16, 16, 1, False, True),  # 1 per forward
    (1, 1, 1, False, True),
    (4, 2, 2, False, True),  # 1 per forward in each process
    (4, 2, 2, True, False),  # ... but SyncBatchNorm takes its statistics over both processes' images
    (16, 3, 1, False, True),  # does not divide
])
def test_batchnorm_needs_two_images_per_forward(batch: int, accum: int, processes: int, synced: bool,
                                                refused: bool) -> None:
    why = batch_split_error(batch, accum, processes, synced)
    assert (why is not None) is refused
    if why is not None:
        assert f"train.batch_size={batch}" in why and f"train.accum_steps={accum}" in why


def test_a_tiny_crop_with_one_image_per_forward_is_refused_at_load(tree: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """data.crop_size=8 with train.batch_size=1 crashed in BatchNorm with a traceback; now one paragraph at load."""
    args = ["--config", "demo.yaml", "--work-dir", str(tmp_path / "run"), *overrides(tree, "data.crop_size=8",
                                                                                      "train.batch_size=1")]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "train.batch_size=1" in err and "BatchNorm needs its statistics over at least 2 images" in err
    assert not (tmp_path / "run").exists()


def test_out_of_memory_on_the_cpu_is_the_paragraph(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    """The CPU allocator's refusal (an injected fault, torch's message) is the same paragraph as CUDA's."""

    def refused(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train, "train_step", refused)
    args = ["--config", "demo.yaml", "--work-dir", str(tmp_path / "run"), *overrides(tree, "train.accum_steps=1")]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DefaultCPUAllocator" not in err
    assert "error: out of memory in training at iteration 0 on the CPU with" in err
    assert "8 images per forward (train.batch_size=8 over 1 process(es) x train.accum_steps=1)" in err
    assert "train.accum_steps=2 (4 images per forward" in err and "train.amp" not in err  # no autocast on the CPU


def test_out_of_memory_in_validation_is_the_paragraph_and_the_training_is_saved(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Validation at iteration 2 runs out of memory (an injected fault): last.pt holds iteration 2 and the paragraph
    proposes what shrinks a validation (sliding windows), not accumulation, which does not touch it."""

    def out_of_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (injected)")
        yield

    monkeypatch.setattr(evaluation, "predictions", out_of_memory)
    work_dir = tmp_path / "run"
    assert train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree)]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and line.startswith("error: out of memory in validation at iteration 2 on the CPU")
    assert "Continue with --resume auto and eval.mode=slide (windows of 512 pixels" in line
    assert "accum_steps=" not in line.split("Continue")[1]
    assert load_checkpoint(work_dir / "last.pt")["iteration"] == 2
