"""Numeric precision: the one map from config/command-line names to autocast dtypes.

Autocast runs on CUDA only: on the CPU torchvision's deformable convolution has no bf16/fp16 kernel,
and the recipe's bf16 is a GPU setting.
"""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``name`` (a key of ``AMP_DTYPES``) on ``device``: None off CUDA."""
    return AMP_DTYPES[name] if device.type == "cuda" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def memory_format(device: torch.device, channels_last: bool) -> torch.memory_format:
    """channels_last on CUDA when asked (the layout cuDNN and the Triton kernels are fast in), else contiguous."""
    return torch.channels_last if device.type == "cuda" and channels_last else torch.contiguous_format
