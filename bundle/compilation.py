"""Opt-in ``torch.compile`` of the training step and of inference: options, toolchain checks, a locale fix."""

from __future__ import annotations

import locale
import os
import shutil
import sys
from typing import Any

import torch

__all__ = ["compile_options", "compile_problem", "load_inductor"]


def compile_problem(device: str | torch.device) -> str | None:
    """Why ``torch.compile``'s default backend (inductor) cannot build kernels for ``device`` here, or None.

    Inductor writes C++ for CPU kernels and compiles it with the compiler named by ``CXX`` (default ``g++``,
    ``clang++`` on macOS), and writes Triton for CUDA kernels: without them a compiled step fails at its first call.

    Args:
        device: the device the compiled step runs on.

    Returns:
        None when the toolchain is present, else a one-line reason.
    """
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
    """Import ``torch.compile``'s code generator now, with a UTF-8 character type.

    Torch reads inductor's kernel templates in the locale's encoding, and some of them hold non-ASCII text: where the C
    locale is in force (set by the environment, or by a library during the run, as seen in the test suite) the first
    compile fails with a UnicodeDecodeError. Importing them once under C.UTF-8 avoids that; the locale is restored.
    """
    previous = locale.setlocale(locale.LC_CTYPE)
    try:
        try:
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        except locale.Error:  # no such locale: import as the locale is
            pass
        import torch._inductor.lowering  # noqa: F401
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def compile_options(
    device: str | torch.device, compile: bool, cuda_graphs: bool = False, backend: str = "inductor"
) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments of the training step, or None for the eager step (the default).

    Args:
        device: training device.
        compile: compile the generator and discriminator objectives (inductor, default mode).
        cuda_graphs: on CUDA, compile with ``mode="reduce-overhead"``: the fixed-shape step is captured as CUDA graphs
            and replayed, so the host no longer launches each kernel (implies ``compile``).
        backend: ``torch.compile`` backend; ``"inductor"`` (default) generates fused kernels, ``"aot_eager"`` only
            captures the graphs (forward and backward) and runs them with PyTorch's kernels, for debugging.

    Returns:
        ``torch.compile`` arguments (``dynamic=False``: a training step has one shape; ``mode="reduce-overhead"`` for
        CUDA graphs), or None.

    Raises:
        ValueError: ``cuda_graphs`` on a device other than CUDA.
        RuntimeError: compiling asked for where inductor has no toolchain (see :func:`compile_problem`).
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
    # one shape per run: a differently sized batch (a short last batch) recompiles instead of every kernel
    # being generated for symbolic sizes
    return {"backend": backend, "dynamic": False, **({"mode": "reduce-overhead"} if cuda_graphs else {})}
