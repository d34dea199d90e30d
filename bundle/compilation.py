"""Opt-in ``torch.compile`` of the training step and of inference: options, toolchain checks, a locale fix."""

from __future__ import annotations

import contextlib
import locale
import os
import shutil
import sys
from typing import Any

import torch

__all__ = ["compile_options", "compile_problem", "load_inductor"]


def compile_problem(device: str | torch.device) -> str | None:
    """Why inductor (``torch.compile``'s default backend) cannot build kernels for ``device`` here: a one-line
    reason, or None. It needs Triton for CUDA and, for CPU, the C++ compiler ``CXX`` (default ``g++``, ``clang++`` on
    macOS)."""
    kind = torch.device(device).type
    if kind == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton, inductor's GPU code generator, is not installed"
        return None
    if kind == "cpu":
        compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(compiler) is None:
            return f"no C++ compiler ({compiler!r}, from CXX or the default) to build inductor's CPU kernels"
    return None


def load_inductor() -> None:
    """Import ``torch.compile``'s code generator now, under ``LC_CTYPE=C.UTF-8`` (then restored): its kernel
    templates hold non-ASCII text, which a C locale fails to decode at the first compile."""
    previous = locale.setlocale(locale.LC_CTYPE)
    try:
        with contextlib.suppress(locale.Error):  # no such locale: import as the locale is
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        import torch._inductor.lowering  # noqa: F401
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def compile_options(
    device: str | torch.device, compile: bool, cuda_graphs: bool = False, backend: str = "inductor"
) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments of the training step (``dynamic=False``; ``mode="reduce-overhead"`` for
    CUDA graphs), or None for the eager step (the default). A ValueError for ``cuda_graphs`` off CUDA or with
    another backend; a RuntimeError where inductor has no toolchain (:func:`compile_problem`).

    Args:
        device: training device.
        compile: compile the generator and discriminator objectives (inductor, default mode).
        cuda_graphs: on CUDA, compile with ``mode="reduce-overhead"`` (CUDA graphs; implies ``compile``).
        backend: ``torch.compile`` backend: ``"inductor"`` (fused kernels) or, for debugging, ``"aot_eager"``.
    """
    if cuda_graphs and torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device, got {device}; use compile=True alone there.")
    if not (compile or cuda_graphs):
        return None
    if cuda_graphs and backend != "inductor":
        raise ValueError(f"cuda_graphs=True needs the inductor backend, got {backend!r}.")
    problem = compile_problem(device) if backend == "inductor" else None
    if problem is not None:
        raise RuntimeError(f"compile=True cannot run here: {problem}. Train eagerly (compile=False, the default).")
    # one shape per run: a short last batch recompiles rather than every kernel taking symbolic sizes
    return {"backend": backend, "dynamic": False, **({"mode": "reduce-overhead"} if cuda_graphs else {})}
