"""Operations that never lose work: every state a kill leaves in a work dir, every stop signal, a failing log
write, a lock whose node crashed, and the command line's spelling of --resume and list overrides."""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_run

import train
from configs import UserError, load_config
from engine import signals
from engine import workdir as workdir_module
from engine.checkpoint import load_checkpoint
from engine.lock import Lock, lock_holder

REPO = Path(__file__).resolve().parents[1]


def overrides(tree: Path, iters: int = 3) -> list[str]:
    """def-conv-v2 (demo.yaml) on 32x32 crops of a tiny ADE tree, a validation (one image) and last.pt every step."""
    return tiny_run(tree, "train.batch_size=2", f"train.iters={iters}", "train.val_interval=1", "train.ckpt_interval=1",
                    "train.val_max_images=1")


@pytest.fixture(scope="module")
def run(tree: Path, module_dir: Path) -> dict[int, Path]:
    """One uninterrupted 3-iteration run; a copy (a hard link) of the checkpoint of every iteration, by iteration.

    best.pt at an iteration is the same file as last.pt there (a second name), so these build every state."""
    kept, real = module_dir / "kept", train.save_checkpoint
    kept.mkdir()

    def save_and_keep(state: dict[str, Any], path: Path) -> None:
        real(state, path)
        os.link(path, kept / f"{state['iteration']}.pt")

    train.save_checkpoint = save_and_keep
    try:
        assert train.main(["--config", "demo.yaml", "--work-dir", str(module_dir / "reference"), *overrides(tree)]) == 0
    finally:
        train.save_checkpoint = real
    shutil.copy(module_dir / "reference" / "config.yaml", kept / "config.yaml")
    return {i: kept / f"{i}.pt" for i in (1, 2, 3)}


