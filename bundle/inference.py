"""Whole-volume synthesis with the undeformed pass of a generator, slice by slice."""

from __future__ import annotations

import torch
from monai.inferers import SliceInferer
from torch import nn

__all__ = ["UndeformedGenerator", "synthesize_volume"]


class UndeformedGenerator(nn.Module):
    """The undeformed pass ``G(x | theta)`` of a DicycleGAN generator as a plain ``forward(x)`` network.

    This is the output that stays aligned with its source: the one used for inference, validation and export.

    Args:
        generator: a :class:`~bundle.networks.DicycleGenerator` (or any network taking ``deform=False``).
    """

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: source slices of shape (N, C, H, W).

        Returns:
            Synthesized slices of shape (N, C_out, H, W).
        """
        return self.generator(x, deform=False)


@torch.no_grad()
def synthesize_volume(
    generator: nn.Module, volume: torch.Tensor, sw_batch_size: int = 16, amp: bool | None = None
) -> torch.Tensor:
    """Synthesize a preprocessed volume axial slice by axial slice (last spatial axis, RAS) with the undeformed pass.

    Args:
        generator: a DicycleGAN generator; its undeformed pass is used.
        volume: preprocessed source volume of shape (C, X, Y, Z) or (N, C, X, Y, Z), on the generator's device.
        sw_batch_size: axial slices per forward pass.
        amp: bfloat16 autocast; default on for CUDA.

    Returns:
        The synthesized volume, the same shape as ``volume`` (float32).
    """
    batched = volume.ndim == 5
    x = volume if batched else volume.unsqueeze(0)
    device = x.device
    amp = device.type == "cuda" if amp is None else amp
    network = UndeformedGenerator(generator)
    was_training = generator.training
    generator.eval()
    inferer = SliceInferer(roi_size=(-1, -1), sw_batch_size=sw_batch_size, spatial_dim=2, progress=False)
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = inferer(x.float(), network).float()
    finally:
        generator.train(was_training)
    return out if batched else out[0]
