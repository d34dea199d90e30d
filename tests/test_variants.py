"""Opt-in variants beyond the paper (issue 11): each mechanism against an independent reference, and the defaults
reproducing the paper's objective exactly.

- shared offsets: one displacement per location for all taps of an :class:`~bundle.networks.OffsetConv2d`;
- an adversarial term on the undeformed (aligned) pass, and the aligned fakes shown to the discriminators;
- local NMI alignment (NMI per patch, averaged);
- misaligned pairs: an L1 term between the deformed output and a paired target, and the paired slice dataset.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle.networks import DicycleGenerator, OffsetConv2d


def _bilinear(image: np.ndarray, y: float, x: float) -> float:
    """Bilinear value of a 2-D array at (y, x), pixels outside the image being 0 (torchvision's convention)."""
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    value = 0.0
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        if 0 <= yy < image.shape[0] and 0 <= xx < image.shape[1]:
            value += (1 - abs(y - yy)) * (1 - abs(x - xx)) * image[yy, xx]
    return value


def _shared_offset_layer(seed: int, **kwargs) -> OffsetConv2d:
    torch.manual_seed(seed)
    return OffsetConv2d(backend="torch", offsets="shared", **kwargs).double()


# ------------------------------------------------------------------------------------------ shared offsets


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_shared_offsets_with_a_constant_field_convolve_the_resampled_input(stride, padding, dilation):
    """A constant displacement (offset conv with zero weights, bias (dy, dx)) makes the deformed convolution the
    plain convolution of the input bilinearly resampled at p + (dy, dx), zeros outside."""
    layer = _shared_offset_layer(
        0, in_channels=2, out_channels=3, kernel_size=3, stride=stride, padding=padding, dilation=dilation
    )
    dy, dx = 0.37, -1.62
    with torch.no_grad():
        layer.offset_conv.weight.zero_()
        layer.offset_conv.bias.copy_(torch.tensor([dy, dx], dtype=torch.float64))
    x = torch.randn(1, 2, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    # the resampled input on the padded grid (positions -padding .. size + padding - 1), then a convolution
    # without padding: taps in the padding sample the image at shifted positions too
    image = x[0].numpy()
    h, w = image.shape[1:]
    resampled = np.array(
        [
            [
                [_bilinear(image[c], yy + dy, xx + dx) for xx in range(-padding, w + padding)]
                for yy in range(-padding, h + padding)
            ]
            for c in range(image.shape[0])
        ]
    )
    expected = F.conv2d(
        torch.from_numpy(resampled)[None], layer.weight, layer.bias, stride=stride, dilation=dilation
    ).detach()
    deformed = layer(x, deform=True).detach()
    torch.testing.assert_close(deformed, expected, rtol=0, atol=1e-12)
    # and the field really moved the content: it differs from the plain convolution
    assert (deformed - layer(x, deform=False)).abs().max() > 1e-2


def test_shared_offsets_with_a_varying_field_match_a_per_location_brute_force():
    """Random offset weights give a displacement that varies per location; every tap of a location is moved by it."""
    layer = _shared_offset_layer(2, in_channels=2, out_channels=2, kernel_size=3, stride=2, padding=1)
    with torch.no_grad():
        layer.offset_conv.weight.normal_(0, 0.8, generator=torch.Generator().manual_seed(3))
        layer.offset_conv.bias.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    offsets = layer._offsets(x).detach()
    assert offsets.shape == (2, 18, 4, 3)
    field = F.conv2d(x, layer.offset_conv.weight, layer.offset_conv.bias, stride=2, padding=1).detach()
    for tap in range(9):  # the per-tap layout holds the same (dy, dx) for every tap
        torch.testing.assert_close(offsets[:, 2 * tap : 2 * tap + 2], field, rtol=0, atol=0)
    assert field.abs().max() > 0.5

    weight, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    expected = np.zeros((2, 2, 4, 3))
    for n, co, oy, ox in itertools.product(range(2), range(2), range(4), range(3)):
        dy, dx = field[n, :, oy, ox].tolist()
        expected[n, co, oy, ox] = bias[co] + sum(
            weight[co, c, i, j] * _bilinear(x[n, c].numpy(), oy * 2 - 1 + i + dy, ox * 2 - 1 + j + dx)
            for c, i, j in itertools.product(range(2), range(3), range(3))
        )
    torch.testing.assert_close(layer(x, deform=True).detach(), torch.from_numpy(expected), rtol=0, atol=1e-12)


def test_shared_offsets_predict_two_channels_and_the_default_state_dict_is_unchanged():
    default = DicycleGenerator(ngf=4, n_blocks=2)
    paper = DicycleGenerator(ngf=4, n_blocks=2, offsets="per_tap")
    shared = DicycleGenerator(ngf=4, n_blocks=2, offsets="shared")
    expected_channels = {"model.1": 98, "model.4": 18, "model.7": 18, "model.10.block.1": 18}  # 2 * kh * kw
    for name, module in default.named_modules():
        if isinstance(module, OffsetConv2d):
            assert module.offset_conv.out_channels == expected_channels[name]
            assert dict(shared.named_modules())[name].offset_conv.out_channels == 2
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in paper.state_dict().items()}
    assert shared.state_dict().keys() == default.state_dict().keys()
    with pytest.raises(ValueError, match="offsets must be one of"):
        DicycleGenerator(ngf=4, n_blocks=1, offsets="global")


def test_a_shared_offset_checkpoint_loads_into_the_default_network_with_the_same_passes():
    """Inference builds the generator with the default: it serves models trained with shared offsets."""
    torch.manual_seed(6)
    shared = DicycleGenerator(ngf=4, n_blocks=2, offsets="shared", backend="torch")
    with torch.no_grad():
        for p in shared.offset_parameters():
            p.normal_(0, 0.3)
    default = DicycleGenerator(ngf=4, n_blocks=2, backend="torch")
    default.load_state_dict(shared.state_dict())
    x = torch.randn(2, 1, 12, 16)
    torch.testing.assert_close(default(x), shared(x), rtol=0, atol=0)
    torch.testing.assert_close(default(x, deform=True), shared(x, deform=True), rtol=1e-5, atol=1e-5)
    assert (shared(x, deform=True) - shared(x)).abs().max() > 1e-3
