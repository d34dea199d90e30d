"""bundle/mind.py against a direct loop over pixels, offsets and patch weights (float64); what it is invariant to."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bundle.mind import FOUR_NEIGHBOURS, SSC_PAIRS, mind, mind_distance, mind_ssc


def _loop_descriptor(image: np.ndarray, pairs, sigma: float) -> np.ndarray:
    """The descriptor by its definition: edges replicated, patch weights a normalised Gaussian of radius 3 sigma."""
    height, width = image.shape
    radius = max(1, round(3 * sigma))
    weights = {
        (py, px): math.exp(-(py * py + px * px) / (2 * sigma * sigma))
        for py in range(-radius, radius + 1)
        for px in range(-radius, radius + 1)
    }
    total = sum(weights.values())

    def at(y: int, x: int) -> float:
        return image[min(max(y, 0), height - 1), min(max(x, 0), width - 1)]

    def clamp(y: int, x: int) -> tuple[int, int]:
        return min(max(y, 0), height - 1), min(max(x, 0), width - 1)

    distances = np.zeros((len(pairs), height, width))
    for k, ((ay, ax), (by, bx)) in enumerate(pairs):
        for y in range(height):
            for x in range(width):
                d = 0.0
                for (py, px), w in weights.items():
                    qy, qx = clamp(y + py, x + px)
                    d += w / total * (at(qy + ay, qx + ax) - at(qy + by, qx + bx)) ** 2
                distances[k, y, x] = d
    variance = np.maximum(distances.mean(axis=0), 1e-6)
    features = np.exp(-distances / variance)
    return features / features.max(axis=0)


@pytest.mark.parametrize("name", ["mind", "mind_ssc"])
def test_descriptors_match_the_direct_loop(name: str) -> None:
    image = np.random.default_rng(0).normal(size=(7, 9))
    image[2:5, 3:7] += 3.0  # an edge
    pairs = [((0, 0), r) for r in FOUR_NEIGHBOURS] if name == "mind" else list(SSC_PAIRS)
    expected = _loop_descriptor(image, pairs, sigma=0.8)
    describe = mind if name == "mind" else mind_ssc
    got = describe(torch.from_numpy(image)[None, None], sigma=0.8)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_distance_ignores_contrast_but_not_displacement() -> None:
    torch.manual_seed(0)
    image = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    image[..., 8:24, 10:22] = 1.0
    image += 0.01 * torch.randn_like(image)
    inverted = 5.0 - 3.0 * image  # another contrast of the same structure
    moved = torch.roll(image, shifts=3, dims=-1)
    for descriptor in ("mind", "mind_ssc"):
        assert float(mind_distance(image, image, descriptor)) == 0.0
        assert float(mind_distance(image, inverted, descriptor)) < 1e-9
        assert float(mind_distance(image, moved, descriptor)) > 0.05


def test_distance_is_averaged_inside_the_mask() -> None:
    a = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    b = a.clone()
    b[0, 0, 0:2, 0:2] = 1.0  # structure differs only in the corner of the first image
    mask = torch.zeros_like(a, dtype=torch.bool)
    mask[..., 5:, 5:] = True
    assert mind_distance(a, b, mask=mask).tolist() == [0.0, 0.0]
    assert mind_distance(a, b)[0] > 0.0 and mind_distance(a, b)[1] == 0.0


def test_bad_input_is_refused_with_the_problem() -> None:
    with pytest.raises(ValueError, match=r"expected slices of shape \(N, 1, H, W\), got \(8, 8\)"):
        mind(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="descriptor must be 'mind' or 'mind_ssc'"):
        mind_distance(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), descriptor="ssd")
    with pytest.raises(ValueError, match="images of different shapes"):
        mind_distance(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
