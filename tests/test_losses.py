"""Tests of bundle.losses (differentiable NMI, LSGAN criteria) and bundle.dicyclegan (the objective, eq. 1-4)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bundle.dicyclegan import DicycleGANLoss, DiscriminatorObjective, GeneratorObjective
from bundle.losses import alignment_loss, discriminator_loss, normalized_mutual_information
from bundle.networks import DicycleGenerator, OffsetConv2d, patch_discriminator
from sklearn.metrics import normalized_mutual_info_score
from torch import nn

nmi = normalized_mutual_information


def smooth_field(n: int, size: int, blur: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Gaussian-blurred white noise of shape (n, 1, size, size): a structured, smooth image."""
    gen = torch.Generator().manual_seed(seed)
    r = int(3 * blur)
    k = torch.exp(-(torch.arange(-r, r + 1.0) ** 2) / (2 * blur**2))
    k = k / k.sum()
    x = torch.randn(n, 1, size + 2 * r, size + 2 * r, generator=gen)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def hard_nmi(a: torch.Tensor, b: torch.Tensor, num_bins: int = 32) -> float:
    """sklearn's NMI of the two images quantised into num_bins equal bins over each image's own range."""

    def labels(x: torch.Tensor) -> np.ndarray:
        x = x.flatten().double()
        unit = ((x - x.min()) / (x.max() - x.min())).numpy()
        return np.clip(np.floor(unit * num_bins), 0, num_bins - 1).astype(int)

    return normalized_mutual_info_score(labels(a), labels(b), average_method="arithmetic")


