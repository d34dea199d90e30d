"""Losses of DicycleGAN (Wang et al. 2018, eq. 1-4).

- :func:`normalized_mutual_information`: differentiable NMI, ``2 I(A;B) / (H(A) + H(B))`` (Vinh et al. 2010,
  "arithmetic" normalisation, 0..1), per batch item, from a Gaussian Parzen-window joint histogram.
- :class:`DicycleGANLoss`: the generator objective of eq. (4): LSGAN on the deformed outputs, NMI alignment (eq. 1)
  on the undeformed outputs, undeformed (eq. 2) and deformed (eq. 3) L1 cycle consistency.
- :func:`discriminator_loss`: the LSGAN discriminator loss, halved as in CycleGAN.
- :func:`local_normalized_mutual_information`: NMI per image patch, averaged (an opt-in alignment measure).

Opt-in terms beyond the paper (every default is the paper's objective): an LSGAN term on the undeformed
outputs (``lambda_gan_aligned``), local NMI in place of global NMI (``alignment="local_nmi"``) and, for pairs of
images of one subject that do not overlay, an L1 term between the deformed output and the paired target
(``lambda_paired``).

The CycleGAN baseline is the same code: generators built with ``deformable=False`` and
``lambda_align = lambda_dicyc = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = [
    "DicycleGANGeneratorOutput",
    "DicycleGANLoss",
    "alignment_loss",
    "discriminator_loss",
    "local_normalized_mutual_information",
    "lsgan_loss",
    "normalized_mutual_information",
]

ALIGNMENT_MEASURES = ("nmi", "local_nmi")


def _unit_range(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each row of ``x`` (N, n) to [0, 1] by its own min/max over the masked samples.

    The min/max are taken without gradient, so the gradient reaches every sample value through a fixed affine map.

    Returns:
        the mapped rows (masked-out samples set to 0) and a (N,) bool tensor, False where a row has zero range.
    """
    with torch.no_grad():
        if mask is None:
            lo, hi = x.amin(dim=1), x.amax(dim=1)
        else:
            lo = torch.where(mask, x, torch.inf).amin(dim=1)
            hi = torch.where(mask, x, -torch.inf).amax(dim=1)
        span = hi - lo
        valid = torch.isfinite(span) & (span > 0)
        # constant (or empty) rows map to 0 with zero gradient instead of dividing by zero
        scale = torch.where(valid, 1.0 / torch.where(valid, span, 1.0), 0.0)
        lo = torch.where(valid, lo, 0.0)
    unit = (x - lo[:, None]) * scale[:, None]
    if mask is not None:
        unit = torch.where(mask, unit, 0.0)  # keeps out-of-mask inf/NaN out of the softmax
    return unit, valid


