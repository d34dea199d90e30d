"""The kernels of the deformable convolution: a pure-PyTorch ``deform_conv2d`` and the check that torchvision's runs.

:class:`bundle.networks.OffsetConv2d` calls :func:`deform_conv2d_torch` everywhere except on CUDA tensors where
``torchvision.ops.deform_conv2d`` runs (:func:`torchvision_deform_conv2d_problem`); both have the same semantics.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "contract_columns",
    "conv2d_im2col",
    "deform_conv2d_torch",
    "grid_sample_all_threads",
    "sampling_grid",
    "torchvision_deform_conv2d_problem",
]


@functools.cache
def torchvision_deform_conv2d_problem(device_type: str) -> str | None:
    """Why ``torchvision.ops.deform_conv2d`` cannot run on ``device_type`` tensors here, or None when it runs.

    Being importable is not enough: PyPI's torchvision is built for CUDA torch, and beside a CPU torch it imports but
    its operators are missing (``operator torchvision::nms does not exist``). So one tiny deformable convolution is
    run on the device, once per device type and process.

    Args:
        device_type: ``"cuda"``, ``"cpu"``, ...

    Returns:
        None if the kernel ran, else a one-line reason.
    """
    try:
        from torchvision.ops import deform_conv2d

        x = torch.ones(1, 1, 3, 3, device=device_type)
        deform_conv2d(x, torch.zeros(1, 18, 1, 1, device=device_type), torch.ones(1, 1, 3, 3, device=device_type))
    except Exception as error:  # an import error, a missing operator, a kernel built for another device ...
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    return None


def deform_conv2d_torch(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Deformable 2-D convolution in pure PyTorch, with the semantics of ``torchvision.ops.deform_conv2d``.

    Tap ``k = i * kw + j`` of output location ``(oy, ox)`` samples the input at
    ``(oy * stride_h - pad_h + i * dil_h + offset[:, 2k], ox * stride_w - pad_w + j * dil_w + offset[:, 2k + 1])``
    by bilinear interpolation, with zeros outside the image. One ``F.grid_sample`` call (``align_corners=True``
    maps normalised coordinates exactly onto pixel centres) gathers every tap into a (kh * kw * H_out, W_out) map per
    channel, tap-major: that is the column matrix of an im2col convolution, (C * kh * kw, H_out * W_out), without a
    copy, and one matrix product with the (C_out, C * kh * kw) weights contracts it.

    Args:
        x: input of shape (N, C, H, W).
        offset: offsets of shape (N, 2 * kh * kw, H_out, W_out), interleaved (dy, dx) per tap, taps row-major.
        weight: convolution weights of shape (C_out, C, kh, kw).
        bias: optional bias of shape (C_out,).
        stride: stride (h, w).
        padding: implicit zero padding (h, w).
        dilation: spacing between taps (h, w).

    Returns:
        Tensor of shape (N, C_out, H_out, W_out).
    """
    n, channels = x.shape[:2]
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[-2:]
    if offset.shape[1] != 2 * kh * kw:
        raise ValueError(f"offset must have 2 * kh * kw = {2 * kh * kw} channels, got {offset.shape[1]}.")
    # Normalising by (size - 1) needs size >= 2; an extra zero row/column is exactly "outside the image".
    if x.shape[-2] == 1 or x.shape[-1] == 1:
        x = F.pad(x, (0, int(x.shape[-1] == 1), 0, int(x.shape[-2] == 1)))
    grid = sampling_grid(offset, x.shape[-2:], (kh, kw), stride, padding, dilation)
    columns = grid_sample_all_threads(x, grid.to(x.dtype))
    out = contract_columns(
        weight.reshape(c_out, channels * kh * kw), columns.reshape(n, channels * kh * kw, h_out * w_out), bias
    )
    return out.view(n, c_out, h_out, w_out)


