"""Networks of DicycleGAN: the deformable (offset) convolution, the generator and the discriminator."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from bundle.deform_conv import conv2d_im2col, deform_conv2d_torch, torchvision_deform_conv2d_problem
from monai.networks.blocks import Warp
from monai.networks.layers.factories import Act
from monai.networks.nets import PatchDiscriminator
from torch import nn
from torch.nn.modules.utils import _pair

__all__ = ["DicycleGenerator", "DisplacementField", "OffsetConv2d", "ResnetBlock", "patch_discriminator"]

_BACKENDS = ("auto", "torch", "torchvision")
_OFFSET_MODES = ("per_tap", "shared")
_GENERATOR_OFFSETS = (*_OFFSET_MODES, "field")

logger = logging.getLogger(__name__)


@torch._dynamo.assume_constant_result
def _torchvision_problem(device_type: str) -> str | None:
    """:func:`torchvision_deform_conv2d_problem`, a graph constant under ``torch.compile`` (it runs a real kernel)."""
    return torchvision_deform_conv2d_problem(device_type)


class OffsetConv2d(nn.Module):
    """Deformable convolution (Dai et al. 2017; Wang et al. 2018, Fig. 2): ``offset_conv`` (theta_T; the same kernel,
    stride, padding, dilation; zero-initialised) predicts where the convolution (theta) samples its input:
    ``2 * kh * kw`` offsets per output location in ``torchvision.ops.deform_conv2d``'s layout or, ``shared``, one
    (dy, dx) for all taps (a per-tap layer loads such a ``state_dict``). ``forward(x, deform=False)`` is exactly
    ``F.conv2d`` with ``weight`` and ``bias``.

    Args:
        in_channels, out_channels: numbers of input and output channels.
        kernel_size, stride, padding, dilation: as in ``nn.Conv2d``.
        bias: whether the main convolution has a bias.
        backend: ``"torch"`` (pure PyTorch), ``"torchvision"`` (its kernel; a RuntimeError where it does not run)
            or ``"auto"``: torchvision's kernel for CUDA tensors where it runs, else pure PyTorch.
        offsets: ``"per_tap"`` (paper) or ``"shared"`` (one offset per location, beyond the paper).
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
        self.backend, self.offsets = backend, offsets
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        n_offsets = 2 if offsets == "shared" else 2 * self.kernel_size[0] * self.kernel_size[1]
        self.offset_conv = nn.Conv2d(
            in_channels, n_offsets, self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation
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
        """Deformed (``deform=True``) or plain convolution of ``x`` (N, C_in, H, W): (N, C_out, H_out, W_out)."""
        return self.forward_mixed(x, x.shape[0] if deform else 0)

    def forward_mixed(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor:
        """Deformed convolution for the first ``num_deformed`` (0..N) items of ``x`` (N, C_in, H, W), plain
        convolution for the rest: (N, C_out, H_out, W_out)."""
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
        # one input channel on CPU: im2col + matrix product is several times faster than oneDNN's backward
        one_channel_cpu = self.in_channels <= 1 and x.device.type == "cpu"
        offset = conv2d_im2col(x, self.offset_conv) if one_channel_cpu else self.offset_conv(x)
        if self.offsets == "shared":  # (dy, dx) repeated kh * kw times: the per-tap layout with identical taps
            offset = offset.repeat(1, self.kernel_size[0] * self.kernel_size[1], 1, 1)
        return offset

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

            return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return deform_conv2d_torch(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # shared offsets (2 channels) load into a per-tap layer as the same offsets repeated per tap
        taps = self.kernel_size[0] * self.kernel_size[1]
        if self.offsets == "per_tap" and taps > 1:
            for key in (f"{prefix}offset_conv.weight", f"{prefix}offset_conv.bias"):
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
    """CycleGAN residual block: ``x + IN(conv3x3(pad(ReLU(IN(conv3x3(pad(x)))))))``, reflection padding ``pad``.

    Args:
        channels: number of input and output channels.
        deformable: make the first convolution an :class:`OffsetConv2d`.
        backend, offsets: of the deformable convolution, see :class:`OffsetConv2d`.
    """

    def __init__(
        self, channels: int, deformable: bool = False, backend: str = "auto", offsets: str = "per_tap"
    ) -> None:
        super().__init__()
        kwargs = {"backend": backend, "offsets": offsets} if deformable else {}
        first = (OffsetConv2d if deformable else nn.Conv2d)(channels, channels, 3, **kwargs)
        layers = [nn.ReflectionPad2d(1), first, nn.InstanceNorm2d(channels), nn.ReLU(inplace=True)]
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels)]
        self.block = _DeformableSequential(*layers)

    def forward(self, x: torch.Tensor, num_deformed: int = 0) -> torch.Tensor:
        """``x + block(x)`` for ``x`` of shape (N, C, H, W); the first ``num_deformed`` items take the deformed path."""
        return x + self.block(x, num_deformed)


class DicycleGenerator(nn.Module):
    """DicycleGAN generator: the CycleGAN ResNet generator (c7s1-ngf, d2ngf, d4ngf, ``n_blocks`` residual blocks,
    u2ngf, ungf, c7s1-out; InstanceNorm, reflection padding) with offset convolutions in front of the input block,
    both down-sampling blocks and the first residual block (Wang et al. 2018, Fig. 2). Sizes that are not a multiple
    of 4 are padded (edge replication) and cropped back; ``torch.jit`` and ONNX get the undeformed pass.

    Args:
        in_channels, out_channels: channels of the source-domain and of the synthesized image.
        ngf: width of the first layer (doubled by each down-sampling block).
        n_blocks: number of residual blocks (at least 1).
        deformable: insert the offset convolutions; False gives CycleGAN's generator (11,365,633 parameters for
            1 -> 1 channels, ``ngf=64``, 9 blocks).
        out_activation: None (linear, for z-scored MR), a name known to MONAI's ``Act`` factory such as ``"tanh"``
            (for range-scaled CT), or an ``nn.Module``.
        backend: of the offset convolutions, see :class:`OffsetConv2d`.
        offsets: ``"per_tap"`` (paper) or ``"shared"``, see :class:`OffsetConv2d`; or ``"field"`` (beyond the
            paper, the journal version's direction): plain convolutions, and the deformed pass is the undeformed
            output warped by one smooth displacement field (:class:`DisplacementField`, zero at initialisation).
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
        if offsets not in _GENERATOR_OFFSETS:
            raise ValueError(f"offsets must be one of {_GENERATOR_OFFSETS}, got {offsets!r}.")
        self.deformable, self.offsets = deformable, offsets
        convolutions_deform = deformable and offsets != "field"

        def conv(c_in: int, c_out: int, kernel_size: int, **kwargs) -> nn.Module:
            if convolutions_deform:
                return OffsetConv2d(c_in, c_out, kernel_size, backend=backend, offsets=offsets, **kwargs)
            return nn.Conv2d(c_in, c_out, kernel_size, **kwargs)

        layers = [nn.ReflectionPad2d(3), conv(in_channels, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(inplace=True)]
        for c_in in (ngf, 2 * ngf):  # down-sampling
            layers += [conv(c_in, 2 * c_in, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * c_in), nn.ReLU(inplace=True)]
        layers.append(ResnetBlock(4 * ngf, deformable=convolutions_deform, backend=backend, offsets=offsets))
        layers += [ResnetBlock(4 * ngf) for _ in range(n_blocks - 1)]
        for c_in in (4 * ngf, 2 * ngf):  # up-sampling
            up = nn.ConvTranspose2d(c_in, c_in // 2, 3, stride=2, padding=1, output_padding=1)
            layers += [up, nn.InstanceNorm2d(c_in // 2), nn.ReLU(inplace=True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Identity()]
        if out_activation is not None:
            layers[-1] = out_activation if isinstance(out_activation, nn.Module) else Act[out_activation]()
        self.model = _DeformableSequential(*layers)
        # CycleGAN's N(0, 0.02) initialisation of theta; the offset convolutions (theta_T) stay zero
        for name, module in self.named_modules():
            if not name.endswith("offset_conv") and isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, OffsetConv2d)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.field = DisplacementField(in_channels) if deformable and offsets == "field" else None

    def offset_parameters(self) -> list[nn.Parameter]:
        """The parameters theta_T of the deformation: the offset convolutions', or the displacement field's (empty
        when not deformable)."""
        if self.field is not None:
            return list(self.field.parameters())
        return [p for m in self.modules() if isinstance(m, OffsetConv2d) for p in m.offset_conv.parameters()]

    def _run(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"DicycleGenerator expects 2-D slices of shape (N, C, H, W), got shape {tuple(x.shape)}.")
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % 4, -w % 4
        padded = x
        # a trace always pads (by 0 if need be): no shape-dependent branch, so traced/ONNX graphs take other sizes
        if torch.jit.is_tracing() or pad_h or pad_w:
            padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        if self.field is None:
            return self.model(padded, num_deformed)[..., :h, :w]
        out = self.model(padded, 0)[..., :h, :w]
        if num_deformed:
            deformed = self.field.warp(out[:num_deformed], self.field(x[:num_deformed]))
            out = torch.cat((deformed, out[num_deformed:]), dim=0)
        return out

    def forward(self, x: torch.Tensor, deform: bool = False) -> torch.Tensor:
        """Undeformed output G(x), aligned with ``x`` (N, C_in, H, W), or with ``deform=True`` the deformed G_T(x)
        (training only): (N, C_out, H, W). A ValueError unless ``x`` is 4-D."""
        return self._run(x, x.shape[0] if deform and self.deformable else 0)

    def forward_mixed(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor:
        """Deformed pass for the first ``num_deformed`` items (0..N) of ``x`` (N, C_in, H, W), undeformed pass for
        the rest, as one batch; returns (N, C_out, H, W)."""
        return self._run(x, num_deformed if self.deformable else 0)

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G_T(x), G(x))`` for ``x`` (N, C_in, H, W), each (N, C_out, H, W), as one batch (instance norm keeps
        items independent). Without offset convolutions both are one tensor."""
        if not self.deformable:
            out = self._run(x, 0)
            return out, out
        if self.field is not None:  # one undeformed pass, then its warp
            aligned = self._run(x, 0)
            return self.field.warp(aligned, self.field(x)), aligned
        n = x.shape[0]
        out = self.forward_mixed(torch.cat((x, x), dim=0), n)
        return out[:n], out[n:]

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles: the undeformed pass, of plain layers sharing these parameters."""
        from bundle.scripting import aligned_pass  # imports this module

        return aligned_pass(self.model)


class DisplacementField(nn.Module):
    """One smooth displacement field per image (beyond the paper; the journal DiCyc's global deformation, here a
    bicubic interpolation of control points rather than a thin-plate spline): a strided CNN (kernel 4, stride 2,
    LeakyReLU(0.2)) reads the image, its features are averaged onto ``control_points`` x ``control_points`` cells,
    and a 1 x 1 convolution (zero-initialised: no displacement at first) gives each control point a displacement of
    at most ``max_displacement`` pixels (tanh), interpolated bicubically over the image.

    Args:
        in_channels: channels of the image read.
        channels: width of the first layer (doubled by each of the others).
        num_layers: strided layers.
        control_points: control points per side.
        max_displacement: bound on each component of a control point's displacement (pixels).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 16,
        num_layers: int = 3,
        control_points: int = 8,
        max_displacement: float = 8.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            c_in, c_out = (in_channels if i == 0 else channels * 2 ** (i - 1)), channels * 2**i
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.AdaptiveAvgPool2d(control_points))
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels * 2 ** (num_layers - 1), 2, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.max_displacement = float(max_displacement)
        with warnings.catch_warnings():  # MONAI warns on every construction that it uses torch's grid_sample
            warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample")
            self.warp = Warp(mode="bilinear", padding_mode="border")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Displacements (N, 2, H, W) in pixels along H and W for images ``x`` (N, C, H, W): ``warp(y, field)`` samples
        ``y`` at ``p + field(p)``."""
        control = self.max_displacement * torch.tanh(self.head(self.encoder(x)))
        return F.interpolate(control, size=x.shape[-2:], mode="bicubic", align_corners=True)


def patch_discriminator(
    in_channels: int = 1,
    channels: int = 64,
    num_layers_d: int = 3,
    norm: str | tuple = "INSTANCE",
    input_size: Sequence[int] | None = None,
) -> PatchDiscriminator:
    """The 70x70 PatchGAN discriminator of CycleGAN as MONAI's ``PatchDiscriminator`` (kernel 4, strides 2, 2, 2,
    1, 1, LeakyReLU(0.2)) judging ``in_channels`` images, widths ``channels`` (64-128-256-512-1), ``num_layers_d``
    normalised layers (3: 70x70 receptive field) normalised by ``norm``; it returns its features, the logits last.

    Raises:
        ValueError: if ``input_size`` (the training crops, pixels) is below ``3 * 2**num_layers_d``: the last
            normalised layer would see a single pixel.
    """
    smallest = 3 * 2**num_layers_d
    if input_size is not None and min(int(v) for v in input_size) < smallest:
        raise ValueError(
            f"a PatchGAN of {num_layers_d} layers (d_layers) needs training crops of at least {smallest} px, got "
            f"spatial_size {list(input_size)}: use fewer layers or larger crops."
        )
    # spatial_dims, channels, in_channels, out_channels, num_layers_d, kernel_size
    return PatchDiscriminator(2, channels, in_channels, 1, num_layers_d, 4, norm=norm, bias=True, padding=1)