def _entropy(p: torch.Tensor, eps: float) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension; ``eps`` keeps log and its gradient finite at p = 0."""
    return -(p * torch.log(p + eps)).sum(dim=-1)


def normalized_mutual_information(
    a: torch.Tensor,
    b: torch.Tensor,
    num_bins: int = 32,
    sigma_ratio: float = 0.5,
    mask: torch.Tensor | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Differentiable normalized mutual information ``NMI = 2 I(A;B) / (H(A) + H(B))`` per batch item.

    This is the "arithmetic" normalisation of Vinh et al. (2010) (``sklearn.metrics.normalized_mutual_info_score``'s
    default), in [0, 1]: 1 when one image is an invertible function of the other, 0 when they are independent.
    It is estimated from a Parzen-window joint histogram:

    - each image is mapped to [0, 1] by its own min/max (over the masked samples), taken without gradient, so
      z-scored MR and range-scaled CT compare alike and the gradient flows through the intensities;
    - ``num_bins`` bins with centres ``(k + 0.5) / num_bins``; each sample spreads over the bins with a Gaussian
      window of standard deviation ``sigma_ratio / num_bins`` (in bin widths: ``sigma_ratio``), normalised to
      sum 1 over the bins;
    - joint ``p_ab = W_a^T W_b / n`` (one batched matrix product), marginals are its sums.

    As ``sigma_ratio -> 0`` it tends to the NMI of the images quantised into ``num_bins`` equal bins over their own
    ranges. A wider window trades that exactness for a smoother loss: NMI(x, x) is below 1 with the defaults (about
    0.55-0.7 depending on the intensity histogram: 0.65 for a smooth random field, 0.70 for uniform noise) because
    the window blurs the joint histogram more than the marginals; the maximum is still at alignment.
    The histogram is computed in (at least) float32 with autocast disabled.

    Args:
        a: images of shape (N, C, *spatial); all non-batch dimensions are pooled as samples.
        b: images of the same shape as ``a``.
        num_bins: number of intensity bins (at least 2).
        sigma_ratio: Gaussian window standard deviation in bin widths (> 0).
        mask: optional mask broadcastable to ``a.shape``; only samples where it is non-zero are used, also for
            the min/max.
        eps: keeps the logarithm and the normalisation finite for empty bins.

    Returns:
        Tensor of shape (N,). Items where ``a`` or ``b`` is constant (zero range; no information) or where the mask
        is empty give 0 without NaN in the value or the gradient.

    Example::

        nmi = normalized_mutual_information(x_a, g_ab(x_a, deform=False))  # (N,)
        loss = 1.0 - nmi.mean()
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.ndim < 2:
        raise ValueError(f"expected images of shape (N, C, *spatial), got shape {tuple(a.shape)}.")
    if num_bins < 2:
        raise ValueError(f"num_bins must be at least 2, got {num_bins}.")
    if sigma_ratio <= 0:
        raise ValueError(f"sigma_ratio must be positive, got {sigma_ratio}.")

    n_items = a.shape[0]
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(device_type=a.device.type, enabled=False):
        flat_mask = None
        if mask is not None:
            flat_mask = torch.broadcast_to(mask, a.shape).reshape(n_items, -1) != 0
        a_unit, a_valid = _unit_range(a.reshape(n_items, -1).to(dtype), flat_mask)
        b_unit, b_valid = _unit_range(b.reshape(n_items, -1).to(dtype), flat_mask)

        centres = (torch.arange(num_bins, device=a.device, dtype=dtype) + 0.5) / num_bins
        neg_half_precision = -0.5 * (num_bins / sigma_ratio) ** 2  # -1 / (2 sigma^2), sigma = sigma_ratio / bins
        # softmax == Gaussian weights normalised over the bins, without underflow for narrow windows
        w_a = torch.softmax((a_unit[..., None] - centres).square() * neg_half_precision, dim=-1)  # (N, n, bins)
        w_b = torch.softmax((b_unit[..., None] - centres).square() * neg_half_precision, dim=-1)
        if flat_mask is not None:
            w_a = w_a * flat_mask[..., None].to(dtype)

        joint = torch.bmm(w_a.transpose(1, 2), w_b)  # (N, bins, bins)
        joint = joint / joint.sum(dim=(1, 2), keepdim=True).clamp_min(eps)
        h_a = _entropy(joint.sum(dim=2), eps)
        h_b = _entropy(joint.sum(dim=1), eps)
        h_ab = _entropy(joint.flatten(1), eps)
        nmi = 2.0 * (h_a + h_b - h_ab) / (h_a + h_b).clamp_min(eps)
        return torch.where(a_valid & b_valid, nmi, torch.zeros_like(nmi))


def local_normalized_mutual_information(
    a: torch.Tensor,
    b: torch.Tensor,
    patch_size: int | tuple[int, int] = 16,
    stride: int | tuple[int, int] | None = None,
    num_bins: int = 32,
    sigma_ratio: float = 0.5,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Local NMI: :func:`normalized_mutual_information` of every ``patch_size`` patch, averaged per batch item.

    Global NMI rewards any intensity mapping that is one function over the whole image, the source's own contrast
    included; NMI per patch asks only that each neighbourhood's intensities be predictable from the source's, so a
    mapping may differ between regions (e.g. bone and soft tissue). Each patch is mapped to [0, 1] by its own
    min/max and binned exactly as the global NMI. Patches where either image is constant carry no information
    (their NMI is 0 by definition) and are left out of the mean; an item without any such patch gives 0.

    Args:
        a: images of shape (N, C, H, W); the channels of a patch are pooled as samples.
        b: images of the same shape as ``a``.
        patch_size: patch size (h, w) or one int.
        stride: step between patches (default: ``patch_size``, non-overlapping); patches that do not fit at the
            bottom/right border are not used (as ``torch.nn.functional.unfold``).
        num_bins: see :func:`normalized_mutual_information`.
        sigma_ratio: see :func:`normalized_mutual_information`.
        eps: see :func:`normalized_mutual_information`.

    Returns:
        Tensor of shape (N,).

    Example::

        nmi = local_normalized_mutual_information(x_a, g_ab(x_a), patch_size=16)  # (N,)
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.ndim != 4:
        raise ValueError(f"expected 2-D images of shape (N, C, H, W), got shape {tuple(a.shape)}.")
    size = _pair(patch_size)
    step = size if stride is None else _pair(stride)
    if any(p > s for p, s in zip(size, a.shape[-2:], strict=True)):
        raise ValueError(f"patch_size {size} is larger than the images {tuple(a.shape[-2:])}.")
    n, channels = a.shape[:2]

    def patches(x: torch.Tensor) -> torch.Tensor:
        columns = F.unfold(x, size, stride=step)  # (N, C * ph * pw, L)
        return columns.transpose(1, 2).reshape(-1, channels, size[0] * size[1])  # (N * L, C, ph * pw)

    patches_a, patches_b = patches(a), patches(b)
    nmi = normalized_mutual_information(patches_a, patches_b, num_bins, sigma_ratio, eps=eps).view(n, -1)
    with torch.no_grad():
        varies_a = patches_a.flatten(1).amax(dim=1) > patches_a.flatten(1).amin(dim=1)
        varies_b = patches_b.flatten(1).amax(dim=1) > patches_b.flatten(1).amin(dim=1)
        valid = (varies_a & varies_b).view(n, -1)
    return (nmi * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)


def alignment_loss(
    real_a: torch.Tensor,
    aligned_b: torch.Tensor,
    real_b: torch.Tensor,
    aligned_a: torch.Tensor,
    num_bins: int = 32,
    sigma_ratio: float = 0.5,
) -> torch.Tensor:
    """Image alignment loss of eq. (1): ``2 - NMI(x_A, G_AB(x_A)) - NMI(x_B, G_BA(x_B))``, NMI averaged over the batch.

    Args:
        real_a: source images x_A.
        aligned_b: undeformed translations G_AB(x_A).
        real_b: source images x_B.
        aligned_a: undeformed translations G_BA(x_B).
        num_bins: see :func:`normalized_mutual_information`.
        sigma_ratio: see :func:`normalized_mutual_information`.

    Returns:
        Scalar tensor in [0, 2].
    """
    nmi_a = normalized_mutual_information(real_a, aligned_b, num_bins, sigma_ratio).mean()
    nmi_b = normalized_mutual_information(real_b, aligned_a, num_bins, sigma_ratio).mean()
    return 2.0 - nmi_a - nmi_b


def _logits(d: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Discriminator logits; MONAI's ``PatchDiscriminator`` returns its intermediate features with the logits last."""
    out = d(x)
    return out[-1] if isinstance(out, (list, tuple)) else out


