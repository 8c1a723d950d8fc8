"""The Triton deformable convolution equals torchvision's op: forward and every gradient.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), on small shapes.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

pytest.importorskip("triton", minversion="3.2")  # models/triton_support.py: older Tritons are not used

from models import triton_deform
from models.deform_conv import DEFORM_OPS, DeformConv2d
from models.triton_support import INTERPRETER_WORKS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# DeformConv2d's name for torchvision's op (looked up, not spelled, so a renamed config value does not break this).
TORCHVISION_OP = next(name for name, fn in DEFORM_OPS.items() if fn is torchvision_deform_conv2d)

if DEVICE.type == "cpu" and not INTERPRETER_WORKS:
    pytest.skip("Triton < 3.7's interpreter fails with NumPy >= 2.4 (triton-lang/triton#9171)", allow_module_level=True)


def make_inputs(
    n: int = 2, c: int = 8, size: tuple[int, int] = (7, 6), out_channels: int = 6, kernel: int = 3,
    stride: int = 1, padding: int = 1, dilation: int = 1, groups: int = 1, offset_groups: int = 1,
    mask: bool = True, bias: bool = True, offset_scale: float = 2.0, dtype: torch.dtype = torch.float32, seed: int = 0,
) -> tuple[list[torch.Tensor | None], dict]:
    """Random (input, offset, weight, bias, mask) leaf tensors and the geometry keywords."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    ho = (h + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    taps = offset_groups * kernel * kernel

    def leaf(*shape: int, scale: float = 1.0, uniform: bool = False) -> torch.Tensor:
        t = torch.rand(*shape, generator=gen) if uniform else torch.randn(*shape, generator=gen) * scale
        return t.to(DEVICE, dtype).requires_grad_()

    tensors = [
        leaf(n, c, h, w),
        leaf(n, 2 * taps, ho, wo, scale=offset_scale),
        leaf(out_channels, c // groups, kernel, kernel),
        leaf(out_channels) if bias else None,
        leaf(n, taps, ho, wo, uniform=True) if mask else None,
    ]
    return tensors, {"stride": stride, "padding": padding, "dilation": dilation}


def run_both(tensors: list[torch.Tensor | None], geometry: dict, reference_dtype: torch.dtype | None = None):
    """Outputs and gradients (for one random output gradient) of the Triton op and of torchvision's."""
    x, offset, weight, bias, mask = tensors
    leaves = [t for t in tensors if t is not None]
    fast = triton_deform.deform_conv2d(x, offset, weight, bias, mask=mask, **geometry)
    ref_in = [t.to(reference_dtype) if t is not None and reference_dtype else t for t in tensors]
    ref = torchvision_deform_conv2d(ref_in[0], ref_in[1], ref_in[2], ref_in[3], mask=ref_in[4], **geometry)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, fast.dtype)
    fast_grads = torch.autograd.grad(fast, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.to(ref.dtype))
    return [fast, *fast_grads], [ref, *ref_grads]


