"""The criteria of DicycleGAN (Wang et al. 2018, eq. 1-4); tensors in, tensors out.

- :func:`normalized_mutual_information`: differentiable NMI, ``2 I(A;B) / (H(A) + H(B))`` (Vinh et al. 2010,
  "arithmetic" normalisation, 0..1), per batch item, from a Gaussian Parzen-window joint histogram.
- :func:`alignment_loss`: ``2 - NMI(x_A, G^AB(x_A)) - NMI(x_B, G^BA(x_B))`` (eq. 1).
- :func:`local_normalized_mutual_information`: NMI per image patch, averaged (an opt-in alignment measure).
- :func:`lsgan_loss` and :func:`discriminator_loss`: the least-squares GAN criterion, and the discriminator loss
  halved as in CycleGAN.

Which passes feed them, with which weights (eq. 4), is :mod:`bundle.dicyclegan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch.nn.modules.utils import _pair

__all__ = [
    "alignment_loss",
    "discriminator_loss",
    "local_normalized_mutual_information",
    "lsgan_loss",
    "normalized_mutual_information",
]

# the alignment measures of DicycleGANLoss(alignment=...): the paper's global NMI; local NMI and the structural
# MIND / MIND-SSC descriptors of bundle.mind (opt-in)
ALIGNMENT_MEASURES = ("nmi", "local_nmi", "mind", "mind_ssc")


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


def lsgan_loss() -> PatchAdversarialLoss:
    """The least-squares GAN criterion of the paper and CycleGAN: mean ``(D(x) - target)^2`` on the raw logits.

    MONAI's least-squares criterion applies a LeakyReLU to the logits unless ``no_activation_leastsq=True``;
    the paper's ``(D(G_T(x)) - 1)^2`` has no activation, so it is switched off.
    """
    return PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, adversarial_loss: PatchAdversarialLoss | None = None
) -> torch.Tensor:
    """LSGAN discriminator loss ``0.5 * (mean (D(real) - 1)^2 + mean D(fake)^2)`` (means over patches), as in CycleGAN.

    Args:
        real_logits: the discriminator's logits on real images of its domain.
        fake_logits: its logits on synthesized images (the deformed outputs G_T, typically drawn from an image pool,
            detached so that no gradient reaches the generator).
        adversarial_loss: criterion; defaults to :func:`lsgan_loss`.

    Returns:
        Scalar tensor.

    Example::

        loss_d_b = discriminator_loss(d_b(real_b)[-1], d_b(fake_b.detach())[-1])
    """
    criterion = lsgan_loss() if adversarial_loss is None else adversarial_loss
    loss_real = criterion(real_logits, target_is_real=True, for_discriminator=True)
    loss_fake = criterion(fake_logits, target_is_real=False, for_discriminator=True)
    return 0.5 * (loss_real + loss_fake)
