"""The signals that ask a training to stop, caught so that it saves first.

train.py catches them before anything else. The training loop reads ``Stop.reason`` once per iteration and after
each validation image; once it is set, every rank leaves the loop together, last.pt is saved and the run exits 0.
"""

from __future__ import annotations

import os
import signal
import stat
from dataclasses import dataclass
from typing import Any

# The signals that ask a job to stop: torchrun's default --signals-to-handle (SIGTERM, SIGINT, SIGHUP, SIGQUIT, which
# it forwards to its workers), a closed terminal (SIGHUP), Ctrl-C and Ctrl-\ (SIGINT, SIGQUIT), SLURM's stop and time
# limit (SIGTERM) and the warning signals schedulers are asked to send before it (SIGUSR1, SIGUSR2: sbatch --signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class Stop:
    """The name of the first stop signal this process received (None: none yet)."""

    reason: str | None = None


def catch_stop_signals() -> Stop:
    """Make every signal of ``STOP_SIGNALS`` set the returned ``Stop`` instead of ending the process.

    A second Ctrl-C stops at once. Any other repeated signal (a scheduler signalling every process while a launcher
    forwards it too) is ignored: the scheduler's SIGKILL after its grace time is the hard stop. After SIGHUP the
    terminal is gone: output to it is dropped (``leave_terminal``), so writing there cannot fail the final save.
    """
    stop = Stop()

    def on_signal(signum: int, frame: Any) -> None:
        stop.reason = stop.reason or signal.Signals(signum).name
        if signum == signal.SIGHUP:
            leave_terminal()
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)

    for signum in STOP_SIGNALS:
        signal.signal(signum, on_signal)
    return stop


def leave_terminal() -> None:
    """Send stdout and stderr to /dev/null where they are a terminal (a character device): after a hangup, writing
    to it fails (EIO). Pipes and files (a log, torchrun's) stay."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if stat.S_ISCHR(os.fstat(fd).st_mode):
            os.dup2(null, fd)
    os.close(null)
