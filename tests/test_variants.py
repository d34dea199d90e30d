"""Opt-in variants beyond the paper: each mechanism against an independent reference, and the defaults
reproducing the paper's objective exactly.

- shared offsets: one displacement per location for all taps of an :class:`~bundle.networks.OffsetConv2d`;
- an adversarial term on the undeformed (aligned) pass, and the aligned fakes shown to the discriminators;
- local NMI alignment (NMI per patch, averaged);
- misaligned pairs: an L1 term between the deformed output and a paired target, and the paired slice dataset;
- a smooth displacement field as the deformed pass (``offsets: field``), and a larger-context discriminator.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle.data import PairedSliceDataset, UnpairedSliceDataset, slice_augmentation
from bundle.dicyclegan import DicycleGANLoss, discriminator_logits
from bundle.handlers import TimeBudget
from bundle.losses import discriminator_loss, local_normalized_mutual_information, normalized_mutual_information
from bundle.mind import mind_distance
from bundle.networks import DicycleGenerator, OffsetConv2d, patch_discriminator
from bundle.trainer import DicycleGANTrainer, ImagePool, prepare_paired_batch, prepare_unpaired_batch
from monai.bundle import ConfigParser
from tests.bundle_fixtures import write_tiny_dataset
from torch import nn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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
    """Inference builds the generator with the default: it serves models trained with shared offsets.

    The deformed passes sample the same points in another order of operations, so they are compared in float64
    (8e-14 apart; in float32 6e-5 on an AMD EPYC, where rounding depends on the CPU's kernels)."""
    torch.manual_seed(6)
    shared = DicycleGenerator(ngf=4, n_blocks=2, offsets="shared", backend="torch")
    with torch.no_grad():
        for p in shared.offset_parameters():
            p.normal_(0, 0.3)
    default = DicycleGenerator(ngf=4, n_blocks=2, backend="torch")
    default.load_state_dict(shared.state_dict())
    shared, default = shared.double(), default.double()
    x = torch.randn(2, 1, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(default(x), shared(x), rtol=0, atol=0)
    torch.testing.assert_close(default(x, deform=True), shared(x, deform=True), rtol=0, atol=1e-10)
    assert (shared(x, deform=True) - shared(x)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ displacement field


def _field_generator(seed: int) -> DicycleGenerator:
    torch.manual_seed(seed)
    return DicycleGenerator(ngf=4, n_blocks=1, offsets="field").double()


def test_field_generator_has_plain_convolutions_and_the_field_as_its_offset_parameters():
    generator = _field_generator(0)
    assert not any(isinstance(m, OffsetConv2d) for m in generator.modules())
    assert generator.offset_parameters() == list(generator.field.parameters())
    x = torch.randn(1, 1, 16, 20, dtype=torch.float64)
    undeformed = torch.autograd.grad(generator(x).sum(), generator.offset_parameters(), allow_unused=True)
    assert all(g is None for g in undeformed)  # the served pass does not depend on the field
    deformed = torch.autograd.grad(generator(x, deform=True).sum(), generator.offset_parameters(), allow_unused=True)
    assert deformed[-1] is not None and deformed[-1].abs().sum() > 0  # the deformed pass trains the field's head


@pytest.mark.parametrize("axis, pixels", [(-1, 2), (-2, 1), (-1, -3)])
def test_a_constant_field_shifts_the_undeformed_output_by_whole_pixels(axis, pixels):
    """Zero at initialisation (the deformed pass is the undeformed one); with the head's bias set to a constant
    displacement d, the deformed output at p is the undeformed output at p + d (away from the border)."""
    generator = _field_generator(1)
    x = torch.randn(2, 1, 20, 24, dtype=torch.float64)
    aligned = generator(x)
    torch.testing.assert_close(generator(x, deform=True), aligned, rtol=0, atol=1e-12)
    with torch.no_grad():
        bias = torch.zeros(2, dtype=torch.float64)
        bias[axis] = np.arctanh(pixels / generator.field.max_displacement)
        generator.field.head.bias.copy_(bias)
    deformed = generator(x, deform=True)
    n = aligned.shape[axis]
    expected = aligned.narrow(axis, max(pixels, 0), n - abs(pixels))
    torch.testing.assert_close(deformed.narrow(axis, max(-pixels, 0), n - abs(pixels)), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("size", [(24, 32), (18, 29)])
def test_field_passes_agree_in_one_batch_and_separately(size):
    generator = _field_generator(2)
    with torch.no_grad():
        for p in generator.offset_parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 1, *size, dtype=torch.float64)
    deformed, aligned = generator.forward_both(x)
    torch.testing.assert_close(aligned, generator(x), rtol=0, atol=0)
    torch.testing.assert_close(deformed, generator(x, deform=True), rtol=0, atol=1e-12)
    mixed = generator.forward_mixed(x, 1)
    torch.testing.assert_close(mixed, torch.cat((deformed[:1], aligned[1:])), rtol=0, atol=1e-12)
    assert (deformed - aligned).abs().max() > 1e-3


def test_field_is_a_bicubic_interpolation_of_bounded_control_points():
    """Smooth by construction: the field is the bicubic (align_corners) interpolation of 8 x 8 control points, each
    displaced by at most max_displacement pixels."""
    generator = _field_generator(3)
    with torch.no_grad():
        generator.field.head.weight.normal_(0, 5.0)
    x = torch.randn(1, 1, 64, 64, dtype=torch.float64)
    field = generator.field(x)
    control = field[..., ::9, ::9]  # pixels 0, 9, ..., 63: where the control points lie
    assert control.shape[-2:] == (8, 8)
    assert 1.0 < control.abs().max() <= generator.field.max_displacement
    rebuilt = F.interpolate(control, size=(64, 64), mode="bicubic", align_corners=True)
    torch.testing.assert_close(rebuilt, field, rtol=0, atol=1e-9)


def test_a_patchgan_too_deep_for_its_crops_is_refused_naming_the_sizes():
    """4 layers on 32 px crops used to fail inside instance norm (one pixel left), mid-training."""
    assert len(patch_discriminator(channels=2, num_layers_d=4, input_size=[48, 48])) == 6
    with pytest.raises(
        ValueError, match=r"4 layers \(d_layers\) needs training crops of at least 48 px, got spatial_size \[32, 32\]"
    ):
        patch_discriminator(channels=2, num_layers_d=4, input_size=[32, 32])


def test_unknown_offsets_mode_is_named():
    with pytest.raises(ValueError, match=r"offsets must be one of .*'field'.*got 'global'"):
        DicycleGenerator(ngf=4, n_blocks=1, offsets="global")


# ------------------------------------------------------------------------------------------ loss terms


class _Generator(nn.Module):
    """A fixed 'generator' with DicycleGenerator's interface: G(x) = 2x + c, G_T(x) = the same shifted by one pixel."""

    deformable = True

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor, deform: bool = False) -> torch.Tensor:
        out = 2 * x + self.c
        return torch.roll(out, 1, dims=-1) if deform else out

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(x, deform=True), self(x)

    def forward_mixed(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor:
        return torch.cat((self(x[:num_deformed], deform=True), self(x[num_deformed:])))


class _Discriminator(nn.Module):
    """Logits 0.5 * (every other pixel) + b: a patch map whose LSGAN value is easy to write down."""

    def __init__(self, b: float) -> None:
        super().__init__()
        self.b = b

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, 0.5 * x[..., ::2, ::2] + self.b]  # features, then logits, like PatchDiscriminator


def _fixed_inputs() -> dict:
    gen = torch.Generator().manual_seed(11)
    ramp = torch.linspace(-1, 1, 16)
    real_a = (ramp[:, None] * ramp[None, :]).expand(2, 1, 16, 16) + 0.1 * torch.rand(2, 1, 16, 16, generator=gen)
    real_b = torch.rand(2, 1, 16, 16, generator=gen) ** 2
    return {
        "real_a": real_a,
        "real_b": real_b,
        "g_ab": _Generator(0.3),
        "g_ba": _Generator(-0.2),
        "d_a": _Discriminator(0.1),
        "d_b": _Discriminator(-0.4),
    }


def _lsgan_real(logits: torch.Tensor) -> torch.Tensor:
    return ((logits - 1.0) ** 2).mean()


def test_defaults_reproduce_the_papers_objective_exactly():
    inputs = _fixed_inputs()
    real_a, real_b = inputs["real_a"], inputs["real_b"]
    fake_b, aligned_b = torch.roll(2 * real_a + 0.3, 1, -1), 2 * real_a + 0.3
    fake_a, aligned_a = torch.roll(2 * real_b - 0.2, 1, -1), 2 * real_b - 0.2
    gan_ab = _lsgan_real(0.5 * fake_b[..., ::2, ::2] - 0.4)
    gan_ba = _lsgan_real(0.5 * fake_a[..., ::2, ::2] + 0.1)
    align = (
        2.0
        - normalized_mutual_information(real_a, aligned_b).mean()
        - normalized_mutual_information(real_b, aligned_a).mean()
    )
    cyc = (2 * aligned_b - 0.2 - real_a).abs().mean() + (2 * aligned_a + 0.3 - real_b).abs().mean()
    dicyc = (torch.roll(2 * fake_b - 0.2, 1, -1) - real_a).abs().mean() + (
        torch.roll(2 * fake_a + 0.3, 1, -1) - real_b
    ).abs().mean()
    paper = gan_ab + gan_ba + 0.9 * align + 10.0 * cyc + 10.0 * dicyc

    default = DicycleGANLoss()(**inputs)
    explicit = DicycleGANLoss(lambda_gan_aligned=0.0, alignment="nmi", alignment_patch_size=4, lambda_paired=0.0)(
        **inputs, paired_b=torch.ones(2, 1, 16, 16)
    )
    torch.testing.assert_close(default.total, paper, rtol=1e-6, atol=1e-6)
    assert torch.equal(default.total, explicit.total)  # the switches at their defaults: bit-identical
    assert list(default.terms) == ["gan_ab", "gan_ba", "align", "cyc", "dicyc", "nmi_a", "nmi_b", "total"]
    assert list(explicit.terms) == list(default.terms)


def test_adversarial_term_on_the_aligned_pass_against_a_hand_computation():
    inputs = _fixed_inputs()
    real_a, real_b = inputs["real_a"], inputs["real_b"]
    aligned_b, aligned_a = 2 * real_a + 0.3, 2 * real_b - 0.2
    expected = _lsgan_real(0.5 * aligned_b[..., ::2, ::2] - 0.4) + _lsgan_real(0.5 * aligned_a[..., ::2, ::2] + 0.1)

    paper = DicycleGANLoss()
    variant = DicycleGANLoss(lambda_gan_aligned=0.7)
    assert not paper.discriminate_aligned and variant.discriminate_aligned
    out, base = variant(**inputs), paper(**inputs)
    torch.testing.assert_close(out.terms["gan_aligned"], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.total, base.total + 0.7 * expected, rtol=1e-6, atol=1e-6)
    # the term differs from the deformed one: it judges the other pass
    assert abs(float(out.terms["gan_aligned"] - base.terms["gan_ab"] - base.terms["gan_ba"])) > 1e-3


def test_misaligned_pairs_term_against_a_hand_computation():
    inputs = _fixed_inputs()
    paired_b = torch.roll(inputs["real_a"], (2, -1), dims=(-2, -1)) * 1.5  # same subject, not overlaid
    fake_b = torch.roll(2 * inputs["real_a"] + 0.3, 1, -1)  # the deformed output G_T(x_A)
    expected = (fake_b - paired_b).abs().mean()

    out = DicycleGANLoss(lambda_paired=2.5)(**inputs, paired_b=paired_b)
    base = DicycleGANLoss()(**inputs)
    torch.testing.assert_close(out.terms["paired"], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.total, base.total + 2.5 * expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs paired_b"):
        DicycleGANLoss(lambda_paired=1.0)(**inputs)


def _brute_force_local_nmi(a: torch.Tensor, b: torch.Tensor, patch: int, stride: int, bins: int) -> torch.Tensor:
    """Loop over patch positions, global NMI of each patch where both images vary, mean per item."""
    means = []
    for n in range(a.shape[0]):
        values = []
        for y in range(0, a.shape[-2] - patch + 1, stride):
            for x in range(0, a.shape[-1] - patch + 1, stride):
                pa, pb = a[n : n + 1, :, y : y + patch, x : x + patch], b[n : n + 1, :, y : y + patch, x : x + patch]
                if pa.max() > pa.min() and pb.max() > pb.min():
                    values.append(normalized_mutual_information(pa, pb, num_bins=bins)[0])
        means.append(torch.stack(values).mean() if values else torch.tensor(0.0))
    return torch.stack(means)


def test_local_nmi_matches_a_loop_over_patches_with_the_global_nmi():
    gen = torch.Generator().manual_seed(12)
    a = torch.rand(2, 1, 21, 18, generator=gen)
    a[:, :, :9, :9] = 0.0  # constant patches are left out of the mean
    b = torch.where(a > 0.5, 1.0 - a, a**2) + 0.05 * torch.rand(2, 1, 21, 18, generator=gen)
    b[1] = 0.3  # an item whose second image is constant everywhere: no informative patch
    local = local_normalized_mutual_information(a, b, patch_size=8, stride=5, num_bins=8)
    expected = _brute_force_local_nmi(a, b, patch=8, stride=5, bins=8)
    torch.testing.assert_close(local, expected, rtol=1e-5, atol=1e-6)
    assert float(local[1]) == 0.0 and float(local[0]) > 0.1

    # non-overlapping by default, and the loss uses it for align, nmi_a and nmi_b
    torch.testing.assert_close(
        local_normalized_mutual_information(a, b, patch_size=6, num_bins=8),
        _brute_force_local_nmi(a, b, patch=6, stride=6, bins=8),
        rtol=1e-5,
        atol=1e-6,
    )
    inputs = _fixed_inputs()
    out = DicycleGANLoss(alignment="local_nmi", alignment_patch_size=8, nmi_bins=8)(**inputs)
    nmi_a = _brute_force_local_nmi(inputs["real_a"], 2 * inputs["real_a"] + 0.3, patch=8, stride=8, bins=8).mean()
    torch.testing.assert_close(out.terms["nmi_a"], nmi_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.terms["align"], 2.0 - out.terms["nmi_a"] - out.terms["nmi_b"])
    with pytest.raises(ValueError, match="alignment must be one of"):
        DicycleGANLoss(alignment="ssd")


@pytest.mark.parametrize("descriptor", ["mind", "mind_ssc"])
def test_mind_alignment_is_the_descriptor_distance_of_source_and_undeformed_output(descriptor):
    inputs = _fixed_inputs()
    out = DicycleGANLoss(alignment=descriptor)(**inputs)
    distance_a = mind_distance(inputs["real_a"], 2 * inputs["real_a"] + 0.3, descriptor).mean()
    torch.testing.assert_close(out.terms["nmi_a"], 1.0 - distance_a)
    torch.testing.assert_close(out.terms["align"], 2.0 - out.terms["nmi_a"] - out.terms["nmi_b"])
    paper = DicycleGANLoss()(**inputs)
    for name in ("gan_ab", "gan_ba", "cyc", "dicyc"):  # only the alignment term differs from the paper's objective
        torch.testing.assert_close(out.terms[name], paper.terms[name])
    a = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(13))
    b = (a**2).requires_grad_()
    mind_distance(a, b, descriptor).sum().backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_local_nmi_has_a_gradient():
    a = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(13))
    b = (a**2).requires_grad_()
    local_normalized_mutual_information(a, b, patch_size=8, num_bins=8).sum().backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ trainer wiring


class _Slices(torch.utils.data.Dataset):
    """Two fixed unpaired samples; with ``paired`` also a misaligned paired target of A."""

    def __init__(self, paired: bool) -> None:
        gen = torch.Generator().manual_seed(14)
        self.a, self.b = torch.randn(2, 1, 16, 16, generator=gen), torch.randn(2, 1, 16, 16, generator=gen)
        self.paired = paired

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"A": self.a[index], "B": self.b[index]}
        if self.paired:
            item["B_paired"] = torch.roll(self.a[index], 2, dims=-1).tanh()
        return item


