"""The kernels of the deformable convolution: a pure-PyTorch ``deform_conv2d`` and the check that torchvision's runs."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["contract_columns", "conv2d_im2col", "deform_conv2d_torch", "grid_sample_all_threads", "sampling_grid"]
__all__ += ["torchvision_deform_conv2d_problem"]


@functools.cache
def torchvision_deform_conv2d_problem(device_type: str) -> str | None:
    """Why ``torchvision.ops.deform_conv2d`` cannot run on ``device_type`` (``"cuda"``, ``"cpu"``, ...) tensors
    here (a one-line reason), or None: one tiny deformable convolution is run, once per device type and process."""
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
    """Deformable 2-D convolution in pure PyTorch, as ``torchvision.ops.deform_conv2d``: (N, C_out, H_out, W_out).

    Tap ``k = i * kw + j`` of output location ``(oy, ox)`` samples the input at
    ``(oy * stride_h - pad_h + i * dil_h + offset[:, 2k], ox * stride_w - pad_w + j * dil_w + offset[:, 2k + 1])``
    bilinearly, zeros outside the image: one ``F.grid_sample`` gathers the im2col columns, one matrix product
    contracts them.

    Args:
        x: input of shape (N, C, H, W).
        offset: (N, 2 * kh * kw, H_out, W_out) (else a ValueError), interleaved (dy, dx) per tap, taps row-major.
        weight: convolution weights of shape (C_out, C, kh, kw).
        bias: optional bias of shape (C_out,).
        stride, padding, dilation: stride, implicit zero padding and spacing between taps, each (h, w).
    """
    n, channels = x.shape[:2]
    c_out, _, kh, kw = weight.shape
    h_out, w_out = offset.shape[-2:]
    if offset.shape[1] != 2 * kh * kw:
        raise ValueError(f"offset must have 2 * kh * kw = {2 * kh * kw} channels, got {offset.shape[1]}.")
    # normalising by (size - 1) needs size >= 2; an extra zero row/column is exactly "outside the image"
    if x.shape[-2] == 1 or x.shape[-1] == 1:
        x = F.pad(x, (0, int(x.shape[-1] == 1), 0, int(x.shape[-2] == 1)))
    grid = sampling_grid(offset, x.shape[-2:], (kh, kw), stride, padding, dilation)
    columns = grid_sample_all_threads(x, grid.to(x.dtype)).reshape(n, channels * kh * kw, h_out * w_out)
    out = contract_columns(weight.reshape(c_out, channels * kh * kw), columns, bias)
    return out.view(n, c_out, h_out, w_out)


def sampling_grid(
    offset: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """``F.grid_sample`` grid (``align_corners=True``) of a deformable convolution's taps, (N, kh * kw * H_out,
    W_out, 2) in at least float32: normalised (x, y) of tap ``k`` of output (oy, ox) at ``[:, k * H_out + oy, ox]``.

    Args:
        offset: offsets of shape (N, 2 * kh * kw, H_out, W_out), as in :func:`deform_conv2d_torch`.
        input_size: (H, W) of the sampled input, both at least 2.
        kernel_size, stride, padding, dilation: as in :func:`deform_conv2d_torch`, each (h, w).
    """
    (n, _, h_out, w_out), (h, w), (kh, kw) = offset.shape, input_size, kernel_size
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
        # x + iy viewed as real is the interleaved (x, y) pair in one pass (faster than stack on CPU)
        grid = torch.view_as_real(torch.complex(sample_x, sample_y))
    else:  # compiled graphs fuse the stack (and inductor has no complex kernels)
        grid = torch.stack((sample_x, sample_y), dim=-1)
    return grid.view(n, taps * h_out, w_out, 2)


def contract_columns(weight: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``weight @ columns + bias`` for weights (C_out, K) and im2col columns (N, K, L): contiguous (N, C_out, L).

    Explicit (b)addmm: ``torch.matmul`` would return a transposed result that the next layers copy.
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
    """``torch.get_num_threads()``, a graph constant under ``torch.compile`` (the call would break the graph)."""
    return torch.get_num_threads()


def grid_sample_all_threads(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample`` (bilinear, zeros, ``align_corners=True``) that keeps every CPU thread busy.

    The CPU kernel runs one batch item per thread: the channels (or, when they do not divide evenly, the grid rows)
    are split into extra batch items, by views and expands, not copies.
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
    """``conv(x)`` for ``x`` (N, C, H, W) and a convolution without groups, computed as im2col (``F.unfold``) and one
    matrix product with the weights (C_out, C * kh * kw): (N, C_out, H_out, W_out)."""
    kernel_size, stride, padding, dilation = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    h_out, w_out = (
        (size + 2 * pad - dil * (k - 1) - 1) // step + 1
        for size, pad, dil, k, step in zip(x.shape[-2:], padding, dilation, kernel_size, stride, strict=True)
    )
    columns = F.unfold(x, kernel_size, dilation, padding, stride)  # (N, C * kh * kw, L)
    out = contract_columns(conv.weight.view(conv.out_channels, -1), columns, conv.bias)
    return out.view(x.shape[0], conv.out_channels, h_out, w_out)
