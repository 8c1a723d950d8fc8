"""Whether the Triton kernels (models/triton_deform.py, engine/triton_loss.py) can run here.

They run on CUDA tensors, and on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
before the kernels were defined (the tests do this when there is no GPU). They need Triton 3.2 or newer (older
interpreters mis-execute loops whose bodies branch) and torch 2.4 or newer (``torch.library.custom_op``).
Elsewhere ``engine.device.resolve_config`` runs a config's triton ops as the references. Past that, the two ops
differ on purpose: the deformable convolution is part of the model, which runs at any image size and on any device
a checkpoint is moved to, so a call its kernels cannot serve runs torchvision's op; the fused loss runs only in
training, at the crop size, after that resolution, so a call its kernels cannot serve is a ValueError.
"""

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

try:
    import triton

    TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
except ImportError:  # CPU-only builds of torch come without Triton
    TRITON_VERSION = (0, 0)

MIN_TRITON_VERSION = (3, 2)
HAVE_TRITON = TRITON_VERSION >= MIN_TRITON_VERSION and hasattr(torch.library, "custom_op")
# Namespace of the kernels' custom ops: torch.ops.seg_triton.deform_conv2d etc.
OP_NAMESPACE = "seg_triton"
# triton.jit reads TRITON_INTERPRET when it decorates a kernel, i.e. when the kernel modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Before Triton 3.7 the interpreter holds an integer argument as a 1-element array and reads it back with int(),
# which NumPy 2.4 refuses (triton-lang/triton#9171): every loop with a runtime bound fails.
INTERPRETER_WORKS = TRITON_VERSION >= (3, 7) or tuple(int(part) for part in np.__version__.split(".")[:2]) < (2, 4)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on ``device``."""
    kind = torch.device(device).type
    return HAVE_TRITON and (kind == "cuda" or (INTERPRET and INTERPRETER_WORKS and kind == "cpu"))


def define_op_with_backward(
    name: str, impl: Callable, fake: Callable, backward_impl: Callable, backward_fake: Callable,
    backward_rule: Callable, setup_context: Callable,
) -> tuple[Any, Any]:
    """Register ``seg_triton::name`` and ``seg_triton::name_backward`` as custom ops with fake (meta)
    implementations, and the first's autograd through ``backward_rule`` (which calls the second).

    Custom ops are what lets torch.compile keep a Triton launch as one opaque graph node instead of tracing into it.
    """
    op = torch.library.custom_op(f"{OP_NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    backward = torch.library.custom_op(f"{OP_NAMESPACE}::{name}_backward", backward_impl, mutates_args=())
    backward.register_fake(backward_fake)
    op.register_autograd(backward_rule, setup_context=setup_context)
    return op, backward
