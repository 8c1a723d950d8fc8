"""torch.compile (inductor) of the deformable layers and the loss: same results as eager, no graph breaks.

The reference paths (torchvision's op, the unfused loss), as used where Triton cannot run, compile on CPU. The
Triton paths are torch.library custom ops (models/triton_deform.py, engine/triton_loss.py): compiled, each launch
is one opaque node of the graph and runs as in eager, on the GPU, or without one in Triton's CPU interpreter
(conftest.py turns it on). Shapes are small: nearly all the time goes into inductor's C++ compiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from engine import triton_loss
from engine.loss import reference_upsample_cross_entropy
from models import triton_deform
from models.deform_conv import DEFORM_OPS, DeformConv2d

# DeformConv2d's name for torchvision's op (looked up, not spelled, so a renamed config value does not break this).
TORCHVISION_OP = next(name for name, fn in DEFORM_OPS.items() if fn is torchvision_deform_conv2d)
CLASSES = 5


class TinySegmenter(nn.Module):
    """deformable v1 -> ReLU -> deformable v2 to class logits (padding = dilation = 2, so samples reach row /
    column -1); returns ``loss`` of the logits upsampled 2x against the labels. As few other ops as possible:
    each costs inductor a C++ compile."""

    def __init__(self, op: str, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.deform1 = DeformConv2d.from_conv(nn.Conv2d(3, 8, 3, padding=2, dilation=2), 1, op=op)
        self.deform2 = DeformConv2d.from_conv(nn.Conv2d(8, CLASSES, 3, padding=2, dilation=2, bias=True), 2, op=op)
        self.loss = loss
        with torch.no_grad():  # non-zero offsets, so the sampling is really deformed
            for layer in (self.deform1, self.deform2):
                layer.offset_conv.weight.normal_(0, 0.1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.deform2(torch.relu(self.deform1(images))), labels)


def loss_and_grads(model: nn.Module, run: Callable[..., torch.Tensor], images: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``run``'s loss and every parameter's gradient (the gradients are cleared before)."""
    model.zero_grad(set_to_none=True)
    loss = run(images, labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_compiled_matches_eager(model: nn.Module, device: torch.device) -> None:
    """Compile ``model`` whole (fullgraph: a graph break fails) and compare loss and gradients with eager."""
    model = model.to(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 6, 5, generator=gen).to(device)
    labels = torch.randint(0, CLASSES, (2, 12, 10), generator=gen).to(device)
    labels[:, 0] = 255
    eager_loss, eager_grads = loss_and_grads(model, model, images, labels)
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = loss_and_grads(model, compiled, images, labels)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_reference_paths_compile_and_match_eager() -> None:
    """torchvision's op (v1 and v2) and the reference loss compile on CPU."""
    model = TinySegmenter(TORCHVISION_OP, reference_upsample_cross_entropy)
    assert_compiled_matches_eager(model, torch.device("cpu"))


def test_triton_paths_compile_as_custom_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """op="triton" and the fused loss compile whole: the kernels run inside the compiled graph (no graph break, no
    fallback to the reference ops) and give eager's results."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (triton_deform.triton_available(device) and triton_loss.triton_available(device)):
        pytest.skip("needs Triton >= 3.2 on a GPU, or its CPU interpreter where it works")

    def refuse(*args, **kwargs):
        raise AssertionError("a reference op ran instead of the Triton kernels")

    monkeypatch.setattr(triton_deform, "torchvision_deform_conv2d", refuse)
    model = TinySegmenter("triton", triton_loss.upsample_cross_entropy)
    assert_compiled_matches_eager(model, device)
