"""Modality independent neighbourhood descriptors of 2-D slices, MIND (Heinrich et al. 2012) and MIND-SSC (2013),
and the distance of two images' descriptors (Yang et al. 2018's structural term; measurements in docs/README.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FOUR_NEIGHBOURS", "SSC_PAIRS", "mind", "mind_distance", "mind_ssc", "patch_distance"]

# (dy, dx) offsets of the 2-D four-neighbourhood: MIND's search region
FOUR_NEIGHBOURS = ((-1, 0), (0, -1), (0, 1), (1, 0))
# pairs of four-neighbours sqrt(2) apart: the 2-D self-similarity context (the 12 edges of the 3-D six-neighbourhood)
SSC_PAIRS = (((-1, 0), (0, -1)), ((-1, 0), (0, 1)), ((1, 0), (0, -1)), ((1, 0), (0, 1)))


def _shifted(image: torch.Tensor, offset: tuple[int, int], radius: int) -> torch.Tensor:
    """``image`` at ``x + offset`` for every pixel ``x`` (edges replicated), cropped back to its size."""
    dy, dx = offset
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    height, width = image.shape[-2:]
    return padded[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]


def _gaussian_kernel(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    radius = max(1, round(3.0 * sigma))
    g = torch.exp(-(torch.arange(-radius, radius + 1, device=device, dtype=dtype) ** 2) / (2.0 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def patch_distance(
    image: torch.Tensor, offset_a: tuple[int, int], offset_b: tuple[int, int], sigma: float = 0.8
) -> torch.Tensor:
    """``D_p``: Gaussian-weighted (``sigma`` pixels) sum of squared differences between the patches at
    ``x + offset_a`` and ``x + offset_b`` (``(dy, dx)``), for every pixel ``x`` of ``image`` (N, 1, H, W):
    (N, 1, H, W)."""
    reach = max(abs(v) for v in (*offset_a, *offset_b))
    squared = (_shifted(image, offset_a, reach) - _shifted(image, offset_b, reach)) ** 2
    kernel = _gaussian_kernel(sigma, image.device, image.dtype)
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(squared, (pad, pad, pad, pad), mode="replicate"), kernel)


def _descriptor(distances: torch.Tensor, eps: float) -> torch.Tensor:
    """``exp(-D / V)`` with ``V`` the mean of ``D`` over the channels, normalised by its largest channel."""
    variance = distances.mean(dim=1, keepdim=True).clamp_min(eps)
    features = torch.exp(-distances / variance)
    return features / features.amax(dim=1, keepdim=True)


def _describe(image: torch.Tensor, pairs: list | tuple, sigma: float, eps: float) -> torch.Tensor:
    if image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"expected slices of shape (N, 1, H, W), got {tuple(image.shape)}.")
    return _descriptor(torch.cat([patch_distance(image, a, b, sigma) for a, b in pairs], dim=1), eps)


def mind(image: torch.Tensor, sigma: float = 0.8, eps: float = 1e-6) -> torch.Tensor:
    """MIND (Heinrich et al. 2012, eq. 4) of ``image`` (N, 1, H, W) (else a ValueError) on the four-neighbourhood,
    ``MIND(I, x, r) = exp(-D_p(I, x, x + r) / V(I, x)) / max_r(...)``, ``V`` the mean of ``D_p`` over ``r`` floored
    at ``eps``, ``D_p`` with Gaussian patch weights of ``sigma`` pixels: (N, 4, H, W) in (0, 1], one channel per
    offset of :data:`FOUR_NEIGHBOURS`."""
    return _describe(image, [((0, 0), r) for r in FOUR_NEIGHBOURS], sigma, eps)


def mind_ssc(image: torch.Tensor, sigma: float = 0.8, eps: float = 1e-6) -> torch.Tensor:
    """MIND-SSC (Heinrich et al. 2013): as :func:`mind` (same arguments, ``(N, 4, H, W)`` in (0, 1]), but each
    channel compares the patches of two neighbours of ``x`` (:data:`SSC_PAIRS`), so noise at ``x`` enters none."""
    return _describe(image, SSC_PAIRS, sigma, eps)


def mind_distance(
    a: torch.Tensor, b: torch.Tensor, descriptor: str = "mind_ssc", mask: torch.Tensor | None = None, sigma: float = 0.8
) -> torch.Tensor:
    """Mean absolute difference of two images' descriptors (Yang et al. 2018's structural term), per image: ``(N,)``,
    0 for identical structure, at most 1. A ValueError for another descriptor or different shapes.

    Args:
        a, b: ``(N, 1, H, W)``, two contrasts of the same anatomy.
        descriptor: ``"mind_ssc"`` or ``"mind"``.
        mask: ``(N, 1, H, W)``, the pixels to average over (None: all).
        sigma: Gaussian patch weights (pixels).
    """
    if descriptor not in ("mind", "mind_ssc"):
        raise ValueError(f"descriptor must be 'mind' or 'mind_ssc', got {descriptor!r}.")
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes: {tuple(a.shape)} and {tuple(b.shape)}.")
    describe = mind if descriptor == "mind" else mind_ssc
    difference = (describe(a, sigma) - describe(b, sigma)).abs().mean(dim=1, keepdim=True)
    if mask is None:
        return difference.flatten(1).mean(dim=1)
    weights = mask.to(difference.dtype)
    return (difference * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(1.0)
