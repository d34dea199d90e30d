"""The network that is exported and served: the undeformed pass of a DicycleGAN generator, TorchScript- and
ONNX-ready.

:class:`~bundle.networks.DicycleGenerator` has two passes and its default ``forward(x)`` is the *deformed* one (what
the discriminator sees during training). Inference, the model zoo's TorchScript file and ONNX need the *undeformed*
pass ``G(x | theta)``, the output aligned with its source. :class:`UndeformedDicycleGenerator` is that pass as a
plain ``forward(x)`` network:

- it takes the constructor arguments of ``DicycleGenerator`` and has exactly its ``state_dict`` keys, so
  ``models/model.pt`` (the bare state_dict of the trained A -> B generator) loads into it unchanged, and
  ``python -m monai.bundle ckpt_export network_def ...`` works when ``configs/inference.json`` declares it as
  ``network_def``;
- it is built from a ``DicycleGenerator`` by swapping the layers that can deform for plain ones that share their
  parameters (an offset convolution becomes the plain convolution with the same weights; its unused offset branch
  stays, so the keys match), which ``torch.jit.script`` compiles without touching ``bundle/networks.py``;
- any slice size works, as in ``DicycleGenerator``: the input is padded (edge replication) to a multiple of 4 and
  the output cropped back, with the sizes read at run time, so a scripted module is not tied to one shape.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bundle.networks import DicycleGenerator, OffsetConv2d, ResnetBlock

__all__ = ["UndeformedDicycleGenerator", "undeformed_layers"]


class _PlainOffsetConv2d(nn.Module):
    """The undeformed pass of an :class:`~bundle.networks.OffsetConv2d`: ``F.conv2d`` with its weights.

    Holds the very parameters of the source layer (``weight``, ``bias`` and the unused ``offset_conv``), so the
    ``state_dict`` keys and values are those of the source.
    """

    def __init__(self, source: OffsetConv2d) -> None:
        super().__init__()
        self.weight = source.weight
        self.bias = source.bias
        self.offset_conv = source.offset_conv
        self.stride: tuple[int, int] = tuple(source.stride)
        self.padding: tuple[int, int] = tuple(source.padding)
        self.dilation: tuple[int, int] = tuple(source.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


class _PlainResnetBlock(nn.Module):
    """A :class:`~bundle.networks.ResnetBlock` (identity plus ``block``) with plain layers in ``block``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def undeformed_layers(module: nn.Module) -> nn.Module:
    """The undeformed pass of a generator's layers, with plain PyTorch modules that share the source's parameters.

    ``OffsetConv2d`` becomes its plain convolution, ``ResnetBlock`` a residual block of converted layers, and every
    ``nn.Sequential`` (including the generator's deformable sequences) a plain ``nn.Sequential`` with the same child
    names; other modules are kept as they are. Nothing is copied: training the source changes the result.

    Args:
        module: a layer or container of a :class:`~bundle.networks.DicycleGenerator` (usually ``generator.model``).

    Returns:
        A module whose ``forward(x)`` is the undeformed pass and whose ``state_dict`` equals ``module.state_dict()``.
    """
    if isinstance(module, OffsetConv2d):
        return _PlainOffsetConv2d(module)
    if isinstance(module, ResnetBlock):
        return _PlainResnetBlock(undeformed_layers(module.block))
    if isinstance(module, nn.Sequential):
        return nn.Sequential(OrderedDict((name, undeformed_layers(child)) for name, child in module.named_children()))
    return module


class UndeformedDicycleGenerator(nn.Module):
    """The undeformed pass ``G(x | theta)`` of a :class:`~bundle.networks.DicycleGenerator` as an exportable network.

    Same constructor arguments and ``state_dict`` keys as ``DicycleGenerator``, so a generator's checkpoint loads
    into it unchanged; ``forward(x)`` equals ``DicycleGenerator.forward(x, deform=False)``. Unlike
    ``DicycleGenerator`` it compiles with ``torch.jit.script`` (the model zoo's ``ckpt_export`` default), traces,
    and exports to ONNX. It is the ``network_def`` of ``configs/inference.json``: the network that inference runs and
    that ``models/model.ts`` contains.

    Args:
        in_channels: channels of the source-domain image.
        out_channels: channels of the synthesized image.
        ngf: width of the first layer.
        n_blocks: number of residual blocks.
        deformable: whether the trained generator had offset convolutions (their parameters are kept, unused, so
            its checkpoint loads).
        out_activation: output activation, as for ``DicycleGenerator``.
        backend: deformable-convolution backend of the underlying ``DicycleGenerator`` (unused by this pass).

    Example::

        served = UndeformedDicycleGenerator(ngf=64, n_blocks=9)
        served.load_state_dict(torch.load("models/model.pt"))  # the bare state_dict of a DicycleGenerator
        aligned_b = served(x_a)  # == DicycleGenerator(...)(x_a, deform=False)
        scripted = torch.jit.script(served.eval())

        served = UndeformedDicycleGenerator.from_generator(g_ab)  # shares g_ab's parameters
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_blocks: int = 9,
        deformable: bool = True,
        out_activation: str | nn.Module | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        generator = DicycleGenerator(
            in_channels=in_channels,
            out_channels=out_channels,
            ngf=ngf,
            n_blocks=n_blocks,
            deformable=deformable,
            out_activation=out_activation,
            backend=backend,
        )
        self.model = self._convert(generator)

    @classmethod
    def from_generator(cls, generator: DicycleGenerator) -> UndeformedDicycleGenerator:
        """Wrap a (trained) generator's undeformed pass; the result shares its parameters.

        Args:
            generator: a :class:`~bundle.networks.DicycleGenerator`.

        Returns:
            An :class:`UndeformedDicycleGenerator` whose ``state_dict`` is the generator's.
        """
        network = cls.__new__(cls)
        nn.Module.__init__(network)
        network.model = cls._convert(generator)
        return network

    @staticmethod
    def _convert(generator: DicycleGenerator) -> nn.Module:
        model = undeformed_layers(generator.model)
        expected = set(generator.state_dict())
        found = {f"model.{key}" for key in model.state_dict()}
        if found != expected:  # DicycleGenerator grew state outside ``model``, or a layer type this module misses
            raise RuntimeError(
                "UndeformedDicycleGenerator no longer mirrors DicycleGenerator's state_dict: "
                f"missing {sorted(expected - found)}, unexpected {sorted(found - expected)}."
            )
        return model

    def forward(self, x: torch.Tensor, deform: bool = False) -> torch.Tensor:
        """
        Args:
            x: source-domain slices of shape (N, C_in, H, W), any H and W.
            deform: must be False; accepted so that code written for ``DicycleGenerator`` (``g(x, deform=False)``)
                runs unchanged.

        Returns:
            Synthesized slices of shape (N, C_out, H, W): the undeformed pass.

        Raises:
            ValueError: for ``deform=True`` (this network has no deformed pass) or an input that is not 4-D.
        """
        if deform:
            raise ValueError("UndeformedDicycleGenerator has no deformed pass: use DicycleGenerator for deform=True.")
        if x.dim() != 4:
            raise ValueError("UndeformedDicycleGenerator expects 2-D slices of shape (N, C, H, W).")
        multiple = 4  # DicycleGenerator down-samples twice by 2
        h, w = x.shape[2], x.shape[3]
        pad_h, pad_w = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
        # always padded (by 0 where the size is a multiple already): no shape-dependent branch, so traced and
        # exported graphs stay valid for other sizes
        out = self.model(F.pad(x, [0, pad_w, 0, pad_h], mode="replicate"))
        return out[:, :, :h, :w]
