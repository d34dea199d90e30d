"""What ``torch.jit.script`` compiles of a :class:`~bundle.networks.DicycleGenerator`: its undeformed pass."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from bundle.networks import OffsetConv2d, ResnetBlock
from torch import nn

__all__ = ["aligned_pass"]


class _PlainOffsetConv2d(nn.Module):
    """The undeformed pass of an :class:`OffsetConv2d`, holding its very parameters (``offset_conv`` too)."""

    def __init__(self, source: OffsetConv2d) -> None:
        super().__init__()
        self.weight, self.bias, self.offset_conv = source.weight, source.bias, source.offset_conv
        self.stride: tuple[int, int] = tuple(source.stride)
        self.padding: tuple[int, int] = tuple(source.padding)
        self.dilation: tuple[int, int] = tuple(source.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class _PlainResnetBlock(nn.Module):
    """A :class:`ResnetBlock` (``x + block(x)``) of plain layers."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _plain_layers(module: nn.Module) -> nn.Module:
    """The undeformed pass of ``module`` as plain (scriptable) modules sharing its parameters."""
    if isinstance(module, OffsetConv2d):
        return _PlainOffsetConv2d(module)
    if isinstance(module, ResnetBlock):
        return _PlainResnetBlock(_plain_layers(module.block))
    if isinstance(module, nn.Sequential):
        return nn.Sequential(OrderedDict((name, _plain_layers(child)) for name, child in module.named_children()))
    return module


class _AlignedPass(nn.Module):
    """``DicycleGenerator.forward(x)`` with plain layers: pad to a multiple of 4, run, crop back (any slice size)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("DicycleGenerator expects 2-D slices of shape (N, C, H, W).")
        h, w = x.shape[2], x.shape[3]
        out = self.model(F.pad(x, [0, (4 - w % 4) % 4, 0, (4 - h % 4) % 4], mode="replicate"))  # last axis first
        return out[:, :, :h, :w]


def aligned_pass(model: nn.Module) -> nn.Module:
    """The undeformed pass of a generator's layer sequence ``model`` (``DicycleGenerator.model``) as a scriptable
    module sharing its parameters, with its ``state_dict`` keys under ``model.``."""
    return _AlignedPass(_plain_layers(model))
