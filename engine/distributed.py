"""Distributed set-up: the process group torchrun describes in the environment (nanoGPT's rule), and agreement.

Without ``RANK``/``WORLD_SIZE`` in the environment everything runs in one process. Decisions every rank must
share (stop now: a signal, a file that cannot be read) go through a CPU (gloo) group, so asking costs no GPU
synchronisation and can be done every iteration.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_control: dist.ProcessGroup | None = None  # the gloo group for CPU-side agreement (None: the default group)


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes in the environment; (rank, world size, device)."""
    global _control
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device_name)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_name == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # torchrun restarts failed workers against the same store, where the previous attempt's addresses are still
    # found (a rank then connects to a dead one): one key prefix per attempt.
    store, _, _ = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world_size)
    _control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return rank, world_size, device


def is_initialized() -> bool:
    """Whether a process group is up."""
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    """True in the process that logs and writes files (rank 0, or the only process)."""
    return not is_initialized() or dist.get_rank() == 0


def env_rank() -> int:
    """The rank torchrun gives this process (0 without torchrun), readable before the group is joined."""
    return int(os.environ.get("RANK", 0))


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (every rank must call it at the same point)."""
    return bool(largest(int(flag)))


def first_message(message: str | None) -> str | None:
    """The message of the first rank that has one, on every rank (every rank must call it at the same point)."""
    if not is_initialized():
        return message
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message, group=_control)
    return next((m for m in messages if m), None)


def shutdown() -> None:
    """Leave the process group, if one is up."""
    global _control
    if is_initialized():
        dist.destroy_process_group()
    _control = None


def largest(value: int) -> int:
    """The largest ``value`` over the ranks, on every rank (every rank must call it at the same point)."""
    if not is_initialized():
        return value
    tensor = torch.tensor([value])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_control)
    return int(tensor.item())
