"""train.py on a tiny ADE-format tree: logging, checkpoints, resume after SIGTERM, DDP, faults."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_run, write_ade_tree

import train
from configs import load_config
from data.transforms import normalize_batch
from engine import loss as loss_module
from engine import evaluation, optim
from engine.checkpoint import load_checkpoint
from engine.optim import parameter_groups, poly_factor
from engine.workdir import check_work_dir
from models import triton_support
from models.segmentor import build_model

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(tree: Path, iters: int = 6) -> list[str]:
    """``tiny_run`` with a batch of 2, a validation and last.pt every 2 iterations (TensorBoard's panels and offset
    figure off: only the reference run draws them)."""
    return tiny_run(tree, "train.batch_size=2", f"train.iters={iters}", "train.val_interval=2", "train.ckpt_interval=2")


@pytest.fixture(scope="module")
def reference_run(tree: Path, module_dir: Path) -> Path:
    """One uninterrupted 6-iteration run, shared by the tests that inspect a finished run."""
    work_dir = module_dir / "reference"
    assert train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *tiny_overrides(tree), "train.tb_images=1"]) == 0
    return work_dir


def test_checkpoints_hold_the_full_training_state(reference_run: Path) -> None:
    last = load_checkpoint(reference_run / "last.pt")  # weights_only=True inside
    assert last["iteration"] == 6
    assert set(last) >= {"model", "optimizer", "scaler", "iteration", "validated", "best_miou", "config",
                         "config_changes", "environment"}
    assert last["validated"] == 6 and last["config"]["train"]["amp"] == "none"  # the precision as it ran
    assert last["config"]["model"]["deform"]["version"] == 2
    best = load_checkpoint(reference_run / "best.pt")
    assert best["best_miou"] == pytest.approx(last["best_miou"])
    same_file = (reference_run / "best.pt").stat().st_ino == (reference_run / "last.pt").stat().st_ino
    assert same_file == (best["iteration"] == 6)  # a best at the end is last.pt's file under a second name
    assert not list(reference_run.glob("*.tmp"))
    tcfg = last["config"]["train"]  # the learning rate of the last step: the poly schedule's at iteration 5
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(tcfg["lr"] * poly_factor(5, tcfg))


def test_tensorboard_holds_the_logged_scalars(reference_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/loss_main", "train/loss_aux", "train/lr", "train/images_per_s",
                "train/data_wait_share", "val/mIoU", "val/aAcc", "val/mAcc"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/mIoU")] == [2, 4, 6]
    tcfg = load_checkpoint(reference_run / "last.pt")["config"]["train"]  # logged: the learning rate of the last step
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lrs == pytest.approx({k: tcfg["lr"] * poly_factor(k - 1, tcfg) for k in range(1, 7)}) and lrs[6] < lrs[1]
    assert any(t.startswith("val_class_iou/") for t in tags["scalars"])
    assert any(t.startswith("val_panels/") for t in tags["images"])
    import io

    import numpy as np
    from PIL import Image

    panel = np.asarray(Image.open(io.BytesIO(events.Images("val_panels/0")[-1].encoded_image_string)))
    band, third = panel[:14], panel.shape[1] // 3  # the titles: dark text on white above each strip
    assert (band > 200).mean() > 0.8 and all((band[:, i * third:(i + 1) * third] < 60).any() for i in range(3))
    assert sum(t.startswith("offset_magnitude/") for t in tags["histograms"]) == 3
    assert sum(t.startswith("mask/") for t in tags["histograms"]) == 3
    assert "offsets/sampling_locations" in tags["images"]


def test_nonfinite_loss_stops_with_the_iteration_and_keeps_last_good(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real_loss, calls = loss_module.compute_loss, []

    def loss_that_breaks(outputs, labels, aux_weight, op, norm):  # type: ignore[no-untyped-def]
        losses = real_loss(outputs, labels, aux_weight, op, norm)
        calls.append(1)
        if len(calls) == 3:  # the third iteration
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(optim, "compute_loss", loss_that_breaks)
    work_dir = tmp_path / "nan"
    code = train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *tiny_overrides(tree)])
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite" in err and "iteration 3" in err and "Traceback" not in err
    assert load_checkpoint(work_dir / "last.pt")["iteration"] == 2


def test_work_dir_of_another_run_is_refused(tree: Path, reference_run: Path, capsys: pytest.CaptureFixture) -> None:
    code = train.main(["--config", "norm-conv.yaml", "--work-dir", str(reference_run), *tiny_overrides(tree)])
    err = capsys.readouterr().err
    assert code == 2 and "different config" in err and "--resume" in err
    code = train.main(["--config", "demo.yaml", "--work-dir", str(reference_run), *tiny_overrides(tree), "train.tb_images=1"])
    assert code == 2 and "already holds a run of this config" in capsys.readouterr().err


def test_missing_dataset_root_names_layout_and_download(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    overrides = [f"data.root={tmp_path / 'nowhere'}", "data.dataset=ade20k"]
    code = train.main(["--config", "demo.yaml", "--work-dir", str(tmp_path / "run"), "--device", "cpu", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert "download_ade20k.py" in err and "annotations" in err and "Traceback" not in err
    # the failed start saved no checkpoint, so the same work dir may be used once the data is there
    config = load_config("demo.yaml", overrides)
    check_work_dir(tmp_path / "run", config)


def test_overfitting_a_tiny_batch_reaches_90_percent_pixel_accuracy(tree: Path) -> None:
    torch.manual_seed(0)
    config = load_config("demo.yaml", tiny_overrides(tree)[1:])  # the overrides after --device
    model, _ = build_model(config)
    model.train()
    optimizer = torch.optim.SGD(parameter_groups(model, config["train"], 1.0), lr=0.01, momentum=0.9)
    from data.dataset import build_train_loader

    images, labels, valid = next(iter(build_train_loader(config, 0, 1, start_iter=0)))
    images, labels = normalize_batch(images, valid), labels.long()
    for _ in range(60):
        outputs = model(images)
        loss = loss_module.compute_loss(outputs, labels, aux_weight=0.4)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logits = F.interpolate(outputs["out"], size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = labels != 255
    accuracy = (logits.argmax(1) == labels)[valid].float().mean().item()
    assert accuracy > 0.9, accuracy


def test_poly_schedule_follows_the_recipe() -> None:
    tcfg = {"lr": 0.01, "min_lr": 1e-4, "iters": 100, "poly_power": 0.9}
    assert poly_factor(0, tcfg) == pytest.approx(1.0)
    assert poly_factor(100, tcfg) * 0.01 == pytest.approx(1e-4)
    assert poly_factor(50, tcfg) * 0.01 == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)


def test_op_choices_are_checked_and_reported(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code = train.main(["--config", "demo.yaml", "--work-dir", str(tmp_path / "a"), *tiny_overrides(tree), "train.loss_op=fused"])
    assert code == 2 and "train.loss_op" in capsys.readouterr().err
    # Where Triton cannot run (a CPU without TRITON_INTERPRET), asking for it says that the references run instead,
    # and the run's record holds what ran.
    monkeypatch.setattr(triton_support, "triton_available", lambda device: False)
    overrides = [*tiny_overrides(tree, iters=1), "model.deform_op=triton", "train.loss_op=triton"]
    assert train.main(["--config", "demo.yaml", "--work-dir", str(tmp_path / "b"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "model.deform_op=triton runs as reference" in out and "train.loss_op=triton runs as reference" in out
    assert load_checkpoint(tmp_path / "b" / "last.pt")["config"]["model"]["deform_op"] == "reference"


@pytest.mark.parametrize("loss_op", ["reference", "triton"])
def test_loss_ignores_255_and_survives_an_all_ignored_batch(loss_op: str) -> None:
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_module.upsample_cross_entropy(logits, labels, loss_op)

    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    assert loss(logits, labels).item() == 0.0
    labels[0, :4] = 1
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, labels, ignore_index=255)
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_fused_training_loss_equals_the_reference() -> None:
    """compute_loss with train.loss_op=triton: same total loss and head gradients as the reference."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 150, (2, 32, 32), generator=gen)
    labels[:, :5] = 255
    results = []
    for loss_op in ("reference", "triton"):
        outputs = {k: torch.randn(2, 150, 4, 4, generator=torch.Generator().manual_seed(i)).requires_grad_()
                   for i, k in enumerate(("out", "aux"))}
        losses = loss_module.compute_loss(outputs, labels, aux_weight=0.4, op=loss_op)
        losses["total"].backward()
        results.append([losses["total"].detach(), outputs["out"].grad, outputs["aux"].grad])
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-7)