def sampling_grid(
    offset: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """``F.grid_sample`` grid (``align_corners=True``) of a deformable convolution's taps, tap-major rows.

    Args:
        offset: offsets of shape (N, 2 * kh * kw, H_out, W_out), interleaved (dy, dx) per tap, taps row-major.
        input_size: (H, W) of the sampled input, both at least 2.
        kernel_size: (kh, kw).
        stride: stride (h, w).
        padding: implicit zero padding (h, w).
        dilation: spacing between taps (h, w).

    Returns:
        Tensor of shape (N, kh * kw * H_out, W_out, 2): normalised (x, y) of tap ``k`` of output ``(oy, ox)`` at row
        ``k * H_out + oy``, column ``ox``; in at least float32 (a bfloat16 position would be off by up to half a
        pixel at 128 pixels).
    """
    n, _, h_out, w_out = offset.shape
    h, w = input_size
    kh, kw = kernel_size
    taps = kh * kw
    # normalised sampling position = offset * scale + base, base = the undeformed tap position (a constant)
    device, dtype = offset.device, torch.promote_types(offset.dtype, torch.float32)
    scale_y, scale_x = 2.0 / (h - 1), 2.0 / (w - 1)
    tap_y = torch.arange(kh, device=device, dtype=dtype).repeat_interleave(kw) * dilation[0]
    tap_x = torch.arange(kw, device=device, dtype=dtype).repeat(kh) * dilation[1]
    out_y = torch.arange(h_out, device=device, dtype=dtype) * stride[0] - padding[0]
    out_x = torch.arange(w_out, device=device, dtype=dtype) * stride[1] - padding[1]
    base_y = (tap_y.view(taps, 1, 1) + out_y.view(1, h_out, 1)) * scale_y - 1.0
    base_x = (tap_x.view(taps, 1, 1) + out_x.view(1, 1, w_out)) * scale_x - 1.0
    # unbind rather than indexing: its gradient is one stack, not zero-filled copies
    offset_y, offset_x = offset.to(dtype).view(n, taps, 2, h_out, w_out).unbind(2)
    sample_x = torch.add(base_x, offset_x, alpha=scale_x)
    sample_y = torch.add(base_y, offset_y, alpha=scale_y)
    if offset.device.type == "cpu" and not torch.compiler.is_compiling():
        # the complex number x + iy viewed as real is the interleaved (x, y) pair, written in one pass
        # (torch.stack(..., dim=-1) interleaves several times slower on one CPU thread)
        grid = torch.view_as_real(torch.complex(sample_x, sample_y))
    else:
        # a compiled graph fuses this interleave into its producers (and inductor has no complex kernels)
        grid = torch.stack((sample_x, sample_y), dim=-1)
    return grid.view(n, taps * h_out, w_out, 2)


def contract_columns(weight: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``weight @ columns + bias`` for weights (C_out, K) and im2col columns (N, K, L): contiguous (N, C_out, L).

    Explicit (b)addmm calls: ``torch.matmul`` of a matrix with a batch folds it into a transposed product, whose
    transposed result the following layers would copy.
    """
    if columns.shape[0] == 1:
        # a view, not columns[0]: the gradient of an index is a zero-filled copy of the whole column matrix
        matrix = columns.view(columns.shape[1:])
        out = torch.mm(weight, matrix) if bias is None else torch.addmm(bias.unsqueeze(1), weight, matrix)
        return out.unsqueeze(0)
    weight = weight.expand(columns.shape[0], *weight.shape)
    return torch.bmm(weight, columns) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, columns)


@torch._dynamo.assume_constant_result
def _cpu_threads() -> int:
    """``torch.get_num_threads()``; under ``torch.compile`` read once while tracing and kept as a constant (the call
    itself returns no tensor and would break the graph), so a compiled step splits its sampling like an eager one."""
    return torch.get_num_threads()


def grid_sample_all_threads(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample`` (bilinear, zeros, ``align_corners=True``) that keeps every CPU thread busy.

    PyTorch's CPU kernel runs one batch item per thread, so a batch of one slice uses one core. Splitting the
    channels (or, when they do not divide evenly, the rows of the grid) into extra batch items gives each thread a
    share; the input and the grid are only viewed or expanded, not copied, and a channel split needs no copy of the
    result either.
    """
    n, rows, cols, _ = grid.shape
    channels = x.shape[1]
    parts = _cpu_threads() // n if x.device.type == "cpu" else 1
    if parts >= 2 and channels % parts == 0:
        x_parts = x.reshape(n * parts, channels // parts, *x.shape[2:])
        grid_parts = grid.unsqueeze(1).expand(n, parts, rows, cols, 2).reshape(n * parts, rows, cols, 2)
        sampled = F.grid_sample(x_parts, grid_parts, mode="bilinear", padding_mode="zeros", align_corners=True)
        return sampled.view(n, channels, rows, cols)
    if parts < 2 or rows < 2 * parts:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    chunk = -(-rows // parts)
    if chunk * parts > rows:
        # rows added to fill the last chunk sample far outside the image (zeros) and are cropped below
        grid = F.pad(grid, (0, 0, 0, 0, 0, chunk * parts - rows), value=-4.0)
    x_parts = x.unsqueeze(1).expand(n, parts, *x.shape[1:]).reshape(n * parts, *x.shape[1:])
    sampled = F.grid_sample(
        x_parts, grid.reshape(n * parts, chunk, cols, 2), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    sampled = sampled.view(n, parts, channels, chunk, cols).transpose(1, 2).reshape(n, channels, parts * chunk, cols)
    return sampled[:, :, :rows]


def conv2d_im2col(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` computed as im2col (``F.unfold``) and one matrix product with the weights (C_out, C * kh * kw).

    Args:
        x: input of shape (N, C, H, W).
        conv: a convolution without groups.

    Returns:
        ``conv(x)``, shape (N, C_out, H_out, W_out).
    """
    kernel_size, stride, padding, dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    h_out, w_out = (
        (size + 2 * pad - dil * (k - 1) - 1) // step + 1
        for size, pad, dil, k, step in zip(x.shape[-2:], padding, dilation, kernel_size, stride, strict=True)
    )
    columns = F.unfold(x, kernel_size, dilation, padding, stride)  # (N, C * kh * kw, L)
    out = contract_columns(conv.weight.view(conv.out_channels, -1), columns, conv.bias)
    return out.view(x.shape[0], conv.out_channels, h_out, w_out)