def relative_errors(fast: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    """Max absolute difference over the reference's max magnitude, per tensor."""
    return [((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item() for a, b in zip(fast, ref)]


CASES = {
    "v2": {},
    "v1-no-bias": {"mask": False, "bias": False},
    "stride-dilation-groups": {"c": 12, "out_channels": 8, "stride": 2, "dilation": 2, "groups": 2, "offset_groups": 3},
    "depthwise-offset-groups": {"c": 4, "out_channels": 4, "groups": 4, "offset_groups": 2, "mask": False},
    "channels-over-one-block": {"c": 40, "out_channels": 20, "size": (5, 5)},
    "far-offsets": {"offset_scale": 8.0},
    "no-padding-1x1-rect": {"kernel": 1, "padding": 0, "size": (4, 9)},
}


@pytest.mark.parametrize("case", CASES)
def test_matches_torchvision_fp32(case: str) -> None:
    tensors, geometry = make_inputs(**CASES[case])
    fast, ref = run_both(tensors, geometry)
    names = ["output", "grad input", "grad offset", "grad weight", "grad bias", "grad mask"]
    names = [name for name, t in zip(names, [fast[0], *tensors]) if t is not None][: len(fast)]
    errors = dict(zip(names, relative_errors(fast, ref)))
    assert fast[0].shape == ref[0].shape
    assert all(e < 1e-4 for e in errors.values()), errors


def test_channels_last_input_and_output() -> None:
    tensors, geometry = make_inputs(c=16, out_channels=16)
    x = tensors[0].detach().to(memory_format=torch.channels_last).requires_grad_()
    fast, ref = run_both([x, *tensors[1:]], geometry)
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    assert max(relative_errors(fast, ref)) < 1e-4


def test_gradcheck_float64() -> None:
    tensors, geometry = make_inputs(n=1, c=2, size=(4, 4), out_channels=2, offset_scale=1.5, dtype=torch.float64)
    x, offset, weight, bias, mask = tensors

    def op(x, offset, weight, bias, mask):
        return triton_deform.deform_conv2d(x, offset, weight, bias, mask=mask, **geometry)

    assert torch.autograd.gradcheck(op, (x, offset, weight, bias, mask), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32_reference(dtype: torch.dtype) -> None:
    """Half-precision operands, fp32 accumulation: within half-precision rounding of torchvision in fp32."""
    tensors, geometry = make_inputs(c=16, out_channels=16, dtype=dtype)
    fast, ref = run_both(tensors, geometry, reference_dtype=torch.float32)
    assert fast[0].dtype == dtype
    errors = relative_errors(fast, ref)
    assert max(errors) < (3e-2 if dtype == torch.bfloat16 else 5e-3), errors


def integer_offsets(offset: torch.Tensor, seed: int, share: float = 1.0, zero: bool = False) -> torch.Tensor:
    """A leaf like ``offset`` with a random ``share`` of its values replaced by integers in [-3, 3] (all 0 if
    ``zero``): samples then land exactly on rows / columns -1, H and W, where the derivative is one-sided."""
    gen = torch.Generator().manual_seed(seed)
    ints = torch.zeros(offset.shape) if zero else torch.randint(-3, 4, offset.shape, generator=gen).float()
    replace = torch.rand(offset.shape, generator=gen) < share
    values = torch.where(replace.to(DEVICE), ints.to(DEVICE, offset.dtype), offset.detach())
    return values.requires_grad_()


@pytest.mark.parametrize("offsets", ["zero", "integer"])
def test_integer_offsets_match_torchvision(offsets: str) -> None:
    """On integer sample positions, row / column -1 included, every gradient is torchvision's.

    Zero offsets (a fresh layer) with padding = dilation put samples on row / column -1 and on H / W, as in
    layer4 (padding = dilation = 4). There torchvision's sample is 0 (it is not strictly inside (-1, H)), but its
    offset gradient is the one-sided slope towards row / column 0, not 0.
    """
    tensors, geometry = make_inputs(n=1, size=(5, 5), padding=2, dilation=2)
    tensors[1] = integer_offsets(tensors[1], seed=1, zero=offsets == "zero")
    fast, ref = run_both(tensors, geometry)
    errors = dict(zip(["output", "input", "offset", "weight", "bias", "mask"], relative_errors(fast, ref)))
    assert all(e < 1e-4 for e in errors.values()), errors


@pytest.mark.parametrize("seed", range(8))
def test_bf16_offsets_at_the_border(seed: int) -> None:
    """bf16 offsets (integers for half of them) and padding = dilation: samples on rows / columns -1, H, W are
    common, and the offset gradient there must be torchvision's (it was 0 before: errors of 7e-2 to 3e-1)."""
    tensors, geometry = make_inputs(n=1, size=(5, 5), padding=2, dilation=2, dtype=torch.bfloat16, seed=seed)
    tensors[1] = integer_offsets(tensors[1], seed=seed, share=0.5)
    fast, ref = run_both(tensors, geometry, reference_dtype=torch.float32)
    errors = dict(zip(["output", "input", "offset", "weight", "bias", "mask"], relative_errors(fast, ref)))
    assert all(e < 1e-2 for e in errors.values()), errors


def test_autocast_computes_in_half_precision() -> None:
    """Under autocast the op takes the autocast dtype (torchvision's would run in fp32)."""
    tensors, geometry = make_inputs(c=16, out_channels=16)
    x, offset, weight, bias, mask = tensors
    dtype = torch.bfloat16
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = triton_deform.deform_conv2d(x, offset, weight, bias, mask=mask, **geometry)
    ref = torchvision_deform_conv2d(x, offset, weight, bias, mask=mask, **geometry)
    assert out.dtype == dtype
    assert relative_errors([out], [ref])[0] < 3e-2
    out.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32


def test_triton_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests above compare the kernels, not a silent fallback to torchvision."""
    assert triton_deform.triton_available(DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to torchvision")

    monkeypatch.setattr(triton_deform, "torchvision_deform_conv2d", refuse)
    tensors, geometry = make_inputs()
    x, offset, weight, bias, mask = tensors
    triton_deform.deform_conv2d(x, offset, weight, bias, mask=mask, **geometry).sum().backward()
    assert x.grad is not None and offset.grad.abs().sum() > 0


def test_falls_back_to_torchvision_where_triton_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_deform, "triton_available", lambda device: False)
    tensors, geometry = make_inputs()
    x, offset, weight, bias, mask = tensors
    out = triton_deform.deform_conv2d(x, offset, weight, bias, mask=mask, **geometry)
    assert torch.equal(out, torchvision_deform_conv2d(x, offset, weight, bias, mask=mask, **geometry))


def test_bad_shapes_raise_naming_them() -> None:
    tensors, geometry = make_inputs()
    x, offset, weight, bias, mask = tensors
    with pytest.raises(ValueError, match=r"offset \(2, 18, 5, 5\) does not match the output size"):
        triton_deform.deform_conv2d(x, offset[:, :, :5, :5], weight, bias, mask=mask, **geometry)
    with pytest.raises(ValueError, match="mask"):
        triton_deform.deform_conv2d(x, offset, weight, bias, mask=mask[:, :4], **geometry)


@pytest.mark.parametrize("version", [1, 2])
def test_layer_with_triton_op_equals_torchvision_op(version: int) -> None:
    """DeformConv2d(op="triton") and torchvision's op compute the same outputs and parameter gradients."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
    layers = [DeformConv2d.from_conv(conv, version, op=op).to(DEVICE) for op in (TORCHVISION_OP, "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    with torch.no_grad():  # non-zero offsets, so the sampling is really deformed
        for layer in layers:
            layer.offset_conv.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    outs = [layer(x) for layer in layers]
    for out in outs:
        out.square().sum().backward()
    assert relative_errors([outs[1]], [outs[0]])[0] < 1e-4
    for (name, p_ref), p_fast in zip(layers[0].named_parameters(), layers[1].parameters()):
        assert relative_errors([p_fast.grad], [p_ref.grad])[0] < 1e-4, name
