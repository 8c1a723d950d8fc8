"""Train a (deformable) ResNet-50 FCN for semantic segmentation.

    python train.py --config def-conv-v2.yaml                          # one GPU or the CPU
    torchrun --nproc_per_node=8 train.py --config def-conv-v2.yaml     # DDP, global batch split over GPUs
    python train.py --config def-conv-v2.yaml --resume                 # continue from runs/def-conv-v2/last.pt

The command line around ``engine.trainer``: it loads the config, claims the work dir, installs the
stop-signal handlers and runs the loop. SIGTERM or Ctrl-C saves last.pt and exits; --resume continues.
"""

from __future__ import annotations

import argparse
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from configs import UserError, error_message, load_config
from engine.distributed import env_rank, shutdown
from engine.trainer import NonFiniteLoss, Trainer, run
from engine.workdir import WorkDirLock, check_work_dir, prepare_work_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Train a ResNet-50 FCN (optionally with deformable convolutions) on ADE20K or the demo data.",
        epilog="example: python train.py --config demo.yaml train.iters=40   (overrides are key.sub=value)",
    )
    parser.add_argument("--config", required=True, help="config name in configs/ (e.g. def-conv-v2.yaml) or a path")
    parser.add_argument("--work-dir", help="where checkpoints, logs and the resolved config go (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the work dir from its last.pt")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value, typed like the value they replace")
    return parser.parse_args(argv)


def install_stop_handlers(trainer: Trainer) -> None:
    """SIGTERM/SIGINT ask the loop to save and stop; a second one stops at once."""

    def on_signal(signum: int, frame: Any) -> None:
        trainer.stop_signal = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for user errors, 1 for a non-finite loss)."""
    args = parse_args(argv)
    trainer = None
    try:
        config = load_config(args.config, args.overrides)
        work_dir = Path(args.work_dir or Path("runs") / config["config_name"])
        master = env_rank() == 0
        if master:
            check_work_dir(work_dir, config, args.resume)
            prepare_work_dir(work_dir)
        with WorkDirLock(work_dir) if master else nullcontext():
            trainer = Trainer(config, work_dir, args.resume)
            install_stop_handlers(trainer)
            return run(trainer)
    except (UserError, NonFiniteLoss) as err:
        prefix = f"[rank {env_rank()}] " if env_rank() else ""
        print(f"{prefix}error: {error_message(err)}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 1
    finally:
        if trainer is not None and trainer.writer is not None:
            trainer.writer.close()
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