def dead_pid() -> int:
    """The id of a process that has ended."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


# Each state of engine/workdir.py's table: the checkpoints present (file -> the iteration it holds), whether the
# record and tb/ are there, the temporary file the write that the kill cut short left, and what the start says.
STATES = {
    "empty": ({}, (), ".write_test.{pid}", "starting a new run"),
    "record": ({}, ("config.yaml",), ".config.yaml.{pid}.tmp", "starting over in"),
    "logs": ({}, ("config.yaml", "tb"), ".best.pt.{pid}.0123abcd.tmp", "starting over in"),
    "best": ({"best.pt": 2}, ("config.yaml", "tb"), ".last.pt.{pid}.0123abcd.tmp",
             "resuming {dir}/best.pt at iteration 2"),
    "last": ({"last.pt": 2}, ("config.yaml", "tb"), ".best.pt.{pid}.0123abcd.tmp",
             "resuming {dir}/last.pt at iteration 2"),
    "both": ({"last.pt": 2, "best.pt": 1}, ("config.yaml", "tb"), ".last.pt.{pid}.0123abcd.tmp",
             "resuming {dir}/last.pt at iteration 2"),
    "best-newer": ({"last.pt": 1, "best.pt": 2}, ("config.yaml", "tb"), ".last.pt.{pid}.0123abcd.tmp",
                   "resuming {dir}/best.pt at iteration 2"),
}


def killed_run(work_dir: Path, state: str, checkpoints: dict[int, Path]) -> str:
    """The work dir as a kill in ``state`` leaves it: its files, the killed process's lock and a temporary file
    (its name returned)."""
    files, extra, temporary, _ = STATES[state]
    work_dir.mkdir()
    for name, iteration in files.items():
        os.link(checkpoints[iteration], work_dir / name)
    if "config.yaml" in extra:
        shutil.copy(checkpoints[1].parent / "config.yaml", work_dir / "config.yaml")
    if "tb" in extra:
        (work_dir / "tb").mkdir()
    pid = dead_pid()
    (work_dir / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    (work_dir / temporary.format(pid=pid)).write_bytes(b"PK\x03\x04 cut short")
    return temporary.format(pid=pid)


def test_the_table_of_kill_states_is_the_one_tested() -> None:
    table = workdir_module.__doc__.split("::", 1)[1].split("\n\n")[1]
    assert [line.split()[0] for line in table.splitlines()[1:]] == list(STATES)


@pytest.mark.parametrize("state", list(STATES))
def test_resume_auto_continues_or_starts_over_in_every_state_a_kill_leaves(
        state: str, run: dict[int, Path], tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """The one command line, given every state: the stale lock is taken over, the temporary file removed with one
    line, and the run starts, starts over or resumes the newest checkpoint (the loop itself is not run here)."""
    work_dir = tmp_path / "run"
    temporary = killed_run(work_dir, state, run)
    started: list[train.Training] = []
    monkeypatch.setattr(train, "train", lambda training, stop: started.append(training) or ("the test", None))
    assert train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"removed what interrupted writes left in {work_dir}: {temporary}\n{STATES[state][3].format(dir=work_dir)}" in out
    assert started[0].iteration == max(STATES[state][0].values(), default=0)
    assert not [p.name for p in work_dir.iterdir() if p.name.startswith(".")]  # no lock, no temporary file


def test_a_kill_after_a_validation_before_the_first_last_pt_continues_from_best_pt(
        run: dict[int, Path], tree: Path, tmp_path: Path) -> None:
    """The issue's case end to end: best.pt alone; the same command line continues it to the weights of the run
    left alone (bitwise, CPU)."""
    work_dir = tmp_path / "run"
    killed_run(work_dir, "best", run)
    (work_dir / "best.pt").unlink()
    os.link(run[1], work_dir / "best.pt")
    assert train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree), "--resume", "auto"]) == 0
    resumed, uninterrupted = load_checkpoint(work_dir / "last.pt"), load_checkpoint(run[3])
    assert resumed["iteration"] == 3
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.mark.parametrize("state,refusal", [
    ("logs", "holds the record ({dir}/config.yaml) of a start of another experiment that never reached a checkpoint "
             "(seed differ)"),
    ("both", "--resume cannot change seed"),
])
def test_another_experiment_in_the_work_dir_is_refused_by_name(
        state: str, refusal: str, run: dict[int, Path], tree: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    work_dir = tmp_path / "run"
    killed_run(work_dir, state, run)
    args = ["--config", "demo.yaml", "--work-dir", str(work_dir), *overrides(tree), "seed=1", "--resume", "auto"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert refusal.format(dir=work_dir) in err and "add --resume" not in err and "Traceback" not in err
    assert not (work_dir / ".lock").exists()


def test_a_failing_log_write_is_reported_once_and_costs_no_weights(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """tb/ deleted during the run: one line names it and the reason, the run goes on to its end and saves, no
    traceback, no lock left."""
    work_dir, real, steps = tmp_path / "run", train.train_step, []

    def step_then_delete_the_logs(*args: Any) -> dict[str, torch.Tensor]:
        steps.append(1)
        if len(steps) == 2:
            shutil.rmtree(work_dir / "tb")
        return real(*args)

    monkeypatch.setattr(train, "train_step", step_then_delete_the_logs)
    args = [*overrides(tree), "train.val_interval=3", "train.ckpt_interval=3"]
    assert train.main(["--config", "demo.yaml", "--work-dir", str(work_dir), *args]) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "TensorBoard" in line]
    assert f"cannot write {work_dir / 'tb'} (No such file or directory)" in line and "goes on" in line
    assert "Traceback" not in err and load_checkpoint(work_dir / "last.pt")["iteration"] == 3
    assert sorted(p.name for p in work_dir.iterdir()) == ["best.pt", "config.yaml", "last.pt"]


def test_a_lock_that_cannot_be_removed_is_said_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A filesystem remounted read-only: leaving the lock prints why, raises nothing, and the next start on this host
    takes the lock over (its process is gone)."""
    path = tmp_path / ".lock"
    with Lock(path, "the work dir"):
        def read_only(self: Path, missing_ok: bool = False) -> None:
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.undo()
    assert f"could not remove the lock file {path} (Read-only file system)" in capsys.readouterr().err
    assert path.exists() and lock_holder(path) is None  # names this process, which no longer holds it


def test_a_lock_file_that_names_no_process_is_an_unknown_holder(tmp_path: Path) -> None:
    """Any JSON that is not the lock's object (a list, a number) reads as unparsable text does: an unknown process."""
    path = tmp_path / ".lock"
    for text in ("[1]", "7", "not json"):
        path.write_text(text)
        assert lock_holder(path).startswith("an unknown process (the lock file names none), made ")