def _d_loss(d: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return discriminator_loss(discriminator_logits(d, real), discriminator_logits(d, fake))


def _one_step(loss: DicycleGANLoss, paired: bool) -> tuple[dict, nn.Module, nn.Module]:
    """One training iteration of tiny networks; the discriminators' learning rate is 0, so they stay as judged."""
    torch.manual_seed(0)
    g_ab = DicycleGenerator(ngf=2, n_blocks=1, backend="torch")
    g_ba = DicycleGenerator(ngf=2, n_blocks=1, backend="torch")
    d_a, d_b = patch_discriminator(channels=2, num_layers_d=1), patch_discriminator(channels=2, num_layers_d=1)
    with torch.no_grad():
        for p in g_ab.offset_parameters() + g_ba.offset_parameters():
            p.normal_(0, 0.05)
    trainer = DicycleGANTrainer(
        "cpu",
        1,
        torch.utils.data.DataLoader(_Slices(paired), batch_size=2),
        g_ab,
        g_ba,
        d_a,
        d_b,
        torch.optim.SGD(itertools.chain(g_ab.parameters(), g_ba.parameters()), lr=0.01),
        torch.optim.SGD(itertools.chain(d_a.parameters(), d_b.parameters()), lr=0.0),
        loss,
        pool_a=ImagePool(0),
        pool_b=ImagePool(0),
        prepare_batch=prepare_paired_batch if paired else prepare_unpaired_batch,
    )
    trainer.run()
    return trainer.state.output[0], d_a, d_b


def test_with_the_aligned_term_the_discriminators_also_judge_the_aligned_fakes():
    on, d_a, d_b = _one_step(DicycleGANLoss(lambda_gan_aligned=1.0), paired=False)
    images, losses = on["images"], on["losses"]
    both_b = torch.cat((images["fake_b"], images["aligned_b"]))
    both_a = torch.cat((images["fake_a"], images["aligned_a"]))
    with torch.no_grad():
        torch.testing.assert_close(losses["d_b"], _d_loss(d_b, images["real_b"], both_b))
        torch.testing.assert_close(losses["d_a"], _d_loss(d_a, images["real_a"], both_a))
        assert abs(float(losses["d_b"] - _d_loss(d_b, images["real_b"], images["fake_b"]))) > 1e-6
    assert "gan_aligned" in losses

    off, d_a, d_b = _one_step(DicycleGANLoss(), paired=False)  # the paper: deformed fakes only
    images, losses = off["images"], off["losses"]
    with torch.no_grad():
        torch.testing.assert_close(losses["d_b"], _d_loss(d_b, images["real_b"], images["fake_b"]))
    assert "gan_aligned" not in losses and "paired_b" not in images


def test_paired_batches_reach_the_misaligned_pairs_term():
    out, _, _ = _one_step(DicycleGANLoss(lambda_paired=1.0), paired=True)
    images, losses = out["images"], out["losses"]
    torch.testing.assert_close(images["paired_b"], torch.roll(_Slices(True).a, 2, dims=-1).tanh())
    torch.testing.assert_close(losses["paired"], (images["fake_b"] - images["paired_b"]).abs().mean())
    with pytest.raises(ValueError, match="'B_paired'"):
        prepare_paired_batch({"A": torch.zeros(1), "B": torch.zeros(1)}, "cpu")


# ------------------------------------------------------------------------------------------ paired slices


def _volume(values: torch.Tensor) -> dict:
    return {"image": values, "image_slices": torch.arange(1, values.shape[-1] - 1)}


def test_paired_slice_dataset_yields_the_same_slice_of_the_pair_with_the_same_augmentation():
    gen = torch.Generator().manual_seed(15)
    pairs_a = [_volume(torch.rand(1, 20, 14, 6, generator=gen)) for _ in range(2)]
    pairs_b = [{"image": 2.0 * v["image"] - 1.0} for v in pairs_a]  # a voxel-wise linear map of its partner
    volumes_b = [_volume(torch.rand(1, 18, 18, 5, generator=gen))]
    augmentation = slice_augmentation(spatial_size=(16, 16), prob=0.9)
    paired = PairedSliceDataset(pairs_a, pairs_b, volumes_b, augmentation, augmentation, samples_per_epoch=8, seed=3)
    unpaired = UnpairedSliceDataset(pairs_a, volumes_b, augmentation, augmentation, samples_per_epoch=8, seed=3)
    for sample_id in range(8):
        sample, reference = paired[sample_id], unpaired[sample_id]
        assert sorted(sample) == ["A", "B", "B_paired"]
        # A and B are drawn exactly as the unpaired dataset draws them
        torch.testing.assert_close(sample["A"], reference["A"], rtol=0, atol=0)
        torch.testing.assert_close(sample["B"], reference["B"], rtol=0, atol=0)
        # the linear map commutes with the (bilinear, edge/border padded) augmentation: same slice, same geometry
        torch.testing.assert_close(sample["B_paired"], 2.0 * sample["A"] - 1.0, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="share the voxel grid"):
        PairedSliceDataset(pairs_a, [{"image": torch.zeros(1, 20, 14, 7)}] * 2, volumes_b, augmentation, augmentation)


# ------------------------------------------------------------------------------------------ config switches


def _train_config(tmp_path, **overrides) -> ConfigParser:
    root = write_tiny_dataset(tmp_path / "data", n_volumes=2)
    datalist = json.loads((root / "datalist.json").read_text(encoding="utf-8"))
    datalist["training_pairs"] = [{"A": pair["A"], "B": pair["B"]} for pair in datalist["validation"]]
    (root / "datalist.json").write_text(json.dumps(datalist), encoding="utf-8")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(
        {
            "bundle_root": str(CONFIGS.parent),
            "dataset_dir": str(root),
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "runs"),
            "device": "$torch.device('cpu')",
            "ngf": 2,
            "n_blocks": 1,
            "spatial_size": [24, 24],  # the smallest crops of a 70 px PatchGAN
            "samples_per_epoch": 2,
            "cache_workers": 0,
            "num_workers": 0,
            **overrides,
        }
    )
    return parser


