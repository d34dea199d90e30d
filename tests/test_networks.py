"""OffsetConv2d against a brute-force deformable convolution, the generator's two passes and the discriminator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from bundle.deform_conv import deform_conv2d_torch, sampling_grid
from bundle.networks import DicycleGenerator, OffsetConv2d, patch_discriminator
from torch import nn

# (kernel_size, stride, padding, dilation)
CONV_CASES = [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (2, 2), (2, 2)),
    ((3, 2), (2, 1), (0, 1), (1, 2)),
    ((7, 7), (1, 1), (0, 0), (1, 1)),
]


def _bilinear_zero_padded(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Value of ``image`` (C, H, W) at real position (y, x): bilinear between pixel centres, zero outside."""
    height, width = image.shape[-2:]
    value = image.new_zeros(image.shape[0])
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return value
    y0, x0 = math.floor(y.item()), math.floor(x.item())
    ly, lx = y - y0, x - x0
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < height and 0 <= xx < width:
                value = value + wy * wx * image[:, yy, xx]
    return value


def brute_force_deform_conv2d(x, offset, weight, bias, stride, padding, dilation):
    """Deformable convolution written from its definition (Dai et al. 2017), one output value at a time."""
    n, _, _, _ = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[-2:]
    rows = []
    for b in range(n):
        for oy in range(h_out):
            for ox in range(w_out):
                acc = bias.clone() if bias is not None else x.new_zeros(c_out)
                for i in range(kh):
                    for j in range(kw):
                        tap = i * kw + j
                        y = oy * stride[0] - padding[0] + i * dilation[0] + offset[b, 2 * tap, oy, ox]
                        xx = ox * stride[1] - padding[1] + j * dilation[1] + offset[b, 2 * tap + 1, oy, ox]
                        acc = acc + weight[:, :, i, j] @ _bilinear_zero_padded(x[b], y, xx)
                rows.append(acc)
    return torch.stack(rows).view(n, h_out, w_out, c_out).permute(0, 3, 1, 2)


def _layer(kernel, stride, padding, dilation, in_channels=3, out_channels=4, bias=True) -> OffsetConv2d:
    torch.manual_seed(0)
    return OffsetConv2d(
        in_channels, out_channels, kernel, stride, padding, dilation, bias=bias, backend="torch"
    ).double()