def lsgan_loss() -> PatchAdversarialLoss:
    """The least-squares GAN criterion of the paper and CycleGAN: mean ``(D(x) - target)^2`` on the raw logits.

    MONAI's least-squares criterion applies a LeakyReLU to the logits unless ``no_activation_leastsq=True``;
    the paper's ``(D(G_T(x)) - 1)^2`` has no activation, so it is switched off.
    """
    return PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)


def discriminator_loss(
    d: nn.Module, real: torch.Tensor, fake: torch.Tensor, adversarial_loss: PatchAdversarialLoss | None = None
) -> torch.Tensor:
    """LSGAN discriminator loss ``0.5 * ((D(real) - 1)^2 + D(fake)^2)`` (means over patches), as in CycleGAN.

    ``fake`` is detached, so no gradient reaches the generator.

    Args:
        d: discriminator returning logits, or a list of feature maps with the logits last (``PatchDiscriminator``).
        real: real images of the discriminator's domain.
        fake: synthesized images (the deformed outputs G_T, typically drawn from an image pool).
        adversarial_loss: criterion; defaults to :func:`lsgan_loss`.

    Returns:
        Scalar tensor.

    Example::

        loss_d_b = discriminator_loss(d_b, real_b, pool_b.query(out.fake_b))
    """
    criterion = lsgan_loss() if adversarial_loss is None else adversarial_loss
    loss_real = criterion(_logits(d, real), target_is_real=True, for_discriminator=True)
    loss_fake = criterion(_logits(d, fake.detach()), target_is_real=False, for_discriminator=True)
    return 0.5 * (loss_real + loss_fake)


def _is_deformable(g: nn.Module) -> bool:
    # a generator without the attribute is a plain single-pass network, called as g(x)
    return bool(getattr(g, "deformable", False))


def _translate(g: nn.Module, x: torch.Tensor, deform: bool) -> torch.Tensor:
    return g(x, deform=deform) if _is_deformable(g) else g(x)


