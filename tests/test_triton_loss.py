"""Tests of the fused upsample + cross-entropy loss against the unfused reference (train.py's loss).

Without a GPU the kernels run in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1); with one, on CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", minversion="3.2")  # models/triton_support.py: older Tritons are not used

from engine import loss as loss_module
from engine import triton_loss
from engine.loss import reference_upsample_cross_entropy
from engine.triton_loss import (
    BLOCK_C,
    BLOCK_X,
    MAX_SPAN,
    triton_available,
    upsample_cross_entropy,
)
from models.triton_support import INTERPRETER_WORKS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEVICE.type == "cpu" and not INTERPRETER_WORKS:
    pytest.skip("Triton < 3.7's interpreter fails with NumPy >= 2.4 (triton-lang/triton#9171)", allow_module_level=True)


def make_inputs(
    n: int, c: int, h: int, w: int, height: int, width: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (n, c, h, w) and labels (n, height, width) with about 20% ignored (255) pixels."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, c, h, w, generator=gen)).to(dtype)
    labels = torch.randint(0, c, (n, height, width), generator=gen)
    labels[torch.rand(n, height, width, generator=gen) < 0.2] = 255
    return logits.to(DEVICE), labels.to(DEVICE)


def loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """fn's loss and its gradient w.r.t. logits (a fresh leaf with logits' values and strides)."""
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, labels, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 5, 4, 4, 32, 32),  # 8x, as in training
        (2, 37, 7, 9, 20, 13),  # non-integer ratios; C > BLOCK_C and not a multiple of it
        (2, 20, 9, 8, 7, 5),  # downsampling (H < h, W < w)
        (1, 6, 3, 9, 5, 150),  # W > 2 * BLOCK_X: blocks share low-res columns (the atomic adds)
    ],
    ids=["8x", "non-integer", "downsample", "wide"],
)
def test_float32_matches_reference(shape: tuple[int, ...], channels_last: bool) -> None:
    logits, labels = make_inputs(*shape)
    if channels_last:  # also strided labels: the kernels must read both through their strides
        logits = logits.contiguous(memory_format=torch.channels_last)
        labels = labels.transpose(1, 2).contiguous().transpose(1, 2)
    loss, grad = loss_and_grad(upsample_cross_entropy, logits, labels)
    ref_loss, ref_grad = loss_and_grad(reference_upsample_cross_entropy, logits, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == torch.float32 and grad.shape == logits.shape
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5


def test_shapes_cover_the_block_edges() -> None:
    # The parametrised shapes above are only meaningful while the blocks are this size.
    assert 37 > BLOCK_C and 37 % BLOCK_C and 150 > 2 * BLOCK_X


def test_other_ignore_index() -> None:
    logits, labels = make_inputs(2, 7, 5, 6, 11, 17)
    labels[labels == 255] = -100
    labels[:, 0] = 3  # a whole row of class 3, which is counted here
    loss, grad = loss_and_grad(upsample_cross_entropy, logits, labels, ignore_index=-100)
    ref_loss, ref_grad = loss_and_grad(reference_upsample_cross_entropy, logits, labels, ignore_index=-100)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_all_ignored_gives_zero_loss_and_gradient() -> None:
    logits, labels = make_inputs(2, 6, 4, 5, 16, 20)
    labels.fill_(255)
    loss, grad = loss_and_grad(upsample_cross_entropy, logits, labels)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert reference_upsample_cross_entropy(logits, labels).item() == 0.0


def test_float64_matches_reference_and_passes_gradcheck() -> None:
    logits, labels = make_inputs(2, 37, 7, 9, 20, 13, dtype=torch.float64)
    loss, grad = loss_and_grad(upsample_cross_entropy, logits, labels)
    ref_loss, ref_grad = loss_and_grad(reference_upsample_cross_entropy, logits, labels)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(grad, ref_grad) < 1e-12

    tiny, tiny_labels = make_inputs(1, 3, 3, 4, 5, 7, dtype=torch.float64, seed=1)
    tiny_labels[0, 0, 0] = 255
    assert torch.autograd.gradcheck(
        lambda x: upsample_cross_entropy(x, tiny_labels), (tiny.requires_grad_(),), eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_under_autocast(dtype: torch.dtype) -> None:
    logits, labels = make_inputs(2, 20, 9, 8, 40, 33, dtype=dtype)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grad = loss_and_grad(upsample_cross_entropy, logits, labels)
    ref_loss, ref_grad = loss_and_grad(reference_upsample_cross_entropy, logits, labels)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert rel_err(loss, ref_loss) < 1e-2 and rel_err(grad, ref_grad) < 2e-2
    # The kernels compute in fp32 from the exact low-precision values: as accurate as a float64 reference,
    # up to the final rounding of the gradient to dtype.
    exact_loss, exact_grad = loss_and_grad(reference_upsample_cross_entropy, logits.double(), labels)
    assert rel_err(loss, exact_loss) < 1e-5 and rel_err(grad, exact_grad) < 1e-2


def triton_op(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss train.loss_op=triton computes."""
    return loss_module.upsample_cross_entropy(logits, labels, "triton")


def test_without_triton_the_op_is_refused_not_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Triton cannot run, train.loss_op=triton is resolved to the reference before training
    (engine.device.resolve_config, tests/test_train.py); called anyway, the op says so instead of running another."""
    logits, labels = make_inputs(2, 5, 4, 5, 13, 17)
    monkeypatch.setattr(triton_loss, "triton_available", lambda device: False)
    with pytest.raises(ValueError, match="Triton is not usable there.*train.loss_op=reference"):
        triton_op(logits, labels)


def test_triton_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the reference made to raise, and the kernels' launcher counted, the result comes from the kernels."""
    logits, labels = make_inputs(2, 5, 4, 5, 13, 17)
    ref_loss, ref_grad = loss_and_grad(reference_upsample_cross_entropy, logits, labels)
    launches, launch = [], triton_loss._loss_sum

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton kernels")

    def counted(*args, **kwargs):
        launches.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(loss_module, "reference_upsample_cross_entropy", refuse)
    monkeypatch.setattr(triton_loss, "_loss_sum", counted)
    assert triton_available(DEVICE)
    loss, grad = loss_and_grad(triton_op, logits, labels)
    assert launches == [1] and rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_strong_width_downsampling_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, labels = make_inputs(1, 4, 3, 3 * MAX_SPAN, 2, 2)

    def refuse(*args, **kwargs):
        raise AssertionError("the kernels ran on a shape they are not sized for")

    monkeypatch.setattr(triton_loss, "_loss_sum", refuse)
    with pytest.raises(ValueError, match=r"not sized for logits \(1, 4, 3, 384\) and labels \(1, 2, 2\)"):
        triton_op(logits, labels)


@pytest.mark.parametrize("in_size", [1, 3, 7, 64, 65, 97, 128, 300, 1000])
def test_block_span_is_the_axis_span(in_size: int) -> None:
    """The size check (Python floats, traceable by torch.compile) agrees with the kernels' fp32 axis."""
    for out_size in (1, 2, 5, 13, 63, 64, 65, 150, 512, 1024):
        expected = triton_loss._axis(in_size, out_size, torch.float32, torch.device("cpu")).span
        assert triton_loss._block_span(in_size, out_size) == expected, (in_size, out_size)


def test_rejects_mismatched_shapes() -> None:
    logits, labels = make_inputs(2, 5, 4, 5, 13, 17)
    with pytest.raises(ValueError, match="expected logits"):
        upsample_cross_entropy(logits, labels[:1])
    with pytest.raises(ValueError, match="expected logits"):
        upsample_cross_entropy(logits[0], labels[0])