@pytest.mark.parametrize("kernel,stride,padding,dilation", CONV_CASES)
def test_undeformed_and_zero_offsets_equal_conv2d(kernel, stride, padding, dilation):
    layer = _layer(kernel, stride, padding, dilation)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = F.conv2d(x, layer.weight, layer.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x, deform=False), expected, rtol=0, atol=1e-10)
    # offset_conv is zero-initialised: the deformed pass starts as the plain convolution
    torch.testing.assert_close(layer(x, deform=True), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kernel,stride,padding,dilation", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_random_offsets_match_brute_force_forward_and_gradients(kernel, stride, padding, dilation, bias):
    layer = _layer(kernel, stride, padding, dilation, bias=bias)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    h_out = (8 + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    w_out = (9 + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    taps = kernel[0] * kernel[1]
    # offsets up to 2.5 px move taps across pixels and out of the image
    offset = (torch.rand(2, 2 * taps, h_out, w_out, dtype=torch.float64, generator=gen) * 5 - 2.5).requires_grad_()
    bias_t = layer.bias

    ours = deform_conv2d_torch(x, offset, layer.weight, bias_t, stride, padding, dilation)
    reference = brute_force_deform_conv2d(x, offset, layer.weight, bias_t, stride, padding, dilation)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)

    upstream = torch.randn_like(ours)
    params = [x, offset, layer.weight] + ([bias_t] if bias else [])
    grads_ours = torch.autograd.grad(ours, params, upstream)
    grads_ref = torch.autograd.grad(reference, params, upstream)
    for got, want in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_gradcheck_through_offset_conv():
    layer = _layer((3, 3), (1, 1), (1, 1), (1, 1), in_channels=2, out_channels=2)
    with torch.no_grad():
        layer.offset_conv.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        layer.offset_conv.bias.uniform_(-0.7, 0.7, generator=torch.Generator().manual_seed(4))
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp, deform=True), (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda w, ow: deform_conv2d_torch(x.detach(), F.conv2d(x.detach(), ow, layer.offset_conv.bias, padding=1), w),
        (layer.weight.detach().clone().requires_grad_(), layer.offset_conv.weight.detach().clone().requires_grad_()),
        eps=1e-6,
        atol=1e-6,
    )


def test_one_pixel_offset_on_every_tap_equals_conv_of_shifted_input():
    layer = _layer((3, 3), (1, 1), (1, 1), (1, 1))
    x = torch.randn(1, 3, 10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    offset = torch.zeros(1, 18, 10, 12, dtype=torch.float64)
    offset[:, 0::2] = 1.0  # dy = +1: every tap reads one row further down
    offset[:, 1::2] = -1.0  # dx = -1: and one column to the left
    deformed = deform_conv2d_torch(x, offset, layer.weight, layer.bias, (1, 1), (1, 1), (1, 1))
    shifted = torch.zeros_like(x)
    shifted[:, :, :-1, 1:] = x[:, :, 1:, :-1]  # shifted[y, x] = x[y + 1, x - 1]
    expected = F.conv2d(shifted, layer.weight, layer.bias, padding=1)
    # rows/columns whose taps reach the border see different zero padding; the interior is identical
    torch.testing.assert_close(deformed[..., 1:-2, 2:-1], expected[..., 1:-2, 2:-1], rtol=0, atol=1e-10)


def test_single_row_and_single_column_inputs():
    layer = _layer((3, 3), (1, 1), (1, 1), (1, 1))
    gen = torch.Generator().manual_seed(7)
    for shape in ((1, 3, 1, 5), (1, 3, 4, 1)):
        x = torch.randn(*shape, dtype=torch.float64, generator=gen)
        offset = torch.rand(1, 18, *shape[-2:], dtype=torch.float64, generator=gen) * 2 - 1
        ours = deform_conv2d_torch(x, offset, layer.weight, layer.bias, (1, 1), (1, 1), (1, 1))
        reference = brute_force_deform_conv2d(x, offset, layer.weight, layer.bias, (1, 1), (1, 1), (1, 1))
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sampling_split_across_threads_is_exact(threads):
    """A single slice is split into one chunk of sample rows per CPU thread (3 threads: uneven last chunk)."""
    layer = _layer((3, 3), (1, 1), (1, 1), (1, 1))
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(1, 3, 7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    offset = (torch.rand(1, 18, 7, 5, dtype=torch.float64, generator=gen) * 4 - 2).requires_grad_()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = deform_conv2d_torch(x, offset, layer.weight, layer.bias, (1, 1), (1, 1), (1, 1))
        grads_ours = torch.autograd.grad(ours.square().sum(), (x, offset))
    finally:
        torch.set_num_threads(previous)
    reference = brute_force_deform_conv2d(x, offset, layer.weight, layer.bias, (1, 1), (1, 1), (1, 1))
    grads_ref = torch.autograd.grad(reference.square().sum(), (x, offset))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10)
    for got, want in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_torchvision_backend_matches_torch_backend():
    from bundle.deform_conv import torchvision_deform_conv2d_problem

    problem = torchvision_deform_conv2d_problem("cpu")
    if problem is not None:
        pytest.skip(f"torchvision's deform_conv2d does not run here ({problem}); the torch path is tested above")
    layer = _layer((3, 3), (2, 2), (1, 1), (1, 1))
    with torch.no_grad():
        layer.offset_conv.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(8))
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    fused = OffsetConv2d(3, 4, 3, 2, 1, backend="torchvision").double()
    fused.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fused(x), layer(x), rtol=0, atol=1e-10)


def test_bad_backend_and_offset_shape_are_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        OffsetConv2d(1, 1, 3, backend="cuda")
    with pytest.raises(ValueError, match="2 \\* kh \\* kw = 18 channels"):
        deform_conv2d_torch(torch.zeros(1, 1, 4, 4), torch.zeros(1, 8, 4, 4), torch.zeros(1, 1, 3, 3), padding=(1, 1))