def test_bad_label_found_by_a_loader_worker_is_one_clean_message(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    import numpy as np
    from PIL import Image

    bad_tree = tmp_path / "ADEChallengeData2016"
    shutil.copytree(tree, bad_tree)
    for png in (bad_tree / "annotations" / "training").glob("*.png"):
        Image.fromarray(np.full((40, 48), 200, np.uint8)).save(png)
    overrides = [*tiny_overrides(bad_tree), "data.num_workers=1"]
    code = train.main(["--config", "demo.yaml", "--work-dir", str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]  # one paragraph, after the bar
    assert "200" in line and "ADE_train_" in line and "Traceback" not in err and "Training stopped at iteration 0" in line


def test_cuda_out_of_memory_proposes_accumulation_not_a_smaller_batch(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def out_of_memory(*args):  # type: ignore[no-untyped-def]
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train_step", out_of_memory)
    code = train.main(["--config", "demo.yaml", "--work-dir", str(tmp_path / "oom"), *tiny_overrides(tree)])
    err = capsys.readouterr().err
    assert code == 2 and "out of memory" in err and "Traceback" not in err
    assert "train.batch_size=2 over 1 process(es) x train.accum_steps=1" in err  # auto: 1 on the CPU
    assert "train.batch_size=1" not in err and "train.accum_steps=2" not in err  # BatchNorm needs 2 per forward


@pytest.mark.parametrize("error", [RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated."),
                                   ConnectionResetError(104, "Connection reset by peer")], ids=["worker", "reset"])
def test_loader_workers_ended_by_the_stop_signal_are_the_stop(error: Exception, tree: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """A signal to the process group ends the loader workers too; what the main process then reads from them (a
    worker's error, or a connection reset while a batch was being passed) is the stop: last.pt saved, exit 0."""
    real = train.build_train_loader

    class DiesWithTheSignal:
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            self.loader = real(*args, **kwargs)
            self.dataset = self.loader.dataset

        def __iter__(self):  # type: ignore[no-untyped-def]
            for i, batch in enumerate(self.loader):
                if i == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                    raise error
                yield batch

    monkeypatch.setattr(train, "build_train_loader", DiesWithTheSignal)
    work_dir = tmp_path / "run"
    assert train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *tiny_overrides(tree)]) == 0
    assert "stopped by SIGTERM at iteration 2 (saved)" in capsys.readouterr().out
    assert load_checkpoint(work_dir / "last.pt")["iteration"] == 2


def signal_the_group_when(work_dir: Path, overrides: list[str], ready: Callable[[int], bool]) -> str:
    """Start train.py in its own process group; once ``ready(pid)`` holds, SIGTERM the whole group, as a scheduler
    does; return stdout after checking that the run exited with 0."""
    command = [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), *overrides]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not ready(proc.pid) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return out


def children(pid: int) -> int:
    """How many child processes ``pid`` has (Linux /proc; a thread may end while it is read)."""
    count = 0
    for file in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            count += len(file.read_text().split())
        except OSError:
            pass
    return count


def test_sigterm_to_the_whole_process_group_with_loader_workers(tree: Path, tmp_path: Path) -> None:
    """A scheduler signals every process of the job: the workers must outlive the final save."""
    work_dir = tmp_path / "group"
    out = signal_the_group_when(work_dir, [*tiny_overrides(tree, iters=20), "data.num_workers=2"],
                                lambda pid: (work_dir / "last.pt").exists())
    stopped_at = load_checkpoint(work_dir / "last.pt")["iteration"]
    assert 2 <= stopped_at < 20 and f"stopped by SIGTERM at iteration {stopped_at}" in out


def test_sigterm_to_the_whole_process_group_during_validation(tmp_path: Path) -> None:
    """The scheduler's signal reaches the training process and all four loader workers (two training, two
    validation) while validation runs: validation is cut short, last.pt is saved at that iteration."""
    tree = write_ade_tree(tmp_path / "ADEChallengeData2016", num_train=4, num_val=40, size=(48, 40))
    work_dir = tmp_path / "group"
    # the validation loader's two workers start with the first validation, at iteration 2
    out = signal_the_group_when(work_dir, [*tiny_overrides(tree, iters=4), "data.num_workers=2", "data.scale=[96,96]"],
                                lambda pid: children(pid) >= 4)
    assert "stopped by SIGTERM at iteration 2" in out and "val mIoU" not in out, out  # no validation finished
    assert load_checkpoint(work_dir / "last.pt")["iteration"] == 2


def test_refused_resume_leaves_the_record_alone(tree: Path, reference_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """A --resume that changes the model is refused before anything is written: config.yaml stays the run's."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    before = (run / "config.yaml").read_text()
    code = train.main(["--config", "demo.yaml", "--work-dir", str(run), "--resume", *tiny_overrides(tree),
                       "model.deform.version=0"])
    assert code == 2 and "model.deform.version" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before and not (run / ".lock").exists()


def test_a_resume_that_regroups_the_parameters_names_the_key(tree: Path, reference_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """train.no_decay_norm_bias may change on resume, but not the optimizer's parameter groups: the refusal names
    that key and its two values (it used to blame model.deform.offset_lr_mult, which had not changed)."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    overrides = [*tiny_overrides(tree, iters=8), "train.no_decay_norm_bias=true"]
    assert train.main(["--config", "demo.yaml", "--work-dir", str(run), "--resume", *overrides]) == 2
    err = capsys.readouterr().err
    assert "train.no_decay_norm_bias False -> True groups the parameters differently" in err
    assert "offset_lr_mult" not in err and "Traceback" not in err


def test_a_checkpoint_without_training_state_is_refused_by_name(tree: Path, reference_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """A weights-only file as last.pt (model and config, as load_checkpoint requires): one paragraph naming the file
    and the missing entries, not a KeyError."""
    run = tmp_path / "weights_only"
    run.mkdir()
    last = load_checkpoint(reference_run / "last.pt")
    torch.save({"model": last["model"], "config": last["config"]}, run / "last.pt")
    assert train.main(["--config", "demo.yaml", "--work-dir", str(run), "--resume", *tiny_overrides(tree)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'} holds no 'optimizer', 'scaler', 'iteration'" in err and "Traceback" not in err


def test_resume_applies_a_new_learning_rate_and_records_it(tree: Path, reference_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """Continuing a finished 6-iteration run to 8 with another lr: the schedule of the new config runs from
    iteration 6, the change is recorded, and the validation logged at iteration 6 is kept in TensorBoard."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    overrides = [*tiny_overrides(tree, iters=8), "train.lr=0.05", "train.min_lr=0.001"]
    assert train.main(["--config", "demo.yaml", "--work-dir", str(run), "--resume", *overrides]) == 0
    assert "resumed at iteration 6 with changed settings" in capsys.readouterr().out
    last = load_checkpoint(run / "last.pt")
    assert last["iteration"] == 8 and last["config"]["train"]["lr"] == 0.05
    (change,) = last["config_changes"]
    assert change["iteration"] == 6 and change["changes"]["train.lr"] == [0.02, 0.05]
    tcfg = last["config"]["train"]  # the new schedule at the last step, iteration 7
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.05 * poly_factor(7, tcfg))
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/mIoU")] == [2, 4, 6, 8]


def test_any_artefact_marks_the_work_dir_as_taken(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for artefact in ("best.pt", "tb"):
        run = tmp_path / artefact.replace(".", "_")
        run.mkdir()
        (run / artefact).mkdir() if artefact == "tb" else (run / artefact).write_bytes(b"x")
        assert train.main(["--config", "demo.yaml", "--work-dir", str(run), *tiny_overrides(tree)]) == 2
        assert "already holds" in capsys.readouterr().err


def test_a_running_training_locks_its_work_dir(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json
    import socket

    run = tmp_path / "locked"
    run.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        assert train.main(["--config", "demo.yaml", "--work-dir", str(run), *tiny_overrides(tree, iters=1)]) == 2
        assert "in use by process" in capsys.readouterr().err
    finally:
        alive.kill()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))  # stale
    assert train.main(["--config", "demo.yaml", "--work-dir", str(run), *tiny_overrides(tree, iters=1)]) == 0
    assert not (run / ".lock").exists()


def test_sigterm_during_validation_stops_it_and_saves(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A stop signal that arrives while validation runs ends validation after the current image and saves
    last.pt at that iteration, instead of finishing a validation that may take longer than a scheduler waits."""
    real, seen = evaluation.predictions, []

    def signal_during_validation(*args, **kwargs):  # type: ignore[no-untyped-def]
        for item in real(*args, **kwargs):
            seen.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler train.main installed records it
            yield item

    monkeypatch.setattr(evaluation, "predictions", signal_during_validation)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = train.main(["--config", "demo.yaml", "--work-dir", str(tmp_path / "run"), *tiny_overrides(tree)])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert code == 0 and len(seen) == 1  # one image of two, then the stop
    assert "stopped by SIGTERM at iteration 2" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2
    monkeypatch.undo()
    args = ["--config", "demo.yaml", "--work-dir", str(tmp_path / "run"), *tiny_overrides(tree, iters=2), "--resume"]
    assert train.main(args) == 0 and "iter 2: val mIoU" in capsys.readouterr().out  # the cut validation, made now
    assert load_checkpoint(tmp_path / "run" / "last.pt")["validated"] == 2


def test_a_bad_last_update_reaches_no_checkpoint(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    """The update of iteration 4 makes a weight NaN while every loss up to it was finite: the run stops before
    validating or saving at 4, and last.pt keeps iteration 2 (the advised --resume starts from good weights)."""
    real, calls = train.train_step, []

    def step_that_breaks_the_weights(model, *args):  # type: ignore[no-untyped-def]
        losses = real(model, *args)
        calls.append(1)
        if len(calls) == 4:  # the step that ends at iteration 4
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return losses

    monkeypatch.setattr(train, "train_step", step_that_breaks_the_weights)
    work_dir = tmp_path / "nan_weights"
    code = train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *tiny_overrides(tree)])
    err = capsys.readouterr().err
    assert code == 1 and "the weights became non-finite" in err and "newest checkpoint holds iteration 2" in err
    assert load_checkpoint(work_dir / "last.pt")["iteration"] == 2
    assert load_checkpoint(work_dir / "best.pt")["iteration"] == 2


def test_a_work_dir_that_is_a_file_or_unwritable_is_one_message(tree: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert train.main(["--config", "demo.yaml", "--work-dir", str(blocker), *tiny_overrides(tree)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert train.main(["--config", "demo.yaml", "--work-dir", str(blocker / "run"), *tiny_overrides(tree)]) == 2
    err = capsys.readouterr().err
    assert "cannot write to" in err and "--work-dir" in err and "Traceback" not in err


def test_an_unreadable_image_during_training_saves_then_names_the_file(tree: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """A training image truncated after the start: one message naming it and the --check command, after
    last.pt was saved at the iteration reached (here the file is read first at iteration 3)."""
    import shutil

    from data.dataset import TrainSampler

    bad_tree = tmp_path / "ADEChallengeData2016"
    shutil.copytree(tree, bad_tree)
    images = sorted((bad_tree / "images" / "training").glob("*.jpg"))
    order = [i for i, _ in itertools.islice(iter(TrainSampler(len(images), 2, 0, 1, seed=0)), 12)]
    first_use = {}
    for position, index in enumerate(order):
        first_use.setdefault(index, position // 2)  # the iteration that reads it first
    victim = max(first_use, key=first_use.get)
    assert first_use[victim] >= 2, "the tiny tree's sampler order changed: choose another victim"
    images[victim].write_bytes(images[victim].read_bytes()[:100])  # truncated JPEG
    work_dir = tmp_path / "run"
    code = train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *tiny_overrides(bad_tree)])
    err = capsys.readouterr().err
    assert code == 2 and images[victim].name in err and "--check" in err and "Traceback" not in err
    assert load_checkpoint(work_dir / "last.pt")["iteration"] == first_use[victim]


def test_a_failed_start_leaves_the_work_dir_usable(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A start that fails on the data (an image without its annotation) writes no run artefact: once the data
    are fixed, the same command starts in the same work dir."""
    import shutil

    broken = tmp_path / "ADEChallengeData2016"
    shutil.copytree(tree, broken)
    label = next((broken / "annotations" / "training").glob("*.png"))
    moved = tmp_path / label.name
    label.rename(moved)
    command = ["--config", "demo.yaml", "--work-dir", str(tmp_path / "run"), *tiny_overrides(broken, iters=1)]
    assert train.main(command) == 2 and "no annotation" in capsys.readouterr().err
    assert not [p.name for p in (tmp_path / "run").iterdir()]
    moved.rename(label)
    assert train.main(command) == 0
