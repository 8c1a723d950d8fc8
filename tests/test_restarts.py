"""One command line for starts and restarts: --resume auto after SIGKILL, SIGTERM and SIGUSR1, torchrun's restart
of a killed worker, the work-dir lock across hosts, and gradient accumulation (same update, bitwise resume)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run, write_ade_tree
from torch import nn

import train
from configs import UserError, load_config
from engine import optim, signals
from data.dataset import TrainSampler
from engine.checkpoint import load_checkpoint
from engine.optim import build_optimizer
from engine.lock import Lock

REPO = Path(__file__).resolve().parents[1]


def overrides(tree: Path, iters: int) -> list[str]:
    """A def-conv-v2 run on 32x32 crops, batch 4 in two micro-batches of 2, a checkpoint every 2 iterations."""
    return tiny_run(tree, "train.batch_size=4", "train.accum_steps=2", f"train.iters={iters}", "train.val_interval=2",
                    "train.ckpt_interval=2")


def wait_for_a_new_checkpoint(proc: subprocess.Popen, last: Path, after: float) -> None:
    """Wait until ``last`` was written after the time ``after`` (or the process ended)."""
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and not (last.exists() and last.stat().st_mtime > after):
        time.sleep(0.02)


def test_one_command_line_starts_and_restarts_after_every_kind_of_stop(tree: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """A start that died before its first checkpoint, SIGKILL, SIGTERM and SIGUSR1: the same command line carries
    the run to its end, with the weights of an uninterrupted run (gradient accumulation on, bitwise)."""
    work_dir = tmp_path / "run"
    args = ["--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree, iters=16), "--resume", "auto"]

    def dies_at_the_first_step(*step_args):  # type: ignore[no-untyped-def]
        raise UserError("a crash before the first checkpoint")

    monkeypatch.setattr(train, "train_step", dies_at_the_first_step)
    assert train.main(args) == 2
    assert (work_dir / "config.yaml").is_file() and not (work_dir / "last.pt").exists()
    monkeypatch.undo()
    capsys.readouterr()

    last, outputs = work_dir / "last.pt", []
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1):
        before = last.stat().st_mtime if last.exists() else 0.0
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for_a_new_checkpoint(proc, last, before)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0), err[-2000:]
        outputs.append(out)
    assert "starting over" in outputs[0] and "holds only the record of a start" in outputs[0]
    assert "stopped by SIGTERM" in outputs[1] and "stopped by SIGUSR1" in outputs[2]
    stopped_at = load_checkpoint(last)["iteration"]
    assert 2 < stopped_at < 16, "the runs did not stop where the test meant them to"

    assert train.main(args) == 0
    assert f"resumed at iteration {stopped_at}" not in capsys.readouterr().out  # nothing changed: no change line
    resumed = load_checkpoint(last)
    reference = tmp_path / "reference"
    assert train.main(["--config", "demo.yaml", "--work-dir", str(reference), *overrides(tree, iters=16),
                       "train.val_interval=16", "train.ckpt_interval=16"]) == 0  # intervals change no weight
    uninterrupted = load_checkpoint(reference / "last.pt")
    assert resumed["iteration"] == 16 and resumed["validated"] == 16 and resumed["config"]["train"]["accum_steps"] == 2
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def worker_pids(launcher: int) -> list[int]:
    """The processes torchrun started (children of the launcher, Linux /proc)."""
    pids = []
    for file in Path(f"/proc/{launcher}/task").glob("*/children"):
        try:
            pids += [int(p) for p in file.read_text().split()]
        except OSError:
            pass
    return pids


def test_torchrun_restarts_a_killed_worker_and_the_run_finishes(tree: Path, tmp_path: Path) -> None:
    """torchrun --max-restarts=1 with gradient accumulation over 2 processes: a worker killed after the first
    checkpoint brings both down, torchrun starts them again with the same arguments, and --resume auto continues."""
    work_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
               "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree, iters=8),
               "train.batch_size=8", "--resume", "auto"]  # 2 images per forward in each process (BatchNorm)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_a_new_checkpoint(proc, work_dir / "last.pt", 0.0)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2 and proc.poll() is None, "the run ended before a worker could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("2 process(es)") == 2  # the first start and the restart
    last = load_checkpoint(work_dir / "last.pt")
    assert last["iteration"] == 8 and not any(k.startswith("module.") for k in last["model"])


def sbatch_script() -> str:
    """scripts/train.sbatch, the SLURM job of docs/gpu-and-clusters.md, as it stands."""
    return (REPO / "scripts" / "train.sbatch").read_text(encoding="utf-8")


def job_processes(shell: int) -> list[int]:
    """The batch shell and every process under it, workers in sessions of their own included: what SLURM signals
    when a signal goes to the whole job (it finds a job's processes by its cgroup, not by session)."""
    found, i = [shell], 0
    while i < len(found):
        found += worker_pids(found[i])
        i += 1
    return found


def test_the_sbatch_script_stops_cleanly_on_each_signal_a_job_gets(tree: Path, tmp_path: Path) -> None:
    """scripts/train.sbatch as SLURM runs it (bash, in the clone, with its environment; a stub for scontrol),
    with 2 CPU processes and the demo config: SIGUSR1 to the batch shell (--signal=B:USR1), SIGUSR1 to every process
    of the job, SIGTERM to every process of the job. Each time the training processes save and exit 0, torchrun and
    the script exit 0, the log holds no traceback, and SIGUSR1 alone requeues the job."""
    script = sbatch_script().replace("--nproc_per_node=4", "--nproc_per_node=2").replace("def-conv-v2", "demo")
    clone, stubs, work_dir, calls = tmp_path / "clone", tmp_path / "bin", tmp_path / "run", tmp_path / "scontrol.calls"
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "activate").write_text(f'PATH="{Path(sys.executable).parent}:$PATH"\n')
    (clone / "train.py").symlink_to(REPO / "train.py")
    (clone / "train.sbatch").write_text(script)
    stubs.mkdir()
    (stubs / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (stubs / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "OMP_NUM_THREADS": "1"}
    args = ["--work-dir", str(work_dir), *overrides(tree, iters=100), "train.batch_size=4", "train.accum_steps=1",
            "train.val_interval=100"]  # 2 images per forward in each process (BatchNorm)
    log = tmp_path / "slurm-demo.log"
    signals = (("shell", signal.SIGUSR1, 1), ("job", signal.SIGUSR1, 2), ("job", signal.SIGTERM, 2))
    for launch, (whom, sig, requeues) in enumerate(signals):
        before = (work_dir / "last.pt").stat().st_mtime if (work_dir / "last.pt").exists() else 0.0
        with open(log, "w") as output:
            proc = subprocess.Popen(["bash", "train.sbatch", *args], cwd=clone, stdout=output, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
            wait_for_a_new_checkpoint(proc, work_dir / "last.pt", before)
            for pid in [proc.pid] if whom == "shell" else job_processes(proc.pid):
                with contextlib.suppress(ProcessLookupError):  # gone since the listing (the shell's trap forwards too)
                    os.kill(pid, sig)
            code = proc.wait(timeout=300)
        text = log.read_text()
        stopped = re.search(rf"stopped by {sig.name} at iteration (\d+) \(saved\)", text)
        assert code == 0 and stopped and "Traceback" not in text, text[-3000:]
        assert load_checkpoint(work_dir / "last.pt")["iteration"] == int(stopped.group(1))
        assert calls.read_text().splitlines() == ["requeue 4242"] * requeues
        assert ("resuming" in text) == (launch > 0)  # the requeued job continues


def test_torchrun_agrees_on_a_stop_during_validation_and_on_a_file_one_rank_cannot_read(tmp_path: Path) -> None:
    """Two processes: SIGTERM to torchrun while validation runs (torchrun forwards it to each rank's process group,
    loader workers included) saves last.pt at that iteration (torchrun itself then ends with its SignalException,
    exit 1); the same command then makes the validation the stop
    cut short, and a training image that rank 1 alone reads first, truncated, ends both ranks with last.pt at the
    last step and the file named."""
    tree = write_ade_tree(tmp_path / "ADEChallengeData2016", num_train=40, num_val=80, size=(48, 40))
    order = [i for i, _ in itertools.islice(iter(TrainSampler(40, 4, 1, 2, seed=0)), 2 * 10)]  # rank 1, epoch 0
    victim, at = order[2 * 4], 4  # the first image rank 1 reads at iteration 4 (each image once per epoch)
    work_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree, iters=8), "data.num_workers=1",
               "train.accum_steps=1", "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300  # validation: each rank has its training and its validation loader's worker
    while proc.poll() is None and time.time() < deadline and not any(
            len(worker_pids(rank)) >= 2 for rank in worker_pids(proc.pid)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert "stopped by SIGTERM at iteration 2" in out and "val mIoU" not in out, err[-3000:]
    assert proc.returncode == 1 and "SignalException" in err  # torchrun's own ending (docs/gpu-and-clusters.md)
    assert load_checkpoint(work_dir / "last.pt")["iteration"] == 2

    image = sorted((tree / "images" / "training").glob("*.jpg"))[victim]
    image.write_bytes(image.read_bytes()[:100])
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode != 0 and "iter 2: val mIoU" in result.stdout  # the validation the stop cut short
    assert image.name in result.stderr and f"Training stopped at iteration {at}" in result.stderr
    assert load_checkpoint(work_dir / "last.pt")["iteration"] == at


def test_stop_signals_ask_once_and_a_second_ctrl_c_stops_at_once() -> None:
    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        stop = signals.catch_stop_signals()
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM):  # a scheduler and a launcher both signalling
            os.kill(os.getpid(), sig)
        assert stop.reason == "SIGUSR1" and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the next Ctrl-C ends the process
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_lock_from_another_host_is_stale_once_nobody_refreshed_it_for_five_minutes(tmp_path: Path) -> None:
    """Taken over at once (a lock from another host that is not yet stale is waited for: tests/test_operations.py)."""
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"pid": 1, "host": "another-node"}))
    old = time.time() - Lock.stale_s - 1
    os.utime(path, (old, old))  # its owner stopped refreshing it: a node that crashed
    with Lock(path, "the work dir"):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    assert not path.exists()


