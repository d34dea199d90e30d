"""Benchmarks of the bundle's components, printed as tables of figures measured side by side in one run.

Usage (from the repository root)::

    python scripts/benchmark.py                 # everything below
    python scripts/benchmark.py offset_conv     # OffsetConv2d against the plain convolution
    python scripts/benchmark.py generator       # deformed against undeformed generator pass, paper size
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fire
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.networks import DicycleGenerator, OffsetConv2d


def _median_seconds(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time of each step, run round-robin so that every step sees the same machine load."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _forward_backward(module: torch.nn.Module, x: torch.Tensor, **kwargs) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x, **kwargs).square().mean().backward()

    return step


def _header(title: str) -> None:
    print(f"\n## {title}  (torch {torch.__version__}, {torch.get_num_threads()} threads, {_device_name()})")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def offset_conv(repeats: int = 10, backend: str = "torch") -> list[dict]:
    """Forward + backward time of OffsetConv2d (deformed, random offsets) against ``F.conv2d`` of the same size.

    Args:
        repeats: timed repetitions (median reported).
        backend: OffsetConv2d backend.

    Returns:
        One row per size with both times and their ratio (target: ratio <= 3).
    """
    _header(f"OffsetConv2d ({backend}) vs plain conv, 3x3, batch 1, forward + backward")
    print(f"{'input':>16} | {'plain conv ms':>13} | {'OffsetConv2d ms':>15} | {'ratio':>5}")
    rows = []
    for channels, size in ((64, 128), (256, 32)):
        torch.manual_seed(0)
        layer = OffsetConv2d(channels, channels, 3, padding=1, backend=backend)
        with torch.no_grad():
            layer.offset_conv.weight.normal_(0, 0.01)
        x = torch.randn(1, channels, size, size, requires_grad=True)

        def plain(layer: OffsetConv2d = layer, x: torch.Tensor = x) -> None:
            layer.zero_grad(set_to_none=True)
            F.conv2d(x, layer.weight, layer.bias, padding=1).square().mean().backward()

        timed = _median_seconds({"plain": plain, "deformed": _forward_backward(layer, x, deform=True)}, repeats)
        t_plain, t_deform = timed["plain"], timed["deformed"]
        row = {"input": f"{channels}x{size}x{size}", "plain_ms": 1e3 * t_plain, "offset_ms": 1e3 * t_deform}
        row["ratio"] = t_deform / t_plain
        rows.append(row)
        print(f"{row['input']:>16} | {row['plain_ms']:13.1f} | {row['offset_ms']:15.1f} | {row['ratio']:5.2f}")
    return rows


def generator(repeats: int = 5, size: int = 128, ngf: int = 64, n_blocks: int = 9, backend: str = "torch") -> dict:
    """Forward + backward time of the paper-size generator's deformed pass against its undeformed pass.

    Args:
        repeats: timed repetitions (median reported).
        size: slice size (paper: 128).
        ngf: generator width (paper: 64).
        n_blocks: residual blocks (paper: 9).
        backend: OffsetConv2d backend.

    Returns:
        Milliseconds of the undeformed pass, the deformed pass and both passes as two batches or one batch
        (target: deformed / undeformed <= 1.5).
    """
    _header(f"DicycleGenerator ngf={ngf}, {n_blocks} blocks, 1x1x{size}x{size}, forward + backward")
    torch.manual_seed(0)
    net = DicycleGenerator(ngf=ngf, n_blocks=n_blocks, backend=backend)
    with torch.no_grad():
        for p in net.offset_parameters():
            p.normal_(0, 0.01)
    x = torch.randn(1, 1, size, size)

    def both_batched() -> None:
        net.zero_grad(set_to_none=True)
        out = net._run(torch.cat((x, x)), 1)  # one batch of two: what forward_both does on accelerators
        out.square().mean().backward()

    def both_separate() -> None:
        net.zero_grad(set_to_none=True)
        (net(x, deform=True).square().mean() + net(x, deform=False).square().mean()).backward()

    timed = _median_seconds(
        {
            "undeformed": _forward_backward(net, x, deform=False),
            "deformed": _forward_backward(net, x, deform=True),
            "both_separate": both_separate,
            "both_batched": both_batched,
        },
        repeats,
    )
    labels = {
        "undeformed": "undeformed G(x)",
        "deformed": "deformed G_T(x)",
        "both_separate": "both passes, two batches of 1",
        "both_batched": "both passes, one batch of 2",
    }
    print(f"{'pass':>34} | {'ms':>8} | {'x undeformed':>12}")
    for key, label in labels.items():
        print(f"{label:>34} | {1e3 * timed[key]:8.1f} | {timed[key] / timed['undeformed']:12.2f}")
    return {f"{key}_ms": 1e3 * value for key, value in timed.items()}


def run_all(repeats: int = 5) -> None:
    """Run every benchmark."""
    offset_conv(repeats=2 * repeats)
    generator(repeats=repeats)


if __name__ == "__main__":
    fire.Fire({"all": run_all, "offset_conv": offset_conv, "generator": generator}, name="benchmark")