def translate(img: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """out(p) = img(p + t), t = (dx, dy) in pixels, bilinear; differentiable in t."""
    n, _, h, w = img.shape
    eye = torch.eye(2, 3).expand(n, 2, 3)
    shift = torch.stack((t[0] * 2 / w, t[1] * 2 / h)).view(1, 2, 1) * torch.tensor([0.0, 0.0, 1.0])
    grid = F.affine_grid(eye + shift, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------------------------- NMI


def test_nmi_tends_to_hard_histogram_nmi_as_window_narrows():
    a = smooth_field(1, 64, seed=1)
    b = torch.exp(a) + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))
    reference = hard_nmi(a, b)
    errors = [abs(nmi(a, b, sigma_ratio=s).item() - reference) for s in (0.5, 0.2, 0.1, 0.05)]
    assert all(e1 > e2 for e1, e2 in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-2, errors
    # the other bin count is honoured too
    assert nmi(a, b, num_bins=16, sigma_ratio=0.05).item() == pytest.approx(hard_nmi(a, b, 16), abs=1e-2)


def test_nmi_of_image_with_itself_and_invertible_remaps():
    x = smooth_field(1, 64, seed=3)
    # narrow window: the maximum, 1
    assert nmi(x, x, sigma_ratio=0.05).item() == pytest.approx(1.0, abs=0.02)
    # default window: the maximum is lower (~0.66 here), since the window blurs the joint more than the marginals
    self_nmi = nmi(x, x).item()
    assert 0.6 < self_nmi < 0.75
    # remaps that keep the bins (negation; cyclic shift of the range, invertible but not monotone) keep the value
    unit = (x - x.min()) / (x.max() - x.min())
    assert nmi(x, -3.0 * x + 7.0).item() == pytest.approx(self_nmi, abs=1e-4)
    assert nmi(x, (unit + 0.5) % 1.0).item() == pytest.approx(self_nmi, abs=0.02)
    # a non-linear monotone remap moves samples across bins, so only nearly
    assert nmi(x, torch.exp(2.0 * x)).item() == pytest.approx(self_nmi, abs=0.03)


def test_nmi_of_independent_noise_is_near_zero():
    x = smooth_field(2, 128, seed=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert nmi(x, noise).max().item() < 0.01
    assert nmi(x, x).min().item() > 0.5


def test_nmi_decreases_with_misalignment():
    field = smooth_field(4, 80, seed=6)
    fixed = field[..., 8:72, 8:72]
    values = [nmi(fixed, field[..., 8 + s : 72 + s, 8:72]) for s in (0, 1, 2, 4, 8)]
    for v1, v2 in itertools.pairwise(values):
        assert torch.all(v1 > v2 + 0.005), (v1, v2)


def test_nmi_gradient_registers_a_translated_image():
    fixed = smooth_field(1, 48, seed=7)
    true_shift = torch.tensor([2.5, -2.0])
    moving = translate(fixed, true_shift)
    fixed = torch.exp(fixed)  # different contrast: NMI, not intensity difference, must drive the registration
    mask = torch.zeros_like(fixed)
    mask[..., 8:-8, 8:-8] = 1  # ignore the border replicated by the translation
    t = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([t], lr=0.2)
    for _ in range(40):
        opt.zero_grad()
        (-nmi(fixed, translate(moving, t), mask=mask).mean()).backward()
        opt.step()
    # translate(moving, t) = fixed shifted by t + true_shift; aligned when t = -true_shift
    assert (t.detach() + true_shift).norm().item() < 0.3


def test_nmi_per_item_matches_single_calls():
    a = smooth_field(3, 32, seed=8)
    b = torch.cat((torch.exp(a[:1]), smooth_field(2, 32, seed=9) * 5.0 + 3.0))
    batch = nmi(a, b)
    assert batch.shape == (3,)
    singles = torch.stack([nmi(a[i : i + 1], b[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(batch, singles)
    assert batch[0] > 0.5 > batch[1:].max()


def test_nmi_mask_restricts_samples():
    a = smooth_field(2, 32, seed=10)
    b = a**2
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask[..., 4:20, 6:30] = True
    a_out, b_out = a.clone(), b.clone()
    a_out[~mask] = 1e6  # would dominate the per-image range, and the histogram, if not masked
    b_out[~mask] = float("nan")
    crop = (..., slice(4, 20), slice(6, 30))
    expected = nmi(a[crop], b[crop])
    torch.testing.assert_close(nmi(a_out, b_out, mask=mask), expected)
    torch.testing.assert_close(nmi(a_out, b_out, mask=mask[:1].float()), expected)  # broadcast, float mask
    assert not torch.allclose(nmi(a, b), expected)


def test_nmi_constant_or_empty_is_zero_without_nan():
    a = torch.zeros(3, 1, 16, 16, requires_grad=True)
    b = smooth_field(3, 16, seed=11).requires_grad_()
    with torch.no_grad():
        a[1] = b[1]
    mask = torch.ones(3, 1, 16, 16)
    mask[2] = 0  # empty mask for the last item
    values = nmi(a, b, mask=mask)
    assert values[0].item() == 0.0 and values[2].item() == 0.0 and values[1].item() > 0.5
    values.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert nmi(torch.ones(1, 1, 8, 8), torch.ones(1, 1, 8, 8)).item() == 0.0


def test_nmi_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        nmi(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


# --------------------------------------------------------------------------------------------------------- objective


def make_generator(deformable: bool = True, seed: int = 0) -> DicycleGenerator:
    """Tiny generator whose offsets are non-zero, so that G_T(x) != G(x)."""
    torch.manual_seed(seed)
    g = DicycleGenerator(ngf=4, n_blocks=1, deformable=deformable)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, OffsetConv2d):
                m.offset_conv.weight.normal_(0.0, 0.1)
                m.offset_conv.bias.normal_(0.0, 1.0)
    return g


def make_discriminator(seed: int = 0) -> nn.Module:
    """Tiny PatchGAN (list output) with weights large enough that its logits tell images apart."""
    torch.manual_seed(seed)
    d = patch_discriminator(in_channels=1, channels=8)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0.0, 0.1)
    return d


class RecordingGenerator(nn.Module):
    """Delegates to a generator and records each call: ("forward", deform, input), ("both", input) or
    ("mixed", num_deformed, input)."""

    def __init__(self, g: DicycleGenerator) -> None:
        super().__init__()
        self.g = g
        self.deformable = g.deformable
        self.calls: list[tuple] = []

    def forward(self, x: torch.Tensor, deform: bool = True) -> torch.Tensor:
        self.calls.append(("forward", deform, x))
        return self.g(x, deform=deform)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(("both", x))
        return self.g.forward_both(x)

    def forward_mixed(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor:
        self.calls.append(("mixed", num_deformed, x))
        return self.g.forward_mixed(x, num_deformed)


class RecordingDiscriminator(nn.Module):
    def __init__(self, d: nn.Module) -> None:
        super().__init__()
        self.d = d
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor):
        self.inputs.append(x)
        return self.d(x)


class ConstantDiscriminator(nn.Module):
    """Logits that do not depend on the image: the GAN terms carry no gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 1, 2, 2)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    return smooth_field(2, 32, blur=2.0, seed=20), torch.exp(smooth_field(2, 32, blur=2.0, seed=21))


def lsgan_g(d: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return ((d(x)[-1] - 1.0) ** 2).mean()


def test_objective_terms_match_hand_computation(images):
    x_a, x_b = images
    g_ab, g_ba = make_generator(seed=1), make_generator(seed=2)
    d_a, d_b = make_discriminator(seed=3), make_discriminator(seed=4)
    loss_fn = DicycleGANLoss(lambda_cyc=10.0, lambda_dicyc=5.0, lambda_align=0.9)
    out = loss_fn(x_a, x_b, g_ab, g_ba, d_a, d_b)

    with torch.no_grad():
        fake_b, aligned_b = g_ab(x_a, deform=True), g_ab(x_a, deform=False)
        fake_a, aligned_a = g_ba(x_b, deform=True), g_ba(x_b, deform=False)
        assert (fake_b - aligned_b).abs().mean() > 0.05 * aligned_b.std()  # the two passes really differ
        expected = {
            "gan_ab": lsgan_g(d_b, fake_b),
            "gan_ba": lsgan_g(d_a, fake_a),
            "nmi_a": nmi(x_a, aligned_b).mean(),
            "nmi_b": nmi(x_b, aligned_a).mean(),
            "align": alignment_loss(x_a, aligned_b, x_b, aligned_a),
            "cyc": (g_ba(aligned_b, deform=False) - x_a).abs().mean()
            + (g_ab(aligned_a, deform=False) - x_b).abs().mean(),
            "dicyc": (g_ba(fake_b, deform=True) - x_a).abs().mean() + (g_ab(fake_a, deform=True) - x_b).abs().mean(),
        }
        expected["total"] = (
            expected["gan_ab"]
            + expected["gan_ba"]
            + 0.9 * expected["align"]
            + 10 * expected["cyc"]
            + 5 * expected["dicyc"]
        )
        # the GAN and alignment terms tell the two passes apart (by far more than the tolerance below)
        assert abs(lsgan_g(d_b, aligned_b) - expected["gan_ab"]) > 1e-2
        assert abs(nmi(x_a, fake_b).mean() - expected["nmi_a"]) > 1e-4
        assert abs(nmi(x_b, fake_a).mean() - expected["nmi_b"]) > 1e-4

    assert set(out.terms) == set(expected)
    for name, value in expected.items():
        assert out.terms[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name
        assert not out.terms[name].requires_grad
    assert out.total.requires_grad
    assert out.total.item() == pytest.approx(expected["total"].item(), rel=1e-5)
    assert 1 - expected["nmi_a"] - expected["nmi_b"] + 1 == pytest.approx(expected["align"].item())

    # images for the trainer: deformed fakes for the pools, undeformed outputs and cycles, all detached
    torch.testing.assert_close(out.fake_b, fake_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.aligned_b, aligned_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.fake_a, fake_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.aligned_a, aligned_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cycle_a, g_ba(aligned_b, deform=False).detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.cycle_b, g_ab(aligned_a, deform=False).detach(), rtol=1e-4, atol=1e-5)
    for img in (out.fake_a, out.fake_b, out.aligned_a, out.aligned_b, out.cycle_a, out.cycle_b):
        assert not img.requires_grad


def test_objective_wiring_gan_sees_deformed_outputs(images):
    x_a, x_b = images
    g_ab, g_ba = RecordingGenerator(make_generator(seed=1)), RecordingGenerator(make_generator(seed=2))
    d_a, d_b = RecordingDiscriminator(make_discriminator(seed=3)), RecordingDiscriminator(make_discriminator(seed=4))
    out = DicycleGANLoss()(x_a, x_b, g_ab, g_ba, d_a, d_b)

    # first translation: one batched call for both passes; cycles: one batch, deformed items first
    assert [c[0] for c in g_ab.calls] == ["both", "mixed"]
    assert g_ab.calls[0][1] is x_a
    _, n, cycle_input = g_ab.calls[1]
    assert n == len(x_b)
    torch.testing.assert_close(cycle_input[:n].detach(), out.fake_a)  # G_T^AB(G_T^BA(x_B))
    torch.testing.assert_close(cycle_input[n:].detach(), out.aligned_a)  # G^AB(G^BA(x_B))
    assert [c[0] for c in g_ba.calls] == ["both", "mixed"]

    assert len(d_b.inputs) == len(d_a.inputs) == 1
    torch.testing.assert_close(d_b.inputs[0].detach(), out.fake_b)
    torch.testing.assert_close(d_a.inputs[0].detach(), out.fake_a)
    assert not torch.allclose(out.fake_b, out.aligned_b, atol=1e-3)


def test_cyclegan_mode_runs_each_generator_minimum_times(images):
    x_a, x_b = images
    g_ab = RecordingGenerator(make_generator(deformable=False, seed=1))
    g_ba = RecordingGenerator(make_generator(deformable=False, seed=2))
    d_a, d_b = RecordingDiscriminator(make_discriminator(seed=3)), RecordingDiscriminator(make_discriminator(seed=4))
    out = DicycleGANLoss(lambda_cyc=10.0, lambda_dicyc=0.0, lambda_align=0.0)(x_a, x_b, g_ab, g_ba, d_a, d_b)

    # one translation (forward_both of a non-deformable generator is one pass) and one cycle per generator
    for g in (g_ab, g_ba):
        assert [c[0] for c in g.calls] == ["both", "forward"]
        assert g.calls[0][1] is (x_a if g is g_ab else x_b)  # the input itself, not a batch of two copies
    assert len(d_a.inputs) == len(d_b.inputs) == 1
    assert out.fake_b is out.aligned_b or torch.equal(out.fake_b, out.aligned_b)

    with torch.no_grad():
        y_b, y_a = g_ab.g(x_a), g_ba.g(x_b)
        cyc = (g_ba.g(y_b) - x_a).abs().mean() + (g_ab.g(y_a) - x_b).abs().mean()
        nmi_a, nmi_b = nmi(x_a, y_b).mean(), nmi(x_b, y_a).mean()
        gan = lsgan_g(d_b.d, y_b) + lsgan_g(d_a.d, y_a)
    # the weight-0 terms are still reported (free here): align from NMI under no_grad, dicyc == cyc
    assert out.terms["cyc"].item() == pytest.approx(cyc.item(), rel=1e-5)
    assert out.terms["dicyc"].item() == pytest.approx(cyc.item(), rel=1e-5)
    assert out.terms["nmi_a"].item() == pytest.approx(nmi_a.item(), rel=1e-5)
    assert out.terms["align"].item() == pytest.approx(2 - nmi_a.item() - nmi_b.item(), rel=1e-5)
    assert out.total.item() == pytest.approx((gan + 10 * cyc).item(), rel=1e-5)


def test_zero_weights_skip_work_on_deformable_generators(images):
    x_a, x_b = images
    g_ab, g_ba = RecordingGenerator(make_generator(seed=1)), RecordingGenerator(make_generator(seed=2))
    out = DicycleGANLoss(lambda_dicyc=0.0)(x_a, x_b, g_ab, g_ba, make_discriminator(), make_discriminator())
    for g in (g_ab, g_ba):
        assert [c[:2] for c in g.calls[1:]] == [("forward", False)]  # no deformed cycle
    assert out.terms["dicyc"].item() == 0.0

    g_ab.calls.clear()
    out = DicycleGANLoss(lambda_cyc=0.0)(x_a, x_b, g_ab, g_ba, make_discriminator(), make_discriminator())
    assert [c[:2] for c in g_ab.calls[1:]] == [("forward", True)]  # no undeformed cycle
    assert out.terms["cyc"].item() == 0.0 and out.cycle_a is None and out.terms["dicyc"].item() > 0


def offset_grads(g: DicycleGenerator) -> list[torch.Tensor | None]:
    return [p.grad for p in g.offset_parameters()]


def touched(grads: list[torch.Tensor | None]) -> bool:
    return any(grad is not None and grad.abs().sum() > 0 for grad in grads)


def test_offset_parameters_learn_only_from_deformed_terms(images):
    x_a, x_b = images

    def run(loss_fn: DicycleGANLoss, d_a: nn.Module, d_b: nn.Module) -> tuple[DicycleGenerator, DicycleGenerator]:
        g_ab, g_ba = make_generator(seed=1), make_generator(seed=2)
        loss_fn(x_a, x_b, g_ab, g_ba, d_a, d_b).total.backward()
        return g_ab, g_ba

    # alignment and undeformed cycle only (the GAN terms are constants): theta learns, theta_T does not
    g_ab, g_ba = run(DicycleGANLoss(lambda_dicyc=0.0), ConstantDiscriminator(), ConstantDiscriminator())
    for g in (g_ab, g_ba):
        assert not touched(offset_grads(g))
        assert touched([g.model[1].weight.grad])  # theta of the first OffsetConv2d
    # the deformed cycle reaches theta_T
    g_ab, g_ba = run(DicycleGANLoss(lambda_cyc=0.0, lambda_align=0.0), ConstantDiscriminator(), ConstantDiscriminator())
    assert touched(offset_grads(g_ab)) and touched(offset_grads(g_ba))
    # and so do the GAN terms
    no_cycles = DicycleGANLoss(lambda_cyc=0.0, lambda_dicyc=0.0, lambda_align=0.0)
    g_ab, g_ba = run(no_cycles, make_discriminator(seed=3), make_discriminator(seed=4))
    assert touched(offset_grads(g_ab)) and touched(offset_grads(g_ba))


def test_discriminator_loss_value():
    real, fake = torch.tensor([[0.5, 1.5]]), torch.tensor([[0.25, -1.0]])
    expected = 0.5 * (((0.5 - 1) ** 2 + (1.5 - 1) ** 2) / 2 + (0.25**2 + 1.0**2) / 2)
    assert discriminator_loss(real, fake).item() == pytest.approx(expected)


def test_discriminator_step_value_and_no_generator_gradient(images):
    x_a, x_b = images
    g_ab, g_ba = make_generator(seed=1), make_generator(seed=2)
    d_a, d_b = make_discriminator(seed=3), make_discriminator(seed=4)
    fake_b, fake_a = g_ab(x_a, deform=True), g_ba(x_b, deform=True)
    loss_d_a, loss_d_b = DiscriminatorObjective(d_a, d_b)(x_a, x_b, fake_a, fake_b)
    with torch.no_grad():
        expected = 0.5 * (((d_b(x_b)[-1] - 1) ** 2).mean() + (d_b(fake_b)[-1] ** 2).mean())
    assert loss_d_b.item() == pytest.approx(expected.item(), rel=1e-5)
    (loss_d_a + loss_d_b).backward()
    assert all(p.grad is None for p in itertools.chain(g_ab.parameters(), g_ba.parameters()))
    assert touched([p.grad for p in d_b.parameters()]) and touched([p.grad for p in d_a.parameters()])


def test_plain_tensor_discriminator(images):
    """A discriminator returning a tensor (not PatchDiscriminator's list of features) also works."""
    x_a, x_b = images
    torch.manual_seed(0)
    d_a, d_b = nn.Conv2d(1, 1, 4, stride=2), nn.Conv2d(1, 1, 4, stride=2)
    g_ab, g_ba = make_generator(deformable=False, seed=1), make_generator(deformable=False, seed=2)
    out = DicycleGANLoss(lambda_dicyc=0.0, lambda_align=0.0)(x_a, x_b, g_ab, g_ba, d_a, d_b)
    _, loss_d_b = DiscriminatorObjective(d_a, d_b)(x_a, x_b, out.fake_a, out.fake_b)
    with torch.no_grad():
        expected = ((d_b(g_ab(x_a)) - 1) ** 2).mean()
        assert out.terms["gan_ab"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert loss_d_b.item() == pytest.approx(
            0.5 * (((d_b(x_b) - 1) ** 2).mean() + (d_b(g_ab(x_a)) ** 2).mean()).item(), rel=1e-5
        )


def test_a_generator_without_the_passes_is_refused_by_name():
    d = make_discriminator()
    with pytest.raises(TypeError, match=r"g_ba \(Conv2d\) must provide the passes of bundle.dicyclegan.Generator"):
        GeneratorObjective(make_generator(), nn.Conv2d(1, 1, 3, padding=1), d, d, DicycleGANLoss())


def test_negative_weight_is_rejected():
    with pytest.raises(ValueError):
        DicycleGANLoss(lambda_align=-1.0)
