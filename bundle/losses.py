"""The criteria of DicycleGAN (Wang et al. 2018, eq. 1-4), tensors in and out: differentiable NMI and LSGAN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch.nn.modules.utils import _pair

__all__ = ["alignment_loss", "discriminator_loss", "local_normalized_mutual_information", "lsgan_loss"]
__all__ += ["normalized_mutual_information"]

# DicycleGANLoss(alignment=...): the paper's global NMI; opt-in local NMI and bundle.mind's descriptors
ALIGNMENT_MEASURES = ("nmi", "local_nmi", "mind", "mind_ssc")


def _unit_range(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (N, n) mapped to [0, 1] by their min/max over the mask (no gradient), 0 outside it; and (N,)
    bool, False where a row has zero range."""
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
    """Differentiable normalized mutual information ``NMI = 2 I(A;B) / (H(A) + H(B))`` per batch item: (N,) in
    [0, 1], 0 (without NaN in value or gradient) where ``a`` or ``b`` is constant or the mask empty.

    Vinh et al.'s (2010) "arithmetic" normalisation, in [0, 1], from a Parzen-window joint histogram (float32 or
    wider, no autocast): each image mapped to [0, 1] by its own min/max (no gradient), ``num_bins`` bins centred at
    ``(k + 0.5) / num_bins``, Gaussian windows of standard deviation ``sigma_ratio / num_bins`` normalised over the
    bins, joint ``p_ab = W_a^T W_b / n``. With the defaults NMI(x, x) is about 0.55-0.7, not 1.

    Args:
        a: images of shape (N, C, *spatial) (else a ValueError); all non-batch dimensions are pooled as samples.
        b: images of the same shape as ``a`` (else a ValueError).
        num_bins: number of intensity bins (at least 2, else a ValueError).
        sigma_ratio: Gaussian window standard deviation in bin widths (> 0, else a ValueError).
        mask: optional mask broadcastable to ``a.shape``: only samples where it is non-zero are used.
        eps: keeps the logarithm and the normalisation finite for empty bins.
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
        flat_mask = None if mask is None else torch.broadcast_to(mask, a.shape).reshape(n_items, -1) != 0
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
        h_a, h_b = _entropy(joint.sum(dim=2), eps), _entropy(joint.sum(dim=1), eps)
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
    """:func:`normalized_mutual_information` of every ``patch_size`` patch, averaged per batch item over the patches
    where neither image is constant (0 without any): (N,).

    Args:
        a: images of shape (N, C, H, W) (else a ValueError); the channels of a patch are pooled as samples.
        b: images of the same shape as ``a`` (else a ValueError).
        patch_size: patch size (h, w) or one int, at most the image size (else a ValueError).
        stride: step between patches (default: ``patch_size``); patches that do not fit are not used (``F.unfold``).
        num_bins, sigma_ratio, eps: see :func:`normalized_mutual_information`.
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
    """Image alignment loss of eq. (1), a scalar in [0, 2]: ``2 - NMI(x_A, G_AB(x_A)) - NMI(x_B, G_BA(x_B))``, each
    NMI averaged over the batch.

    Args:
        real_a, aligned_b: source images x_A and their undeformed translations G_AB(x_A).
        real_b, aligned_a: source images x_B and their undeformed translations G_BA(x_B).
        num_bins, sigma_ratio: see :func:`normalized_mutual_information`.
    """
    nmi_a = normalized_mutual_information(real_a, aligned_b, num_bins, sigma_ratio).mean()
    nmi_b = normalized_mutual_information(real_b, aligned_a, num_bins, sigma_ratio).mean()
    return 2.0 - nmi_a - nmi_b


def lsgan_loss() -> PatchAdversarialLoss:
    """The least-squares GAN criterion of the paper and CycleGAN: mean ``(D(x) - target)^2`` on the raw logits
    (MONAI's LeakyReLU on the logits switched off)."""
    return PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, adversarial_loss: PatchAdversarialLoss | None = None
) -> torch.Tensor:
    """LSGAN discriminator loss ``0.5 * (mean (D(real) - 1)^2 + mean D(fake)^2)`` (CycleGAN's), a scalar.

    Args:
        real_logits: the discriminator's logits on real images of its domain.
        fake_logits: its logits on synthesized images (detached, typically drawn from an image pool).
        adversarial_loss: criterion; defaults to :func:`lsgan_loss`.
    """
    criterion = lsgan_loss() if adversarial_loss is None else adversarial_loss
    loss_real = criterion(real_logits, target_is_real=True, for_discriminator=True)
    loss_fake = criterion(fake_logits, target_is_real=False, for_discriminator=True)
    return 0.5 * (loss_real + loss_fake)
