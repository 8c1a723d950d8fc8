"""What one training step needs in memory, and how many micro-batches make the recipe's batch fit a card.

``STEP_GIB`` is the README's memory table, the one place its figures live (a test checks the README against
it): per image and fixed GiB of one training step at 512x512 with the aux head (reference ops), measured by
``scripts/benchmark.py --memory`` on the CPU, a stand-in until a GPU measures them. Everything that plans or
advises memory (``train.accum_steps`` in an out-of-memory message, gpu_check.py's plan) estimates from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from configs import batch_split_error

CARDS_GIB = (16, 24, 40, 80)  # the memory table's cards
CARD_SHARE = 0.9  # a step fits a card when its peak is at most this share of it (CUDA context, allocator slack)
TABLE_CROP = 512  # the crop the table was measured at
# (model.deform.version, precision) -> (GiB per image, fixed GiB). fp16 keeps values in as many bytes as bf16.
STEP_GIB: dict[tuple[int, str], tuple[float, float]] = {
    (0, "none"): (1.69, 1.08),
    (1, "none"): (1.72, 1.13),
    (2, "none"): (1.67, 1.14),
    (0, "bf16"): (1.21, 1.04),
    (1, "bf16"): (1.17, 1.16),
    (2, "bf16"): (1.21, 1.09),
}


def step_gib(version: int, amp: str, crop: int, per_forward: int) -> float:
    """The table's estimate of a training step's peak at ``per_forward`` images of ``crop`` x ``crop`` in ``amp``
    (a resolved train.amp): the per-image part scales with the crop's area."""
    per_image, fixed = STEP_GIB[(version, "bf16" if amp == "fp16" else amp)]
    return fixed + per_image * per_forward * (crop / TABLE_CROP) ** 2


def config_step_gib(config: dict[str, Any], per_forward: int) -> float:
    """``step_gib`` for a resolved config."""
    return step_gib(config["model"]["deform"]["version"], config["train"]["amp"], config["data"]["crop_size"],
                    per_forward)


def accum_choices(batch_size: int, processes: int, synced: bool = False) -> list[int]:
    """The ``train.accum_steps`` values that split ``batch_size`` over ``processes`` (``batch_split_error``), fewest
    micro-batches first."""
    return [n for n in range(1, batch_size + 1) if batch_split_error(batch_size, n, processes, synced) is None]


def fewest_that_fit(need_gib: Callable[[int], float], batch_size: int, processes: int, memory_gib: float) -> int | None:
    """The fewest accepted ``train.accum_steps`` whose step (``need_gib(per_forward)``) fits ``CARD_SHARE`` of
    ``memory_gib``; None when not even the smallest per-forward batch fits."""
    usable = CARD_SHARE * memory_gib
    return next((n for n in accum_choices(batch_size, processes)
                 if need_gib(batch_size // (processes * n)) <= usable), None)