def _tiny_generator(**kwargs) -> DicycleGenerator:
    torch.manual_seed(0)
    return DicycleGenerator(ngf=4, n_blocks=2, backend="torch", **kwargs)


def _randomise_offsets(generator: DicycleGenerator, std: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in generator.offset_parameters():
            param.normal_(0, std, generator=gen)


def test_vanilla_generator_has_the_reference_parameter_count():
    assert sum(p.numel() for p in DicycleGenerator(deformable=False).parameters()) == 11_365_633


def test_deformable_generator_places_four_offset_convs_where_the_paper_does():
    generator = DicycleGenerator(ngf=8, n_blocks=3, backend="torch")
    names = [name for name, module in generator.named_modules() if isinstance(module, OffsetConv2d)]
    # input block, two down-sampling blocks, first convolution of the first residual block
    assert names == ["model.1", "model.4", "model.7", "model.10.block.1"]
    assert [generator.get_submodule(n).stride for n in names] == [(1, 1), (2, 2), (2, 2), (1, 1)]


@pytest.mark.parametrize("size", [(17, 23), (30, 33), (32, 32), (13, 8)])
def test_output_shape_equals_input_shape(size):
    generator = _tiny_generator()
    x = torch.randn(2, 1, *size)
    assert generator(x).shape == x.shape
    assert generator(x, deform=False).shape == x.shape


def test_passes_agree_at_initialisation_and_differ_once_offsets_are_nonzero():
    generator = _tiny_generator()
    x = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        torch.testing.assert_close(generator(x, deform=True), generator(x, deform=False), rtol=0, atol=1e-4)
        _randomise_offsets(generator)
        difference = (generator(x, deform=True) - generator(x, deform=False)).abs().max()
    assert difference > 1e-3


def test_forward_both_equals_two_separate_passes():
    generator = _tiny_generator()
    _randomise_offsets(generator)
    x = torch.randn(3, 1, 20, 28, generator=torch.Generator().manual_seed(13))
    deformed, undeformed = generator.forward_both(x)
    torch.testing.assert_close(deformed, generator(x, deform=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(undeformed, generator(x, deform=False), rtol=0, atol=1e-5)


def test_undeformed_pass_does_not_use_offset_parameters():
    generator = _tiny_generator()
    _randomise_offsets(generator)
    x = torch.randn(1, 1, 16, 16)
    undeformed_grads = torch.autograd.grad(
        generator(x, deform=False).sum(), generator.offset_parameters(), allow_unused=True
    )
    assert all(g is None for g in undeformed_grads)
    deformed_grads = torch.autograd.grad(generator(x, deform=True).sum(), generator.offset_parameters())
    assert all(g.abs().sum() > 0 for g in deformed_grads)


def test_plain_call_is_the_undeformed_pass():
    generator = _tiny_generator()
    _randomise_offsets(generator)
    x = torch.randn(1, 1, 20, 28, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        plain, aligned, deformed = generator(x), generator(x, deform=False), generator(x, deform=True)
    torch.testing.assert_close(plain, aligned, rtol=0, atol=0)
    assert (plain - deformed).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # InstanceNorm's own input check, not our code
@pytest.mark.parametrize("size", [(32, 32), (18, 29)])
def test_script_and_trace_compute_the_undeformed_pass_with_the_same_state_dict(size):
    generator = _tiny_generator().eval()
    _randomise_offsets(generator)
    scripted = torch.jit.script(generator)
    traced = torch.jit.trace(generator, torch.randn(1, 1, 32, 32))
    assert scripted.state_dict().keys() == generator.state_dict().keys()
    x = torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        expected = generator(x, deform=False)
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(traced(x), expected, rtol=0, atol=1e-6)


def test_vanilla_generator_ignores_the_deform_flag():
    generator = _tiny_generator(deformable=False)
    assert generator.offset_parameters() == []
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(generator(x, deform=True), generator(x, deform=False), rtol=0, atol=0)


def test_output_activation():
    x = torch.randn(1, 1, 16, 16) * 50
    generator = _tiny_generator(out_activation="tanh")
    with torch.no_grad():
        generator.model[-2].weight.mul_(100)  # push the output far into saturation
        out = generator(x)
    assert out.abs().max() <= 1.0
    assert isinstance(_tiny_generator().model[-1], nn.Identity)


def test_generator_rejects_volumes_with_a_clear_message():
    with pytest.raises(ValueError, match=r"2-D slices of shape \(N, C, H, W\), got shape \(1, 1, 8, 16, 16\)"):
        _tiny_generator()(torch.zeros(1, 1, 8, 16, 16))


def test_discriminator_is_a_70x70_patchgan():
    discriminator = patch_discriminator(in_channels=1, channels=8)
    receptive_field, jump = 1, 1
    for module in discriminator.modules():
        if isinstance(module, nn.Conv2d):
            receptive_field += (module.kernel_size[0] - 1) * jump
            jump *= module.stride[0]
    assert receptive_field == 70
    assert [m.stride[0] for m in discriminator.modules() if isinstance(m, nn.Conv2d)] == [2, 2, 2, 1, 1]
    assert sum(isinstance(m, nn.InstanceNorm2d) for m in discriminator.modules()) == 3
    logits = discriminator(torch.randn(2, 1, 128, 128))[-1]
    assert logits.shape == (2, 1, 14, 14)  # CycleGAN's 30x30 map at 256 px is 14x14 at 128 px


def test_forward_mixed_deforms_only_the_leading_items():
    generator = _tiny_generator()
    _randomise_offsets(generator)
    x = torch.randn(3, 1, 20, 20, generator=torch.Generator().manual_seed(14))
    mixed = generator.forward_mixed(x, 2)
    torch.testing.assert_close(mixed[:2], generator(x[:2], deform=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[2:], generator(x[2:], deform=False), rtol=0, atol=1e-5)


def test_offset_conv_forward_mixed_matches_separate_calls():
    layer = _layer((3, 3), (2, 2), (1, 1), (1, 1))
    with torch.no_grad():
        layer.offset_conv.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(15))
    x = torch.randn(3, 3, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    mixed = layer.forward_mixed(x, 1)
    torch.testing.assert_close(mixed[:1], layer(x[:1], deform=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed[1:], layer(x[1:], deform=False), rtol=0, atol=1e-12)


def test_one_batch_path_used_on_accelerators_equals_separate_passes():
    generator = _tiny_generator()
    _randomise_offsets(generator)
    x = torch.randn(2, 1, 20, 20, generator=torch.Generator().manual_seed(17))
    one_batch = generator._run(torch.cat((x, x)), 2)  # the path forward_both takes off the CPU
    torch.testing.assert_close(one_batch[:2], generator(x, deform=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(one_batch[2:], generator(x, deform=False), rtol=0, atol=1e-5)


def test_sampling_grid_of_zero_offsets_is_the_tap_positions() -> None:
    """Undeformed taps: tap (i, j) of output (oy, ox) at (oy * stride - pad + i * dil, ox * stride - pad + j * dil),
    pixel coordinates recovered from grid_sample's normalised ones (align_corners=True)."""
    h, w, stride, padding, dilation = 9, 7, (2, 1), (1, 2), (2, 1)
    h_out, w_out = (h + 2 * 1 - 2 * 2 - 1) // 2 + 1, (w + 2 * 2 - 1 * 2 - 1) // 1 + 1
    grid = sampling_grid(torch.zeros(2, 18, h_out, w_out), (h, w), (3, 3), stride, padding, dilation)
    assert grid.shape == (2, 9 * h_out, w_out, 2)
    pixel_x, pixel_y = (grid[..., 0] + 1) * (w - 1) / 2, (grid[..., 1] + 1) * (h - 1) / 2
    for i in range(3):
        for j in range(3):
            rows = slice((i * 3 + j) * h_out, (i * 3 + j + 1) * h_out)
            expected_y = torch.arange(h_out) * stride[0] - padding[0] + i * dilation[0]
            expected_x = torch.arange(w_out) * stride[1] - padding[1] + j * dilation[1]
            torch.testing.assert_close(pixel_y[:, rows], expected_y.view(1, -1, 1).expand(2, h_out, w_out).float())
            torch.testing.assert_close(pixel_x[:, rows], expected_x.view(1, 1, -1).expand(2, h_out, w_out).float())