def _translate_both(g: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(deformed, undeformed) outputs; one pass, and one tensor, for a non-deformable generator."""
    if _is_deformable(g):
        return g.forward_both(x)
    out = g(x)
    return out, out


@dataclass
class DicycleGANGeneratorOutput:
    """Result of :class:`DicycleGANLoss`.

    Attributes:
        total: the objective of eq. (4), a scalar with gradient.
        terms: detached scalars ``gan_ab, gan_ba, align, cyc, dicyc, nmi_a, nmi_b, total`` for logging;
            ``nmi_a = NMI(x_A, G_AB(x_A))``, ``nmi_b = NMI(x_B, G_BA(x_B))`` (batch means).
        fake_b: deformed G_T^AB(x_A) (for D_B and its image pool), detached; likewise ``fake_a``.
        aligned_b: undeformed G^AB(x_A), detached; likewise ``aligned_a``.
        cycle_a: undeformed cycle G^BA(G^AB(x_A)), detached, or None when skipped (``lambda_cyc == 0``, see
            :class:`DicycleGANLoss`); likewise ``cycle_b``.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    fake_a: torch.Tensor | None = None
    fake_b: torch.Tensor | None = None
    aligned_a: torch.Tensor | None = None
    aligned_b: torch.Tensor | None = None
    cycle_a: torch.Tensor | None = None
    cycle_b: torch.Tensor | None = None


class DicycleGANLoss(nn.Module):
    """Generator objective of DicycleGAN (Wang et al. 2018, eq. 4)::

        total = gan_ab + gan_ba + lambda_align * align + lambda_cyc * cyc + lambda_dicyc * dicyc

    - ``gan_ab = mean (D_B(G_T^AB(x_A)) - 1)^2`` (LSGAN on the deformed output), ``gan_ba`` likewise;
    - ``align = 2 - NMI(x_A, G^AB(x_A)) - NMI(x_B, G^BA(x_B))`` on the undeformed outputs (eq. 1);
    - ``cyc = |G^BA(G^AB(x_A)) - x_A|_1 + |G^AB(G^BA(x_B)) - x_B|_1``, undeformed passes, mean absolute error (eq. 2);
    - ``dicyc = |G_T^BA(G_T^AB(x_A)) - x_A|_1 + |G_T^AB(G_T^BA(x_B)) - x_B|_1``, deformed passes (eq. 3).

    Generators follow :class:`bundle.networks.DicycleGenerator`: ``g(x, deform=...)``, ``g.forward_both(x)`` and a
    ``deformable`` attribute; a network without that attribute is treated as a plain generator ``g(x)``.
    The CycleGAN baseline is ``deformable=False`` generators with ``lambda_align = lambda_dicyc = 0``.

    No work with weight 0, or that repeats another pass, is done: a non-deformable generator runs once per input
    (its deformed and undeformed outputs are one tensor); the first translation of a deformable generator uses
    ``forward_both``; the deformed cycle is skipped when ``lambda_dicyc == 0`` and the undeformed cycle when
    ``lambda_cyc == 0``. What is then reported in ``terms``:

    - ``align``, ``nmi_a``, ``nmi_b`` are always the true values; with ``lambda_align == 0`` they are computed
      under ``torch.no_grad()`` (cheap next to a generator pass) so both modes log the same alignment monitor;
    - ``cyc`` and ``dicyc``: when both generators are non-deformable the two cycles are one pass, so both are
      reported whatever their weights (in CycleGAN mode ``dicyc == cyc``); otherwise a cycle with weight 0 is not
      computed and reported as 0, and ``cycle_a``/``cycle_b`` are None when that is the undeformed cycle.

    Gradients also reach the discriminators' parameters through the GAN terms; freeze them or zero their gradients
    before the discriminator step, as CycleGAN does.

    Opt-in terms beyond the paper (in the pseudo-CT study the undeformed pass, the one inference serves,
    kept the source's contrast); with their defaults the objective, its terms and its value are exactly the paper's:

    - ``lambda_gan_aligned * gan_aligned``, ``gan_aligned = mean (D_B(G^AB(x_A)) - 1)^2 + mean (D_A(G^BA(x_B)) - 1)^2``:
      the discriminators also judge the undeformed outputs. :attr:`discriminate_aligned` is then True, and
      :class:`bundle.trainer.DicycleGANTrainer` shows the undeformed fakes to the discriminators as well (through
      the same image pool), as the exploratory pseudo-CT run did: otherwise D would never learn to reject them;
    - ``alignment="local_nmi"``: ``align`` (and ``nmi_a``, ``nmi_b``) use
      :func:`local_normalized_mutual_information` over ``alignment_patch_size`` patches instead of global NMI;
    - ``lambda_paired * paired``, ``paired = |G_T^AB(x_A) - y_B|_1`` (mean absolute error) for a target ``y_B`` of
      the same subject as ``x_A`` that need not overlay it (misaligned pairs, ``forward(..., paired_b=y_B)``): the
      deformed pass may absorb the misregistration while the undeformed pass stays aligned with ``x_A``.

    The terms of an enabled variant are added to ``terms`` (``gan_aligned``, ``paired``); with the defaults
    ``terms`` has exactly the paper's keys.

    Args:
        lambda_cyc: weight of the undeformed cycle loss (paper: 10).
        lambda_dicyc: weight of the deformation-invariant cycle loss (paper: 10; CycleGAN: 0).
        lambda_align: weight of the NMI alignment loss (paper: 0.9; CycleGAN: 0).
        nmi_bins: number of histogram bins of the NMI.
        nmi_sigma_ratio: Parzen window width of the NMI, in bin widths.
        lambda_gan_aligned: weight of the LSGAN term on the undeformed outputs (paper: 0; beyond the paper).
        alignment: ``"nmi"`` (paper, eq. 1) or ``"local_nmi"`` (beyond the paper).
        alignment_patch_size: patch size of the local NMI.
        alignment_patch_stride: step between local NMI patches (default: the patch size, non-overlapping).
        lambda_paired: weight of the L1 term between the deformed output and a paired target (paper: 0; beyond the
            paper; needs ``paired_b`` in :meth:`forward`).

    Example::

        loss_fn = DicycleGANLoss()
        out = loss_fn(real_a, real_b, g_ab, g_ba, d_a, d_b)
        out.total.backward()
        loss_d_b = discriminator_loss(d_b, real_b, out.fake_b)
    """

    def __init__(
        self,
        lambda_cyc: float = 10.0,
        lambda_dicyc: float = 10.0,
        lambda_align: float = 0.9,
        nmi_bins: int = 32,
        nmi_sigma_ratio: float = 0.5,
        lambda_gan_aligned: float = 0.0,
        alignment: str = "nmi",
        alignment_patch_size: int = 16,
        alignment_patch_stride: int | None = None,
        lambda_paired: float = 0.0,
    ) -> None:
        super().__init__()
        weights = {
            "lambda_cyc": lambda_cyc,
            "lambda_dicyc": lambda_dicyc,
            "lambda_align": lambda_align,
            "lambda_gan_aligned": lambda_gan_aligned,
            "lambda_paired": lambda_paired,
        }
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        if alignment not in ALIGNMENT_MEASURES:
            raise ValueError(f"alignment must be one of {ALIGNMENT_MEASURES}, got {alignment!r}.")
        self.lambda_cyc = float(lambda_cyc)
        self.lambda_dicyc = float(lambda_dicyc)
        self.lambda_align = float(lambda_align)
        self.nmi_bins = nmi_bins
        self.nmi_sigma_ratio = nmi_sigma_ratio
        self.lambda_gan_aligned = float(lambda_gan_aligned)
        self.alignment = alignment
        self.alignment_patch_size = alignment_patch_size
        self.alignment_patch_stride = alignment_patch_stride
        self.lambda_paired = float(lambda_paired)
        self.adversarial_loss = lsgan_loss()

    @property
    def discriminate_aligned(self) -> bool:
        """Whether the discriminators should also be trained on the undeformed fakes (``lambda_gan_aligned > 0``)."""
        return self.lambda_gan_aligned != 0

    def _cycles(
        self, g: nn.Module, fake: torch.Tensor, aligned: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Undeformed cycle g(aligned) and deformed cycle g_T(fake), each only when needed."""
        need_cyc, need_dicyc = self.lambda_cyc != 0, self.lambda_dicyc != 0
        if fake is aligned and not _is_deformable(g):
            # both cycles are the same pass (CycleGAN mode)
            out = g(aligned) if need_cyc or need_dicyc else None
            return out, out
        if fake is aligned and need_cyc and need_dicyc:
            dicycle, cycle = g.forward_both(aligned)
            return cycle, dicycle
        if need_cyc and need_dicyc and hasattr(g, "forward_mixed"):
            # both second-stage passes in one batch: deformed on the deformed fake, undeformed on the aligned one
            n = fake.shape[0]
            out = g.forward_mixed(torch.cat((fake, aligned), dim=0), n)
            return out[n:], out[:n]
        cycle = _translate(g, aligned, deform=False) if need_cyc else None
        dicycle = _translate(g, fake, deform=True) if need_dicyc else None
        return cycle, dicycle

    def _nmi(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.alignment == "local_nmi":
            return local_normalized_mutual_information(
                x, y, self.alignment_patch_size, self.alignment_patch_stride, self.nmi_bins, self.nmi_sigma_ratio
            ).mean()
        return normalized_mutual_information(x, y, self.nmi_bins, self.nmi_sigma_ratio).mean()

    def forward(
        self,
        real_a: torch.Tensor,
        real_b: torch.Tensor,
        g_ab: nn.Module,
        g_ba: nn.Module,
        d_a: nn.Module,
        d_b: nn.Module,
        paired_b: torch.Tensor | None = None,
    ) -> DicycleGANGeneratorOutput:
        """
        Args:
            real_a: images x_A of domain A, shape (N, C_A, H, W).
            real_b: images x_B of domain B (unpaired with ``real_a``), shape (M, C_B, H, W).
            g_ab: generator A -> B.
            g_ba: generator B -> A.
            d_a: discriminator of domain A (logits, or a list of features with the logits last).
            d_b: discriminator of domain B.
            paired_b: targets y_B of the subjects of ``real_a`` (same slice, not necessarily aligned), shape
                (N, C_B, H, W); needed when ``lambda_paired > 0``, ignored otherwise.

        Returns:
            :class:`DicycleGANGeneratorOutput` with the objective, its detached terms and the detached images.
        """
        if self.lambda_paired != 0 and paired_b is None:
            raise ValueError("lambda_paired > 0 needs paired_b: the paired targets of real_a (training_pairs).")
        fake_b, aligned_b = _translate_both(g_ab, real_a)
        fake_a, aligned_a = _translate_both(g_ba, real_b)

        gan_ab = self.adversarial_loss(_logits(d_b, fake_b), target_is_real=True, for_discriminator=False)
        gan_ba = self.adversarial_loss(_logits(d_a, fake_a), target_is_real=True, for_discriminator=False)
        total = gan_ab + gan_ba
        variant_terms: dict[str, torch.Tensor] = {}
        if self.lambda_gan_aligned != 0:
            gan_aligned = self.adversarial_loss(
                _logits(d_b, aligned_b), target_is_real=True, for_discriminator=False
            ) + self.adversarial_loss(_logits(d_a, aligned_a), target_is_real=True, for_discriminator=False)
            total = total + self.lambda_gan_aligned * gan_aligned
            variant_terms["gan_aligned"] = gan_aligned
        if self.lambda_paired != 0:
            paired = F.l1_loss(fake_b, paired_b)
            total = total + self.lambda_paired * paired
            variant_terms["paired"] = paired

        with torch.set_grad_enabled(torch.is_grad_enabled() and self.lambda_align != 0):
            nmi_a = self._nmi(real_a, aligned_b)
            nmi_b = self._nmi(real_b, aligned_a)
            align = 2.0 - nmi_a - nmi_b
        if self.lambda_align != 0:
            total = total + self.lambda_align * align

        cycle_a, dicycle_a = self._cycles(g_ba, fake_b, aligned_b)
        cycle_b, dicycle_b = self._cycles(g_ab, fake_a, aligned_a)
        zero = total.new_zeros(())
        cyc = F.l1_loss(cycle_a, real_a) + F.l1_loss(cycle_b, real_b) if cycle_a is not None else zero
        dicyc = F.l1_loss(dicycle_a, real_a) + F.l1_loss(dicycle_b, real_b) if dicycle_a is not None else zero
        if self.lambda_cyc != 0:
            total = total + self.lambda_cyc * cyc
        if self.lambda_dicyc != 0:
            total = total + self.lambda_dicyc * dicyc

        terms = {
            "gan_ab": gan_ab,
            "gan_ba": gan_ba,
            "align": align,
            "cyc": cyc,
            "dicyc": dicyc,
            "nmi_a": nmi_a,
            "nmi_b": nmi_b,
            **variant_terms,
            "total": total,
        }

        def detach(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.detach()

        return DicycleGANGeneratorOutput(
            total=total,
            terms={k: v.detach() for k, v in terms.items()},
            fake_a=fake_a.detach(),
            fake_b=fake_b.detach(),
            aligned_a=aligned_a.detach(),
            aligned_b=aligned_b.detach(),
            cycle_a=detach(cycle_a),
            cycle_b=detach(cycle_b),
        )