def test_the_holder_refreshes_its_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Lock, "refresh_s", 0.05)
    path = tmp_path / ".lock"
    with Lock(path, "the work dir"):
        old = time.time() - 1000
        os.utime(path, (old, old))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 5


class NoNorm(nn.Module):
    """A segmentation model without BatchNorm or dropout: accumulation must not change its update at all."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.out, self.aux = nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.Conv2d(8, 5, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.body(x))
        return {"out": self.out(h), "aux": self.aux(h)}


@pytest.mark.parametrize("loss_norm", ["labelled", "all"])
def test_accumulation_gives_the_update_of_the_whole_batch(loss_norm: str) -> None:
    config = load_config("demo.yaml", [f"train.loss_norm={loss_norm}", "model.num_classes=5"])
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4, 32, 32), generator=gen)
    labels[0, :20] = 255  # the micro-batches hold different numbers of labelled pixels
    labels[3, :, :5] = 255
    results = []
    for accum in (1, 2, 4):
        torch.manual_seed(0)
        model = NoNorm()
        config["train"]["accum_steps"] = accum
        optimizer = build_optimizer(model, config)
        losses = optim.train_step(model, optimizer, torch.amp.GradScaler("cuda", enabled=False), images,
                                           labels, config)
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (whole, weights), *split = results
    for losses, params in split:
        for key in ("total", "main", "aux"):
            torch.testing.assert_close(losses[key], whole[key], rtol=1e-6, atol=1e-7)
        for p, q in zip(params, weights):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
