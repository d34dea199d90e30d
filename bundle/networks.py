"""Networks of DicycleGAN: the deformable (offset) convolution, the generator and the discriminator.

The generator is the CycleGAN ResNet generator (Zhu et al. 2017) with "offset" convolutions (Dai et al. 2017) in
front of its input block, both down-sampling blocks and the first residual block (Wang et al. 2018, Fig. 2). One
module, one set of weights, two passes: the plain call ``G(x)`` is the undeformed output ``G(x | theta)`` that stays
aligned with ``x`` (what inference, validation and export run), ``G(x, deform=True)`` is the deformed output
``G_T(x) = G(x | theta, theta_T)`` that the discriminator sees during training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from bundle.deform_conv import conv2d_im2col, deform_conv2d_torch, torchvision_deform_conv2d_problem
from monai.networks.layers.factories import Act
from monai.networks.nets import PatchDiscriminator
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["DicycleGenerator", "OffsetConv2d", "ResnetBlock", "patch_discriminator"]

_BACKENDS = ("auto", "torch", "torchvision")
_OFFSET_MODES = ("per_tap", "shared")

logger = logging.getLogger(__name__)


@torch._dynamo.assume_constant_result
def _torchvision_problem(device_type: str) -> str | None:
    """:func:`torchvision_deform_conv2d_problem`; under ``torch.compile`` run eagerly once while tracing (it runs a
    real kernel) and kept as a constant of the graph."""
    return torchvision_deform_conv2d_problem(device_type)


class OffsetConv2d(nn.Module):
    """Deformable convolution: an "offset" convolution (theta_T) predicts where an ordinary convolution (theta)
    samples its input (Dai et al. 2017; Wang et al. 2018, Fig. 2).

    ``offset_conv`` has the kernel, stride, padding and dilation of the main convolution and predicts
    ``2 * kh * kw`` offsets per output location in ``torchvision.ops.deform_conv2d``'s layout (interleaved (dy, dx)
    per tap, taps row-major). It is zero-initialised, so a new layer starts as the plain convolution.
    ``forward(x, deform=False)`` is exactly ``F.conv2d`` with ``weight`` and ``bias``: the undeformed pass never
    uses theta_T.

    With ``offsets="shared"`` (an option beyond the paper) ``offset_conv`` predicts one displacement (dy, dx) per
    output location, used by every tap: the taps keep their relative positions, so the deformed pass resamples the
    input (a warp) and cannot pick different content for different taps. The 2 predicted channels are repeated into
    the per-tap layout, so both backends run unchanged. A per-tap layer loads a shared layer's ``state_dict`` (its
    2-channel offset weights repeated per tap compute the same offsets), so models trained with shared offsets are
    served by networks built with the default.

    Args:
        in_channels: number of input channels.
        out_channels: number of output channels.
        kernel_size: convolution kernel size.
        stride: convolution stride.
        padding: implicit zero padding.
        dilation: spacing between kernel taps.
        bias: whether the main convolution has a bias.
        backend: ``"torch"`` (pure PyTorch, ``F.grid_sample``), ``"torchvision"`` (its fused kernel; an error if
            it does not run) or ``"auto"``: torchvision's kernel for CUDA tensors where it runs, the pure-PyTorch
            path everywhere else (on CPU it is several times faster than torchvision's CPU kernel).
        offsets: ``"per_tap"`` (paper, Dai et al.: an offset per tap) or ``"shared"`` (one offset per location).

    Example::

        conv = OffsetConv2d(64, 128, kernel_size=3, stride=2, padding=1)
        deformed = conv(x)  # G(x | theta, theta_T)
        aligned = conv(x, deform=False)  # G(x | theta)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        backend: str = "auto",
        offsets: str = "per_tap",
    ) -> None:
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}.")
        if offsets not in _OFFSET_MODES:
            raise ValueError(f"offsets must be one of {_OFFSET_MODES}, got {offsets!r}.")
        self.backend = backend
        self.offsets = offsets
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.offset_conv = nn.Conv2d(
            in_channels,
            2 if offsets == "shared" else 2 * self.kernel_size[0] * self.kernel_size[1],
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise theta like ``nn.Conv2d`` and theta_T to zero (no deformation)."""
        reference = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None)
        with torch.no_grad():
            self.weight.copy_(reference.weight)
            if self.bias is not None:
                self.bias.copy_(reference.bias)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def forward(self, x: torch.Tensor, deform: bool = True) -> torch.Tensor:
        """
        Args:
            x: input of shape (N, C_in, H, W).
            deform: True for the deformed convolution, False for the plain convolution with the same weights.

        Returns:
            Tensor of shape (N, C_out, H_out, W_out).
        """
        return self.forward_mixed(x, x.shape[0] if deform else 0)

    def forward_mixed(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor:
        """Deformed convolution for the first ``num_deformed`` batch items, plain convolution for the rest.

        This lets a generator run its deformed and undeformed passes as one batch.

        Args:
            x: input of shape (N, C_in, H, W).
            num_deformed: how many leading batch items take the deformed path (0..N).

        Returns:
            Tensor of shape (N, C_out, H_out, W_out).
        """
        if num_deformed <= 0:
            return self._plain(x)
        if num_deformed >= x.shape[0]:
            return self._deformed(x)
        # split rather than two slices: its gradient is one concatenation, not two zero-filled copies of x
        deformed, plain = x.split((num_deformed, x.shape[0] - num_deformed))
        return torch.cat((self._deformed(deformed), self._plain(plain)), dim=0)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def _offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Offsets in ``deform_conv2d``'s layout (N, 2 * kh * kw, H_out, W_out); shared ones repeated per tap."""
        offset = self._predicted_offsets(x)
        if self.offsets == "shared":
            # (dy, dx) repeated kh * kw times is the interleaved per-tap layout with identical taps
            offset = offset.repeat(1, self.kernel_size[0] * self.kernel_size[1], 1, 1)
        return offset

    def _predicted_offsets(self, x: torch.Tensor) -> torch.Tensor:
        # one input channel on CPU (the generator's input block): oneDNN's backward to a one-channel input is
        # several times slower than the same convolution as im2col + matrix product
        if self.in_channels > 1 or x.device.type != "cpu":
            return self.offset_conv(x)
        return conv2d_im2col(x, self.offset_conv)

    def _uses_torchvision(self, x: torch.Tensor) -> bool:
        if self.backend == "torch" or (self.backend == "auto" and x.device.type != "cuda"):
            return False
        problem = _torchvision_problem(x.device.type)
        if problem is None:
            return True
        if self.backend == "torchvision":
            raise RuntimeError(
                f"OffsetConv2d(backend='torchvision'): torchvision's deform_conv2d does not run on {x.device.type} "
                f"here ({problem}); use backend='auto' or 'torch'."
            )
        if not getattr(self, "_fallback_logged", False):
            logger.warning("torchvision's deform_conv2d does not run here (%s); using the pure-PyTorch path.", problem)
            self._fallback_logged = True
        return False

    def _deformed(self, x: torch.Tensor) -> torch.Tensor:
        offset = self._offsets(x)
        if self._uses_torchvision(x):
            from torchvision.ops import deform_conv2d

            return deform_conv2d(
                x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation
            )
        return deform_conv2d_torch(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # shared offsets (2 channels) load into a per-tap layer as the same offsets repeated per tap
        taps = self.kernel_size[0] * self.kernel_size[1]
        if self.offsets == "per_tap" and taps > 1:
            for name in ("weight", "bias"):
                key = f"{prefix}offset_conv.{name}"
                value = state_dict.get(key)
                if value is not None and value.shape[0] == 2:
                    state_dict[key] = value.repeat(taps, *([1] * (value.ndim - 1)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, backend={self.backend}"
        )
        return text if self.offsets == "per_tap" else f"{text}, offsets={self.offsets}"


class _DeformableSequential(nn.Sequential):
    """``nn.Sequential`` that hands the number of deformed batch items to the layers that deform."""

    def forward(self, x: torch.Tensor, num_deformed: int = 0) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, OffsetConv2d):
                x = layer.forward_mixed(x, num_deformed)
            elif isinstance(layer, (ResnetBlock, _DeformableSequential)):
                x = layer(x, num_deformed)
            else:
                x = layer(x)
        return x


class ResnetBlock(nn.Module):
    """CycleGAN residual block: reflection pad, conv 3x3, InstanceNorm, ReLU, reflection pad, conv 3x3, InstanceNorm,
    plus the identity.

    Args:
        channels: number of input and output channels.
        deformable: make the first convolution an :class:`OffsetConv2d`.
        backend: deformable-convolution backend, see :class:`OffsetConv2d`.
        offsets: offset mode of the deformable convolution, see :class:`OffsetConv2d`.
    """

    def __init__(
        self, channels: int, deformable: bool = False, backend: str = "auto", offsets: str = "per_tap"
    ) -> None:
        super().__init__()
        first_conv = (
            OffsetConv2d(channels, channels, 3, backend=backend, offsets=offsets)
            if deformable
            else nn.Conv2d(channels, channels, 3)
        )
        self.block = _DeformableSequential(
            nn.ReflectionPad2d(1),
            first_conv,
            nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor, num_deformed: int = 0) -> torch.Tensor:
        """
        Args:
            x: input of shape (N, C, H, W).
            num_deformed: how many leading batch items take the deformed path.

        Returns:
            ``x + block(x)``, same shape as ``x``.
        """
        return x + self.block(x, num_deformed)


class DicycleGenerator(nn.Module):
    """DicycleGAN generator: the CycleGAN ResNet generator (c7s1-ngf, d2ngf, d4ngf, ``n_blocks`` residual blocks,
    u2ngf, ungf, c7s1-out; InstanceNorm, reflection padding) with offset convolutions in front of the input block,
    both down-sampling blocks and the first residual block (Wang et al. 2018, Fig. 2).

    With ``deformable=False`` it is the vanilla CycleGAN generator (11,365,633 parameters for 1 -> 1 channels,
    ``ngf=64``, 9 blocks), and both passes are the same. The network is fully convolutional; inputs whose height or
    width is not a multiple of 4 are padded (edge replication) and the output is cropped back.

    Args:
        in_channels: channels of the source-domain image.
        out_channels: channels of the synthesized image.
        ngf: width of the first layer (doubled by each down-sampling block).
        n_blocks: number of residual blocks.
        deformable: insert the offset convolutions (DicycleGAN); False gives plain CycleGAN.
        out_activation: output activation: None (linear, for z-scored MR), a name known to MONAI's ``Act``
            factory such as ``"tanh"`` (for range-scaled CT), or an ``nn.Module``.
        backend: deformable-convolution backend, see :class:`OffsetConv2d`.
        offsets: ``"per_tap"`` (paper) or ``"shared"``: one displacement per location shared by all taps of each
            offset convolution (beyond the paper, opt-in), so the deformed pass can displace the features but not
            switch their content; see :class:`OffsetConv2d`. The undeformed pass is the same in both modes.

    ``torch.jit.script`` compiles the undeformed pass (see :meth:`__prepare_scriptable__`) and ``torch.jit.trace``
    / ONNX record it, so this module is the bundle's ``network_def`` and ``models/model.pt`` is its bare state_dict.

    Example::

        g_ab = DicycleGenerator()
        aligned_b = g_ab(x_a)  # undeformed output G(x), aligned with x_a: inference, validation, export
        fake_b = g_ab(x_a, deform=True)  # deformed output G_T(x), for the discriminator
        fake_b, aligned_b = g_ab.forward_both(x_a)  # both in one batched pass
        served = torch.jit.script(g_ab.eval())  # the undeformed pass, same state_dict keys
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
        offsets: str = "per_tap",
    ) -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, got {n_blocks}.")
        if offsets not in _OFFSET_MODES:
            raise ValueError(f"offsets must be one of {_OFFSET_MODES}, got {offsets!r}.")
        self.deformable = deformable
        self.offsets = offsets

        def conv(c_in: int, c_out: int, kernel_size: int, **kwargs) -> nn.Module:
            if deformable:
                return OffsetConv2d(c_in, c_out, kernel_size, backend=backend, offsets=offsets, **kwargs)
            return nn.Conv2d(c_in, c_out, kernel_size, **kwargs)

        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            conv(in_channels, ngf, 7),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(inplace=True),
        ]
        for i in range(2):  # down-sampling
            c_in = ngf * 2**i
            layers += [conv(c_in, 2 * c_in, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c_in), nn.ReLU(inplace=True)]
        layers.append(ResnetBlock(4 * ngf, deformable=deformable, backend=backend, offsets=offsets))
        layers += [ResnetBlock(4 * ngf) for _ in range(n_blocks - 1)]
        for i in range(2):  # up-sampling
            c_in = ngf * 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(c_in, c_in // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(c_in // 2),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), self._activation(out_activation)]
        self.model = _DeformableSequential(*layers)
        self._init_weights()

    @staticmethod
    def _activation(out_activation: str | nn.Module | None) -> nn.Module:
        if out_activation is None:
            return nn.Identity()
        if isinstance(out_activation, nn.Module):
            return out_activation
        return Act[out_activation]()

    def _init_weights(self, gain: float = 0.02) -> None:
        """CycleGAN's N(0, 0.02) initialisation of theta; the offset convolutions (theta_T) stay zero."""
        for name, module in self.named_modules():
            if name.endswith("offset_conv"):
                continue
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, OffsetConv2d)):
                nn.init.normal_(module.weight, 0.0, gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def offset_parameters(self) -> list[nn.Parameter]:
        """The parameters theta_T of the offset convolutions (empty when not deformable)."""
        return [p for m in self.modules() if isinstance(m, OffsetConv2d) for p in m.offset_conv.parameters()]

    def _run(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"DicycleGenerator expects 2-D slices of shape (N, C, H, W), got shape {tuple(x.shape)}.")
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % 4, -w % 4
        # a trace always pads (by 0 where the size is a multiple of 4 already): no shape-dependent branch, so traced
        # and ONNX graphs stay valid for other slice sizes
        if torch.jit.is_tracing() or pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.model(x, num_deformed)
        return out[..., :h, :w]

    def forward(self, x: torch.Tensor, deform: bool = False) -> torch.Tensor:
        """
        Args:
            x: source-domain slices of shape (N, C_in, H, W).
            deform: False (default) for the undeformed output G(x), aligned with ``x``; True for the deformed
                output G_T(x) (training only).

        Returns:
            Synthesized slices of shape (N, C_out, H, W).
        """
        return self._run(x, x.shape[0] if deform and self.deformable else 0)

    def forward_mixed(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor:
        """Deformed pass for the first ``num_deformed`` batch items, undeformed pass for the rest.

        Args:
            x: source-domain slices of shape (N, C_in, H, W).
            num_deformed: how many leading items take the deformed pass (0..N).

        Returns:
            Synthesized slices of shape (N, C_out, H, W).
        """
        # one batch on every device: each layer after the offset convolutions reads its weights and dispatches once
        # for both passes (scripts/benchmark.py generator: on CPU one batch of 2 is as fast as two batches of 1 on
        # one thread and faster on more)
        return self._run(x, num_deformed if self.deformable else 0)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Deformed and undeformed outputs, as one batch (instance norm keeps items independent).

        Args:
            x: source-domain slices of shape (N, C_in, H, W).

        Returns:
            ``(G_T(x), G(x))``, each of shape (N, C_out, H, W). Without offset convolutions both are one tensor.
        """
        if not self.deformable:
            out = self._run(x, 0)
            return out, out
        n = x.shape[0]
        out = self.forward_mixed(torch.cat((x, x), dim=0), n)
        return out[:n], out[n:]

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles: the undeformed pass, built from plain layers sharing these parameters.

        The deformed pass (bilinear sampling, an optional torchvision kernel) is training-only and not scriptable;
        the result has this module's ``state_dict`` keys, so ``monai.bundle ckpt_export`` works on ``models/model.pt``.
        """
        from bundle.scripting import aligned_pass  # imports this module

        return aligned_pass(self.model)


def patch_discriminator(
    in_channels: int = 1, channels: int = 64, num_layers_d: int = 3, norm: str | tuple = "INSTANCE"
) -> PatchDiscriminator:
    """The 70x70 PatchGAN discriminator of CycleGAN, built from MONAI's ``PatchDiscriminator``.

    Convolutions of kernel 4 with strides 2, 2, 2, 1, 1 (``num_layers_d=3``), widths 64-128-256-512-1, InstanceNorm
    and LeakyReLU(0.2): each output logit sees a 70 x 70 input patch. The network returns the list of intermediate
    feature maps with the logits last.

    Args:
        in_channels: channels of the images judged.
        channels: width of the first layer.
        num_layers_d: number of normalised layers (3 gives the 70x70 receptive field).
        norm: feature normalisation (CycleGAN uses instance norm).

    Returns:
        A ``monai.networks.nets.PatchDiscriminator``.
    """
    return PatchDiscriminator(
        spatial_dims=2,
        channels=channels,
        in_channels=in_channels,
        out_channels=1,
        num_layers_d=num_layers_d,
        kernel_size=4,
        norm=norm,
        bias=True,
        padding=1,
    )