def test_a_lock_whose_heartbeat_stopped_is_waited_for_then_taken_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A job requeued onto another node after a node crash finds the crashed node's lock: it waits, saying for whom
    and how long at most, and takes the lock over once stale; a lock whose heartbeat goes on is refused."""
    monkeypatch.setattr(Lock, "refresh_s", 0.2)
    monkeypatch.setattr(Lock, "stale_s", 1.0)
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"pid": 1, "host": "crashed-node"}))
    with Lock(path, "the work dir"):
        assert json.loads(path.read_text())["host"] == socket.gethostname()
    out = capsys.readouterr().out
    assert out.startswith(f"waiting for the lock {path}, held by process 1 on crashed-node, refreshed 0 s ago")
    assert out.count("waiting") == 1 and "in at most 1 s" in out

    monkeypatch.setattr(Lock, "stale_s", 30.0)  # the refusal comes at the first heartbeat seen, whenever it comes
    path.write_text(json.dumps({"pid": 1, "host": "live-node"}))
    stopped = threading.Event()

    def heartbeat() -> None:  # the holder's, every 0.1 s
        while not stopped.wait(0.1):
            os.utime(path)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(UserError, match="in use by process 1 on live-node"):
            Lock(path, "the work dir").__enter__()
    finally:
        stopped.set()
        beating.join()


def test_every_signal_that_stops_a_job_asks_the_run_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every signal torchrun forwards to its workers by default (read from the installed torch), a closed terminal's
    SIGHUP and the schedulers' SIGUSR1/SIGUSR2 ask the loop to save and stop."""
    from torch.distributed.launcher.api import LaunchConfig
    from torch.distributed.run import get_args_parser

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    forwarded = get_args_parser().get_default("signals_to_handle").split(",")
    assert forwarded == ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"]  # docs/gpu-and-clusters.md names them, and its 30 s:
    assert LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).shutdown_timeout == 30
    stopping = {signal.Signals[name] for name in forwarded} | {signal.SIGUSR1, signal.SIGUSR2}
    assert stopping <= set(signals.STOP_SIGNALS)
    saved = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        for sig in stopping - {signal.SIGHUP}:  # SIGHUP also leaves the terminal: tested in a process of its own
            stop = signals.catch_stop_signals()
            os.kill(os.getpid(), sig)
            assert stop.reason == sig.name
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_sighup_from_a_closed_terminal_saves_and_exits_0(tree: Path, tmp_path: Path) -> None:
    """A training in a terminal (a pseudo-terminal here) that hangs up: SIGHUP saves last.pt and exits 0, and from
    then on nothing is written to the terminal (where, once closed, writing fails and would cost the save)."""
    work_dir, (terminal, child) = tmp_path / "run", pty.openpty()
    command = [sys.executable, "train.py", "--config", "demo.yaml", "--work-dir", str(work_dir),
               *overrides(tree, iters=50), "train.val_interval=50"]
    proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    shown: list[bytes] = []
    reader = threading.Thread(target=read_all, args=(terminal, shown))
    reader.start()
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and not (work_dir / "last.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGHUP)
    code = proc.wait(timeout=180)
    reader.join()
    output = b"".join(shown).decode(errors="replace")
    assert code == 0, output[-2000:]
    assert "starting a new run" in output and "stopped by SIGHUP" not in output  # said to /dev/null
    stopped_at = load_checkpoint(work_dir / "last.pt")["iteration"]
    assert 1 <= stopped_at < 50 and not (work_dir / ".lock").exists()


def read_all(fd: int, into: list[bytes]) -> None:
    """Read a terminal's output until its process is gone (EIO), so that writing there never blocks; close it."""
    try:
        while chunk := os.read(fd, 65536):
            into.append(chunk)
    except OSError:
        pass
    os.close(fd)


@pytest.mark.parametrize("argv,resume,overrides_", [
    (["--resume", "train.iters=24"], "last", ["train.iters=24"]),
    (["--resume", "auto", "train.iters=24"], "auto", ["train.iters=24"]),
    (["seed=1", "--resume", "train.iters=24", "--device", "cpu", "train.lr=0.1"], "last",
     ["seed=1", "train.iters=24", "train.lr=0.1"]),
    (["train.iters=24", "--resume"], "last", ["train.iters=24"]),
])
def test_an_override_after_resume_is_an_override(argv: list[str], resume: str, overrides_: list[str]) -> None:
    args = train.parse_args(["--config", "demo.yaml", *argv])
    assert (args.resume, args.overrides) == (resume, overrides_)


def test_a_non_finite_loss_before_any_checkpoint_says_that_nothing_was_saved() -> None:
    message = str(train.NonFiniteLoss(1, 0, "train.lr=0.005 (half the learning rate)"))
    assert "Nothing was saved yet (no checkpoint)" in message and "last.pt holds" not in message
    assert "newest checkpoint holds iteration 4, where --resume auto continues" in str(train.NonFiniteLoss(6, 4, "train.lr=0.005"))


def test_numbers_in_list_overrides_are_read_as_numbers() -> None:
    """YAML reads 1e-1 as a string; where a list of floats was, each item is read as a scalar override is."""
    config = load_config("demo.yaml", ["data.ratio_range=[5e-1,2e0]", "eval.scales=[1e0,1.5]"])
    assert config["data"]["ratio_range"] == [0.5, 2.0] and config["eval"]["scales"] == [1.0, 1.5]
    with pytest.raises(UserError, match=re.escape("data.ratio_range' in") + ".*got \\['x', 2.0\\]"):
        load_config("demo.yaml", ["data.ratio_range=[x,2e0]"])