def test_train_json_defaults_are_the_paper_and_each_switch_reaches_its_component(tmp_path):
    paper = _train_config(tmp_path / "paper")
    loss = paper.get_parsed_content("loss")
    assert (loss.lambda_gan_aligned, loss.alignment, loss.lambda_paired) == (0.0, "nmi", 0.0)
    assert (loss.lambda_cyc, loss.lambda_dicyc, loss.lambda_align) == (10.0, 10.0, 0.9)
    assert paper.get_parsed_content("g_ab").offsets == paper.get_parsed_content("g_ba").offsets == "per_tap"
    assert type(paper.get_parsed_content("train#training_dataset")) is UnpairedSliceDataset
    assert paper.get_parsed_content("train#trainer#prepare_batch") is prepare_unpaired_batch
    assert not any(isinstance(h, TimeBudget) for h in paper.get_parsed_content("train#handlers"))  # no wall-clock stop

    variant = _train_config(
        tmp_path / "variant",
        time_limit_s=60,
        offsets="shared",
        lambda_gan_aligned=0.5,
        alignment="local_nmi",
        alignment_patch_size=8,
        lambda_paired=1.0,
    )
    loss = variant.get_parsed_content("loss")
    assert (loss.lambda_gan_aligned, loss.alignment, loss.alignment_patch_size, loss.lambda_paired) == (
        0.5,
        "local_nmi",
        8,
        1.0,
    )
    assert variant.get_parsed_content("g_ab").offsets == variant.get_parsed_content("g_ba").offsets == "shared"
    dataset = variant.get_parsed_content("train#training_dataset")
    assert isinstance(dataset, PairedSliceDataset)
    assert sorted(dataset[0]) == ["A", "B", "B_paired"] and dataset[0]["B_paired"].shape == (1, 24, 24)
    assert variant.get_parsed_content("train#trainer#prepare_batch") is prepare_paired_batch
    budgets = [h for h in variant.get_parsed_content("train#handlers") if isinstance(h, TimeBudget)]
    assert [b.limit_s for b in budgets] == [60.0]
    assert len(paper.get_parsed_content("d_a")) == len(paper.get_parsed_content("d_b")) == 5  # 70 x 70 PatchGAN

    field = _train_config(tmp_path / "field", offsets="field", d_layers=4, spatial_size=[48, 48])
    assert field.get_parsed_content("g_ab").field is not None and field.get_parsed_content("g_ba").field is not None
    assert field.get_parsed_content("model_settings")["offsets"] == "field"  # travels into settings.json
    assert len(field.get_parsed_content("d_a")) == len(field.get_parsed_content("d_b")) == 6  # one layer more
