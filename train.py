"""Train a (deformable) ResNet-50 FCN for semantic segmentation.

    python train.py --config def-conv-v2.yaml                          # one GPU (or the demo on the CPU)
    torchrun --nproc_per_node=8 train.py --config def-conv-v2.yaml     # DDP, global batch split over GPUs
    python train.py --config def-conv-v2.yaml --resume auto            # start, or continue from the newest checkpoint

The command line around ``engine.trainer``: it loads the config, chooses the device, holds the work dir's lock
(removing what interrupted writes left there), installs the stop-signal handlers and runs the loop. Every signal
that asks a job to stop (``STOP_SIGNALS``) saves last.pt and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from configs import load_config
from engine.console import command_line
from engine.device import choose_device, device_facts
from engine.distributed import env_rank, shutdown
from engine.trainer import NonFiniteLoss, Stop, log, loop, start
from engine.workdir import Lock, make_writable_folder, remove_temporaries

# The signals that ask a job to stop: torchrun's default --signals-to-handle (SIGTERM, SIGINT, SIGHUP, SIGQUIT, which
# it forwards to its workers), a closed terminal (SIGHUP), Ctrl-C and Ctrl-\ (SIGINT, SIGQUIT), SLURM's stop and time
# limit (SIGTERM) and the warning signals schedulers are asked to send before it (SIGUSR1, SIGUSR2: sbatch --signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Train a ResNet-50 FCN (optionally with deformable convolutions) on ADE20K or the demo data.",
        epilog="example: python train.py --config demo.yaml train.iters=40   (overrides are key.sub=value)",
    )
    parser.add_argument("--config", required=True, help="config name in configs/ (e.g. def-conv-v2.yaml) or a path")
    parser.add_argument("--work-dir", help="where checkpoints, logs and the resolved config go (default runs/<config name>)")
    parser.add_argument(
        "--resume", nargs="?", const="last", choices=["last", "auto"],
        help="--resume: continue the run in the work dir from its newest checkpoint (last.pt, or best.pt when a "
        "validation wrote it later); --resume auto: continue when there is a checkpoint, start otherwise (one command "
        "line for starts and restarts: torchrun --max-restarts, SLURM requeue)",
    )
    parser.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default="auto",
        help="auto (default): CUDA when usable; a config meant for a GPU (ADE20K data, amp, compile, Triton) stops "
        "with the reason instead of training on the CPU. cpu: on the CPU deliberately",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value, typed like the value they replace")
    argv = sys.argv[1:] if argv is None else argv
    # a bare --resume takes no value from the next word unless it is one of its values: an override after it stays one
    argv = ["--resume=last" if word == "--resume" and argv[i + 1:i + 2] not in (["last"], ["auto"]) else word
            for i, word in enumerate(argv)]
    return parser.parse_intermixed_args(argv)


def install_stop_handlers(stop: Stop) -> None:
    """Every signal of ``STOP_SIGNALS`` asks the loop to save and stop.

    A second Ctrl-C stops at once. Any other repeated signal (a scheduler signalling every process while a launcher
    forwards it too) is ignored: the scheduler's SIGKILL after its grace time is the hard stop. After SIGHUP the
    terminal is gone: output to it is dropped (``leave_terminal``), so writing there cannot fail the final save.
    """

    def on_signal(signum: int, frame: Any) -> None:
        stop.reason = stop.reason or signal.Signals(signum).name
        if signum == signal.SIGHUP:
            leave_terminal()
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)


def leave_terminal() -> None:
    """Send stdout and stderr to /dev/null where they are a terminal (a character device): after a hangup, writing
    to it fails (EIO). Pipes and files (a log, torchrun's) stay."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if stat.S_ISCHR(os.fstat(fd).st_mode):
            os.dup2(null, fd)
    os.close(null)


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for user errors, 1 for a non-finite loss)."""
    args = parse_args(argv)
    stop = Stop()
    install_stop_handlers(stop)
    try:
        config = load_config(args.config, args.overrides)
        facts = device_facts()
        device = choose_device(args.device, config, facts)
        work_dir = Path(args.work_dir or Path("runs") / config["config_name"])
        master = env_rank() == 0
        if master:
            make_writable_folder(work_dir, "Give --work-dir a folder you can write to (the work dir), with free space.")
        with Lock(work_dir / ".lock", f"the work dir {work_dir}") if master else nullcontext():
            if master and (removed := remove_temporaries(work_dir)):
                print(f"removed what interrupted writes left in {work_dir}: {', '.join(removed)}")
            run = start(config, work_dir, args.resume, device, facts)
            try:
                return loop(run, stop)
            finally:
                log(run, lambda writer: writer.close())
    except NonFiniteLoss as err:
        prefix = f"[rank {env_rank()}] " if env_rank() else ""
        print(f"{prefix}error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
