"""Benchmarks of the bundle's components, printed as tables of figures measured side by side in one run.

Usage (from the repository root)::

    python -m scripts.benchmark                 # everything below, then the targets (a few minutes on 2 CPU cores)
    python -m scripts.benchmark offset_conv     # OffsetConv2d against the plain convolution
    python -m scripts.benchmark generator       # deformed against undeformed generator pass, paper size
    python -m scripts.benchmark iteration       # DicycleGAN against CycleGAN training iteration, paper and demo size
    python -m scripts.benchmark compiled        # eager against torch.compile'd DicycleGAN iteration, fp32 and bf16
    python -m scripts.benchmark explain         # torch._dynamo.explain graph and graph-break counts of the step
    python -m scripts.benchmark memory          # peak memory of a paper-size iteration in each mode
    python -m scripts.benchmark loader [--dataset_dir DIR]  # samples/s of the training data pipeline

Contenders are timed round-robin and reported as medians; titles give the load average. Training iterations are
built from ``configs/train.json`` (+ ``cyclegan.json``, ``demo.json``) and run through ``DicycleGANTrainer._iteration``.
Targets: DicycleGAN iteration <= 2.0x CycleGAN, loader >= 5x an iteration, peak memory < 4 GB (paper size, CPU).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import fire
import torch
import torch.nn.functional as F
from bundle.networks import DicycleGenerator, OffsetConv2d

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "configs"
MODES = ("DicycleGAN", "CycleGAN")
# config files of each size preset and mode, applied in order over configs/train.json
PRESETS = {"paper": (), "demo": ("demo.json",)}
MODE_CONFIGS = {"DicycleGAN": (), "CycleGAN": ("cyclegan.json",)}
PRESET_LABELS = {"paper": "paper size", "demo": "demo size"}

TARGET_MODE_RATIO = 2.0  # DicycleGAN iteration / CycleGAN iteration
TARGET_LOADER_SPEEDUP = 5.0  # loader samples/s / iteration samples/s
TARGET_PEAK_MB = 4096.0  # paper-size iteration on CPU
TARGET_COMPILE_SPEEDUP = 1.3  # eager / compiled DicycleGAN iteration, CPU paper size
TARGET_COMPILED_MODE_RATIO = 1.5  # compiled DicycleGAN / eager CycleGAN iteration


def median_seconds(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
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


def backward_step(
    forward: Callable[[], torch.Tensor], leaves: Iterable[torch.Tensor], grad: torch.Tensor | None = None
) -> Callable[[], None]:
    """A step that clears the gradients of ``leaves``, then back-propagates ``grad`` (default: the mean square)."""
    leaves = list(leaves)

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        (out.square().mean() if grad is None else out).backward(grad)

    return step


def forward_backward(module: torch.nn.Module, x: torch.Tensor, **kwargs) -> Callable[[], None]:
    return backward_step(lambda: module(x, **kwargs), module.parameters())


def child_env() -> dict[str, str]:
    """This environment with the repository root first on ``PYTHONPATH``, for child processes."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}


def _header(title: str) -> None:
    threads = torch.get_num_threads()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\n## {title}  (torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}, {device}, "
        f"load average {load})"
    )


def verdict_text(met: bool) -> str:
    return "met" if met else "MISSED"


def offset_conv(repeats: int = 10, backend: str = "torch") -> list[dict]:
    """Forward + backward ms of OffsetConv2d (deformed, random offsets) against ``F.conv2d`` of the same size, and of
    the pure-PyTorch path's three kernels alone (offset conv, ``F.grid_sample`` of the taps, the contraction).

    Args:
        repeats: timed repetitions (median reported).
        backend: OffsetConv2d backend.

    Returns:
        One row per size: times (ms) and ratios to the plain convolution (target: ratio <= 3).
    """
    from bundle.deform_conv import contract_columns, grid_sample_all_threads, sampling_grid

    _header(f"OffsetConv2d ({backend}) vs plain conv, 3x3, batch 1, forward + backward")
    print(
        f"{'input':>16} | {'plain conv ms':>13} | {'OffsetConv2d ms':>15} | {'ratio':>5} | {'offset conv':>11} | "
        f"{'sampling':>8} | {'contraction':>11} | {'kernels ratio':>13}"
    )
    rows = []
    for channels, size in ((64, 128), (256, 32)):
        torch.manual_seed(0)
        layer = OffsetConv2d(channels, channels, 3, padding=1, backend=backend)
        with torch.no_grad():
            layer.offset_conv.weight.normal_(0, 0.01)
        x = torch.randn(1, channels, size, size, requires_grad=True)
        with torch.no_grad():
            grid = sampling_grid(layer.offset_conv(x), (size, size), (3, 3), padding=(1, 1))
        sampled = x.detach().clone().requires_grad_(True)
        grid.requires_grad_(True)
        columns = torch.randn(1, channels * 9, size * size, requires_grad=True)
        weight = layer.weight.detach().reshape(channels, -1).requires_grad_(True)
        # fixed output gradients: no loss over the components' (9x larger) outputs is timed
        grad_columns = torch.randn(1, channels, 9 * size, size)
        grad_out = torch.randn(1, channels, size * size)
        steps = {
            "plain": backward_step(lambda: F.conv2d(x, layer.weight, layer.bias, padding=1), layer.parameters()),
            "deformed": forward_backward(layer, x, deform=True),
            "offset_conv": forward_backward(layer.offset_conv, x),
            "sampling": backward_step(lambda: grid_sample_all_threads(sampled, grid), (sampled, grid), grad_columns),
            "contraction": backward_step(lambda: contract_columns(weight, columns, None), (weight, columns), grad_out),
        }
        ms = {name: 1e3 * seconds for name, seconds in median_seconds(steps, repeats).items()}
        kernels = ms["offset_conv"] + ms["sampling"] + ms["contraction"]
        row = {
            "input": f"{channels}x{size}x{size}",
            "plain_ms": ms["plain"],
            "offset_ms": ms["deformed"],
            "ratio": ms["deformed"] / ms["plain"],
            "offset_conv_ms": ms["offset_conv"],
            "sampling_ms": ms["sampling"],
            "contraction_ms": ms["contraction"],
            "kernels_ratio": kernels / ms["plain"],
        }
        rows.append(row)
        print(
            f"{row['input']:>16} | {row['plain_ms']:13.1f} | {row['offset_ms']:15.1f} | {row['ratio']:5.2f} | "
            f"{row['offset_conv_ms']:11.1f} | {row['sampling_ms']:8.1f} | {row['contraction_ms']:11.1f} | "
            f"{row['kernels_ratio']:13.2f}"
        )
    print(
        "kernels ratio: the three kernels of the pure-PyTorch path alone (offset conv, grid_sample of the taps, the "
        "contraction's matrix products; forward + backward each) over the plain conv: the ratio without any glue."
    )
    return rows


def generator(repeats: int = 5, size: int = 128, ngf: int = 64, n_blocks: int = 9, backend: str = "torch") -> dict:
    """Forward + backward ms of the generator's undeformed pass, deformed pass, and both as two batches or as one
    (target: deformed / undeformed <= 1.5); defaults are the paper's size.

    Args:
        repeats: timed repetitions (median reported).
        size: slice size.
        ngf: generator width.
        n_blocks: residual blocks.
        backend: OffsetConv2d backend.
    """
    _header(f"DicycleGenerator ngf={ngf}, {n_blocks} blocks, 1x1x{size}x{size}, forward + backward")
    torch.manual_seed(0)
    net = DicycleGenerator(ngf=ngf, n_blocks=n_blocks, backend=backend)
    with torch.no_grad():
        for p in net.offset_parameters():
            p.normal_(0, 0.01)
    x = torch.randn(1, 1, size, size)

    def both_separate() -> None:
        net.zero_grad(set_to_none=True)
        (net(x, deform=True).square().mean() + net(x, deform=False).square().mean()).backward()

    steps = {
        "undeformed": forward_backward(net, x, deform=False),
        "deformed": forward_backward(net, x, deform=True),
        "both_separate": both_separate,
        "both_batched": backward_step(lambda: net._run(torch.cat((x, x)), 1), net.parameters()),  # as forward_both
    }
    timed = median_seconds(steps, repeats)
    labels = ("undeformed G(x)", "deformed G_T(x)", "both passes, two batches of 1", "both passes, one batch of 2")
    print(f"{'pass':>34} | {'ms':>8} | {'x undeformed':>12}")
    for key, label in zip(steps, labels):
        print(f"{label:>34} | {1e3 * timed[key]:8.1f} | {timed[key] / timed['undeformed']:12.2f}")
    return {f"{key}_ms": 1e3 * value for key, value in timed.items()}


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _parser(preset: str, mode: str, overrides: dict[str, Any] | None = None):
    """``ConfigParser`` of configs/train.json, the preset's and the mode's override files; imports run."""
    from monai.bundle import ConfigParser

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}.")
    if mode not in MODE_CONFIGS:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    files = [CONFIGS / "train.json", *(CONFIGS / f for f in (*PRESETS[preset], *MODE_CONFIGS[mode]))]
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({"bundle_root": str(ROOT), **(overrides or {})})
    parser.get_parsed_content("imports")
    return parser


class Iteration:
    """One training configuration as the configs build it (networks, optimizers, loss, image pools) in a
    ``DicycleGANTrainer``, fed one fixed unpaired batch of random slices; calling it runs one ``trainer._iteration``."""

    def __init__(
        self,
        preset: str,
        mode: str,
        overrides: dict[str, Any] | None = None,
        seed: int = 0,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from bundle.trainer import DicycleGANTrainer

        parser = _parser(preset, mode, overrides)
        torch.manual_seed(seed)
        get = parser.get_parsed_content
        size = list(get("spatial_size"))
        self.batch_size = get("batch_size")
        generator_ = torch.Generator().manual_seed(seed)
        self.batch = {domain: torch.randn(self.batch_size, 1, *size, generator=generator_) for domain in ("A", "B")}
        self.trainer = DicycleGANTrainer(
            device=get("device"),
            max_epochs=1,
            train_data_loader=[self.batch],
            **{name: get(name) for name in ("g_ab", "g_ba", "d_a", "d_b", "g_optimizer", "d_optimizer")},
            loss_function=get("loss"),
            pool_a=get("train#pool_a"),
            pool_b=get("train#pool_b"),
            **{name: get(name) for name in ("amp", "compile", "cuda_graphs")},
            **(trainer_kwargs or {}),
        )
        self.device = torch.device(self.trainer.state.device)
        self.description = (
            f"ngf {get('ngf')}, {get('n_blocks')} blocks, {size[0]}x{size[1]}, batch {self.batch_size}, "
            f"d_channels {get('d_channels')}"
        )

    def __call__(self) -> None:
        self.trainer._iteration(self.trainer, self.batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def matrix_flop(self) -> int:
        """FLOP of one iteration's convolutions and matrix products (forward and backward), counted by
        ``torch.utils.flop_counter``; sampling, normalisation and other element-wise work are not counted."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self()
        return counter.get_total_flops()


def _names(value: str | Sequence[str]) -> list[str]:
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)


def _repeats(repeats: int | None, preset: str) -> int:
    return repeats if repeats is not None else (3 if preset == "paper" else 10)


def iteration(
    preset: str | Sequence[str] = "paper,demo",
    repeats: int | None = None,
    warmup: int = 2,
    threads: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Seconds per training iteration (generator + discriminator step) of the DicycleGAN and CycleGAN modes, and
    their matrix FLOP (:meth:`Iteration.matrix_flop`), whose ratio bounds the time ratio at equal efficiency.

    Args:
        preset: ``"paper"`` (configs/train.json), ``"demo"`` (with configs/demo.json), or both, comma-separated.
        repeats: timed iterations per mode (median); default 3 at paper size, 10 at demo size.
        warmup: untimed iterations per mode first.
        threads: CPU threads (default: PyTorch's).
        overrides: further config values, e.g. ``{"ngf": 8}``.

    Returns:
        ``{preset: {mode: seconds per iteration}}`` (target: DicycleGAN / CycleGAN <= 2.0).
    """
    _set_threads(threads)
    results = {}
    for name in _names(preset):
        runs = {mode: Iteration(name, mode, overrides) for mode in MODES}
        n = _repeats(repeats, name)
        timed = median_seconds(dict(runs), n, warmup)
        _header(f"Training iteration, {PRESET_LABELS[name]} ({runs['DicycleGAN'].description}), median of {n}")
        slices = 2 * runs["DicycleGAN"].batch_size  # a sample is one domain-A and one domain-B slice
        ratio = timed["DicycleGAN"] / timed["CycleGAN"]
        flop = {mode: run.matrix_flop() for mode, run in runs.items()}
        flop_ratio = flop["DicycleGAN"] / flop["CycleGAN"]
        print(f"{'mode':>10} | {'s/iteration':>11} | {'slices/s':>8} | {'x CycleGAN':>10} | {'GFLOP':>7} | target")
        print(
            f"{'CycleGAN':>10} | {timed['CycleGAN']:11.3f} | {slices / timed['CycleGAN']:8.2f} | {1.0:10.2f} | "
            f"{flop['CycleGAN'] / 1e9:7.2f} |"
        )
        verdict = verdict_text(ratio <= TARGET_MODE_RATIO)
        print(
            f"{'DicycleGAN':>10} | {timed['DicycleGAN']:11.3f} | {slices / timed['DicycleGAN']:8.2f} | {ratio:10.2f} | "
            f"{flop['DicycleGAN'] / 1e9:7.2f} | <= {TARGET_MODE_RATIO:.1f}x CycleGAN: {verdict}"
        )
        print(
            f"GFLOP: convolutions and matrix products of one iteration, forward and backward; their ratio, "
            f"{flop_ratio:.2f}x, is the time ratio the DicycleGAN mode cannot beat at equal arithmetic efficiency."
        )
        results[name] = timed
    return results


def cpu_bf16_problem() -> str | None:
    """Why bfloat16 would be emulated on this CPU (a one-line reason: no AVX512-BF16 or AMX-BF16 units), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return "CPU flags unreadable (no /proc/cpuinfo)"
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return f"no avx512_bf16 or amx_bf16 among the CPU flags (torch's CPU capability: {capability})"


def compiled(
    preset: str | Sequence[str] = "paper,demo",
    precision: str | Sequence[str] | None = None,
    repeats: int | None = None,
    warmup: int = 2,
    threads: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Seconds per DicycleGAN iteration, eager against ``--compile true``, beside eager CycleGAN, round-robin per
    precision; compile time apart: the first compiled iterations (until one is within 2x of eager) minus as many
    steady-state ones.

    Args:
        preset: ``"paper"``, ``"demo"`` or both, comma-separated.
        precision: ``"fp32"``, ``"bf16"`` (``--amp true``) or both; default fp32, and bf16 with bfloat16 units.
        repeats: timed iterations per contender (median); default 3 at paper size, 10 at demo size.
        warmup: untimed iterations per contender after the compile.
        threads: CPU threads.
        overrides: further config values.

    Returns:
        ``{preset: {precision: {"eager", "compiled", "cyclegan", "compile_s", "speedup", ...}}}`` (targets at paper
        size: speed-up >= 1.3x, compiled DicycleGAN <= 1.5x eager CycleGAN).
    """
    _set_threads(threads)
    if precision is None:
        problem = cpu_bf16_problem() if not torch.cuda.is_available() else None
        precision = "fp32" if problem else "fp32,bf16"
        if problem:
            print(f"(bf16 not timed: {problem})")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in _names(preset):
        n = _repeats(repeats, name)
        results[name] = {}
        for dtype in _names(precision):
            settings = {**(overrides or {}), "amp": dtype == "bf16"}
            runs = {
                "eager": Iteration(name, "DicycleGAN", settings),
                "compiled": Iteration(name, "DicycleGAN", {**settings, "compile": True}),
                "cyclegan": Iteration(name, "CycleGAN", settings),
            }
            steady = median_seconds({"eager": runs["eager"]}, 1, warmup=1)["eager"]
            first: list[float] = []
            while len(first) < 8:  # compile (and any recompile) happen in the first calls
                start = time.perf_counter()
                runs["compiled"]()
                first.append(time.perf_counter() - start)
                if len(first) >= 2 and first[-1] < 2 * steady:
                    break
            timed = median_seconds(dict(runs), n, warmup)
            compile_s = sum(first) - len(first) * timed["compiled"]
            row = {
                **timed,
                "compile_s": compile_s,
                "first_s": first[0],
                "speedup": timed["eager"] / timed["compiled"],
                "compiled_vs_cyclegan": timed["compiled"] / timed["cyclegan"],
            }
            results[name][dtype] = row
            _header(
                f"Compiled training iteration, {PRESET_LABELS[name]} ({runs['eager'].description}), {dtype}, "
                f"median of {n}"
            )
            print(f"{'step':>22} | {'s/iteration':>11} | {'x eager DicycleGAN':>18} | {'x eager CycleGAN':>16}")
            labels = {"cyclegan": "CycleGAN, eager", "eager": "DicycleGAN, eager", "compiled": "DicycleGAN, compiled"}
            for key, label in labels.items():
                print(
                    f"{label:>22} | {timed[key]:11.3f} | {timed[key] / timed['eager']:18.2f} | "
                    f"{timed[key] / timed['cyclegan']:16.2f}"
                )
            print(
                f"compile: {compile_s:.0f} s over the first {len(first)} compiled iterations (the first took "
                f"{first[0]:.0f} s); it pays after {compile_s / max(timed['eager'] - timed['compiled'], 1e-9):.0f} "
                "iterations"
                if timed["eager"] > timed["compiled"]
                else f"compile: {compile_s:.0f} s, and never pays"
            )
            if name == "paper":
                print(
                    f"targets: compiled >= {TARGET_COMPILE_SPEEDUP}x faster than eager: {row['speedup']:.2f}x, "
                    f"{verdict_text(row['speedup'] >= TARGET_COMPILE_SPEEDUP)}; compiled DicycleGAN <= "
                    f"{TARGET_COMPILED_MODE_RATIO}x eager CycleGAN: {row['compiled_vs_cyclegan']:.2f}x, "
                    f"{verdict_text(row['compiled_vs_cyclegan'] <= TARGET_COMPILED_MODE_RATIO)}",
                    flush=True,
                )
    return results


def explain(size: int = 32, ngf: int = 4, n_blocks: int = 1) -> dict[str, dict[str, int]]:
    """Graphs and graph breaks ``torch._dynamo.explain`` finds in the generator's passes and both objectives of the
    training step (pure-PyTorch backend, CPU).

    Args:
        size: slice size (at least 32: the PatchGAN's last instance norm needs 2 x 2 logits).
        ngf: generator width.
        n_blocks: residual blocks.

    Returns:
        ``{what: {"graphs", "graph_breaks"}}`` (target: 0 graph breaks everywhere).
    """
    from bundle.dicyclegan import DicycleGANLoss, DiscriminatorObjective, GeneratorObjective
    from bundle.networks import patch_discriminator

    torch.manual_seed(0)
    g_ab, g_ba = (DicycleGenerator(ngf=ngf, n_blocks=n_blocks, backend="torch") for _ in range(2))
    d_a, d_b = patch_discriminator(channels=ngf), patch_discriminator(channels=ngf)
    x = torch.randn(1, 1, size, size)
    objectives = GeneratorObjective(g_ab, g_ba, d_a, d_b, DicycleGANLoss()), DiscriminatorObjective(d_a, d_b)
    checks: dict[str, Callable[[], Any]] = {
        "undeformed pass G(x)": lambda: torch._dynamo.explain(g_ab)(x),
        "deformed pass G_T(x)": lambda: torch._dynamo.explain(g_ab)(x, deform=True),
        "both passes (forward_both)": lambda: torch._dynamo.explain(g_ab.forward_both)(x),
        "generator objective": lambda: torch._dynamo.explain(objectives[0])(x, x.flip(-1)),
        "discriminator objective": lambda: torch._dynamo.explain(objectives[1])(x, x, x, x),
    }
    _header(f"torch._dynamo.explain, ngf {ngf}, {n_blocks} blocks, 1x1x{size}x{size}, OffsetConv2d backend torch")
    print(f"{'function':>28} | {'graphs':>6} | {'graph breaks':>12}")
    results = {}
    for what, check in checks.items():
        torch._dynamo.reset()
        found = check()
        results[what] = {"graphs": found.graph_count, "graph_breaks": found.graph_break_count}
        print(f"{what:>28} | {found.graph_count:6d} | {found.graph_break_count:12d}")
        for reason in found.break_reasons:
            print(f"    break: {str(reason.reason).splitlines()[0]}")
    torch._dynamo.reset()
    return results


def _status_mb(field: str) -> float:
    """A memory figure of this process from ``/proc/self/status`` (Linux), in MB; NaN elsewhere."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 1024
    except (OSError, StopIteration, ValueError):
        return float("nan")


def memory_probe(
    preset: str = "paper", mode: str = "DicycleGAN", iterations: int = 2, overrides: dict[str, Any] | None = None
) -> dict[str, float]:
    """Run ``iterations`` training iterations and print this process's memory as JSON on the last line."""
    baseline = _status_mb("VmRSS")
    run = Iteration(preset, mode, overrides)
    built = _status_mb("VmRSS")
    for _ in range(iterations):
        run()
    peak = _status_mb("VmHWM")
    if peak != peak:  # NaN: no /proc; ru_maxrss is in bytes on macOS, KB elsewhere
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024**2 if sys.platform == "darwin" else 1024)
    result = {"baseline_mb": baseline, "built_mb": built, "peak_mb": peak}
    if run.device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated(run.device) / 1024**2
    print(json.dumps(result))
    return result


def memory(preset: str = "paper", iterations: int = 2, overrides: dict[str, Any] | None = None) -> dict:
    """Peak resident set size of a fresh process per mode (:func:`memory_probe`) after ``iterations`` training
    iterations; on CUDA also ``torch.cuda.max_memory_allocated``.

    Args:
        preset: ``"paper"`` or ``"demo"``.
        iterations: iterations run before reading the peak.
        overrides: further config values.

    Returns:
        ``{mode: {"baseline_mb", "built_mb", "peak_mb"[, "cuda_peak_mb"]}}`` (target: peak < 4 GB at paper size on CPU).

    Raises:
        RuntimeError: when a probe process fails.
    """
    results = {}
    for mode in MODES:
        command = [sys.executable, str(Path(__file__).resolve()), "memory_probe", preset, mode, str(iterations)]
        if overrides:
            command += ["--overrides", repr(overrides)]
        done = subprocess.run(command, env=child_env(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory probe of {mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    _header(f"Peak memory, {PRESET_LABELS[preset]}, {iterations} iterations, fresh process per mode (peak RSS)")
    cuda = any("cuda_peak_mb" in r for r in results.values())
    cuda_header = "CUDA peak MB | " if cuda else ""
    print(f"{'mode':>10} | {'after imports MB':>16} | {'built MB':>8} | {'peak RSS MB':>11} | {cuda_header}target")
    for mode in ("CycleGAN", "DicycleGAN"):
        r = results[mode]
        met = verdict_text(r["peak_mb"] < TARGET_PEAK_MB)
        check = f"< {TARGET_PEAK_MB:.0f} MB: {met}" if preset == "paper" else "(paper size only)"
        cuda_column = f"{r['cuda_peak_mb']:12.0f} | " if cuda else ""
        row = f"{mode:>10} | {r['baseline_mb']:16.0f} | {r['built_mb']:8.0f} | {r['peak_mb']:11.0f} | "
        print(f"{row}{cuda_column}{check}")
    return results


def _dataset(dataset_dir: str | None, datalist: str) -> tuple[Path, str]:
    """The dataset folder and its origin; a 4-subject phantom (IXI geometry) is built where it has no datalist."""
    path = Path(dataset_dir) if dataset_dir else Path(tempfile.gettempdir()) / "dicyclegan_benchmark_data"
    if (path / datalist).is_file():
        return path, "existing"
    from scripts.tooling.phantom import write_phantom_dataset

    print(f"building a 4-subject phantom dataset (2 training subjects per domain, IXI geometry) in {path} ...")
    write_phantom_dataset(output_dir=path, subjects=4, n_validation=1, n_test=1, progress=None)
    return path, "phantom built now"


def loader(
    dataset_dir: str | None = None,
    datalist: str = "datalist.json",
    preset: str | Sequence[str] = "paper,demo",
    samples: int = 200,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Samples per second of ``train#dataloader``: volumes cached first (timed apart), then one epoch timed from the
    iterator's creation (worker start-up included) to its last batch.

    Args:
        dataset_dir: dataset folder holding ``datalist``; default: a temporary folder with a 4-subject phantom.
        datalist: datalist file in ``dataset_dir``.
        preset: ``"paper"`` (1.8 mm, 128 x 128, 2 workers), ``"demo"`` (2.4 mm, 96 x 96, 1 worker), or both.
        samples: samples in the timed epoch.
        overrides: further config values, e.g. ``{"num_workers": 0}``.

    Returns:
        ``{preset: {"samples_per_s", "first_batch_s", "cache_s", ...}}``.
    """
    path, origin = _dataset(dataset_dir, datalist)
    results = {}
    for name in _names(preset):
        settings = {"dataset_dir": str(path), "datalist": datalist, "samples_per_epoch": samples, **(overrides or {})}
        parser = _parser(name, "DicycleGAN", settings)
        start = time.perf_counter()
        volumes = [parser.get_parsed_content(f"train#volumes_{d}") for d in ("a", "b")]
        cache_s = time.perf_counter() - start
        data_loader = parser.get_parsed_content("train#dataloader")
        data_loader.sampler.set_epoch(0)
        count, first = 0, None
        start = time.perf_counter()
        for batch in data_loader:
            count += batch["A"].shape[0]
            first = time.perf_counter() - start if first is None else first
        elapsed = time.perf_counter() - start
        results[name] = {
            "samples_per_s": count / elapsed,
            "first_batch_s": first,
            "cache_s": cache_s,
            "workers": data_loader.num_workers,
            "pixdim": parser.get_parsed_content("pixdim"),
            "spatial_size": parser.get_parsed_content("spatial_size"),
            "volumes": (len(volumes[0]), len(volumes[1])),
            "cached_shape": tuple(volumes[0][0]["image"].shape[1:]),
        }
    _header(f"Training data loader, epoch of {samples} samples, {path} ({datalist}, {origin})")
    print(
        f"{'geometry':>8} | {'voxel mm':>11} | {'slice':>7} | {'workers':>7} | {'volumes A/B':>11} | "
        f"{'cached A vol.':>13} | {'cache s':>7} | {'1st batch s':>11} | {'samples/s':>9} | {'slices/s':>8}"
    )
    for name, r in results.items():
        spacing = "x".join(f"{p:g}" for p in r["pixdim"])
        size, shape = ("x".join(map(str, r[k])) for k in ("spatial_size", "cached_shape"))
        print(
            f"{name:>8} | {spacing:>11} | {size:>7} | {r['workers']:7d} | {'/'.join(map(str, r['volumes'])):>11} | "
            f"{shape:>13} | {r['cache_s']:7.1f} | {r['first_batch_s']:11.2f} | {r['samples_per_s']:9.1f} | "
            f"{2 * r['samples_per_s']:8.1f}"
        )
    print("(a sample is one domain-A and one domain-B slice, augmented)")
    return results


def _ixi_volume(path: Path, dataset_dir: str | None) -> str:
    """An IXI-sized PD volume (256 x 256 x 130 at 0.94 x 0.94 x 1.2 mm): a phantom subject if one exists."""
    if dataset_dir:
        found = sorted(Path(dataset_dir).glob("*/*_PD.nii.gz"))
        if found:
            return str(found[0])
    import nibabel as nib
    import numpy as np

    shape = (256, 256, 130)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = ((x / 0.75) ** 2 + (y / 0.85) ** 2 + (z / 0.9) ** 2 <= 1) * (300 + 100 * np.cos(6 * x) * np.sin(5 * y))
    noise = np.random.default_rng(0).normal(0, 5, shape)
    nib.save(nib.Nifti1Image((head + np.abs(noise)).astype(np.float32), np.diag([0.94, 0.94, 1.2, 1.0])), path)
    return str(path)


def inference(dataset_dir: str | None = "demo_data", repeats: int = 2, sw_batch_size: int = 16) -> dict:
    """Seconds per stage (load, preprocess, network, invert, save) of one IXI-sized volume, NIfTI to NIfTI, paper-size
    generator, fp32 and bf16 autocast, and the network's GFLOP/s against an fp32 matmul (target: <= 15 s in all,
    network above half the matmul rate).

    Args:
        dataset_dir: phantom data set to take a PD volume from (a synthetic IXI-sized volume if absent).
        repeats: timed repetitions of the whole pipeline per precision (median reported).
        sw_batch_size: axial slices per forward pass.

    Returns:
        Median seconds per stage for each precision, the network's and the matmul's GFLOP/s.
    """
    from bundle.data import volume_preprocessing
    from bundle.inference import Synthesis
    from bundle.networks import DicycleGenerator  # looked up at call time (tests swap in a small one)
    from monai.transforms import Compose, SaveImaged
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    network = DicycleGenerator().eval()  # paper size: ngf 64, 9 residual blocks
    work = Path(tempfile.mkdtemp(prefix="dicyclegan_bench_"))
    source = _ixi_volume(work / "ixi_like_PD.nii.gz", dataset_dir)
    synthesis = Synthesis(
        network, volume_preprocessing("image", "MR", pixdim=(1.8, 1.8, 1.8)), sw_batch_size=sw_batch_size
    )
    load = Compose(list(synthesis.preprocessing.transforms[:2]))
    save = SaveImaged("pred", output_dir=str(work), output_postfix="T2", separate_folder=False, print_log=False)
    stages = {
        "load": lambda _: load({"image": source}),
        "preprocess": Compose(list(synthesis.preprocessing.transforms[2:])),
        "network": lambda data: {**data, "pred": synthesis.synthesize(data["image"])},
        "invert": synthesis.postprocessing,
        "save": save,
    }
    _header(f"Inference of one IXI-sized volume, paper-size generator, NIfTI -> NIfTI ({source})")

    def pipeline(amp: bool) -> dict[str, Any]:
        synthesis.inferer.amp = amp
        times, data = {}, None
        for stage, run in stages.items():
            start = time.perf_counter()
            data = run(data)
            times[stage] = time.perf_counter() - start
        times["total"] = sum(times.values())
        times["slices"] = data["image"].shape[-1]
        times["slice_shape"] = tuple(data["image"].shape[1:3])
        return times

    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    try:
        pipeline(False)  # warm-up: oneDNN kernel selection, file cache
        for _ in range(repeats):  # round-robin, so both precisions see the same load
            for name in runs:
                runs[name].append(pipeline(name == "bf16"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    slices, slice_shape = runs["fp32"][0]["slices"], runs["fp32"][0]["slice_shape"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(torch.zeros(1, 1, *slice_shape))
    flops = counter.get_total_flops() * slices

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = median_seconds({"mm": lambda: a @ b}, repeats=10)["mm"]
    matmul_gflops = 2 * 2048**3 / matmul / 1e9

    names = (*stages, "total")
    print(
        f"{slices} axial slices of {slice_shape[0]}x{slice_shape[1]} at 1.8 mm, {flops / 1e12:.2f} TFLOP in the network"
    )
    print(f"{'precision':>9} | " + " | ".join(f"{s:>10}" for s in names) + f" | {'net GFLOP/s':>11}")
    result = {"matmul_gflops": matmul_gflops, "network_tflop": flops / 1e12}
    for name, measured in runs.items():
        medians = {s: statistics.median(run[s] for run in measured) for s in names}
        rate = flops / medians["network"] / 1e9
        print(f"{name:>9} | " + " | ".join(f"{medians[s]:9.2f}s" for s in names) + f" | {rate:11.1f}")
        result[name] = {**medians, "network_gflops": rate}
    print(f"fp32 matrix multiply (2048^2) in this run: {matmul_gflops:.1f} GFLOP/s")
    print(f"targets: total <= 15 s; network >= {matmul_gflops / 2:.1f} GFLOP/s (half the matmul rate)")
    return result


def run_all(
    repeats: int = 5,
    paper_repeats: int = 3,
    dataset_dir: str | None = None,
    datalist: str = "datalist.json",
    threads: int | None = None,
) -> None:
    """Run every benchmark, then compare the training figures with the targets.

    Args:
        repeats: repetitions of the component benchmarks and (x2) of the demo-size iteration.
        paper_repeats: repetitions of the paper-size iteration.
        dataset_dir: see :func:`loader`.
        datalist: see :func:`loader`.
        threads: CPU threads of the timings in this process.
    """
    start = time.perf_counter()
    _set_threads(threads)
    offset_conv(repeats=2 * repeats)
    generator(repeats=repeats)
    timed = {**iteration("paper", repeats=paper_repeats), **iteration("demo", repeats=2 * repeats)}
    peak = memory("paper")
    rates = loader(dataset_dir, datalist)
    inference(dataset_dir)
    _header("Targets")
    print(f"{'target':>46} | {'figure':>8} | verdict")
    for name, modes in timed.items():
        ratio = modes["DicycleGAN"] / modes["CycleGAN"]
        label = f"DicycleGAN <= 2.0x CycleGAN iteration, {name}"
        print(f"{label:>46} | {ratio:7.2f}x | {verdict_text(ratio <= TARGET_MODE_RATIO)}")
    for name, modes in timed.items():
        for mode in MODES:
            # loader samples/s over iteration samples/s (batch 1 in both presets' configs)
            speedup = rates[name]["samples_per_s"] * modes[mode]
            label = f"loader >= 5x {mode} iteration, {name}"
            print(f"{label:>46} | {speedup:7.1f}x | {verdict_text(speedup >= TARGET_LOADER_SPEEDUP)}")
    for mode in MODES:
        mb = peak[mode]["peak_mb"]
        label = f"peak memory < 4 GB, paper size, {mode}"
        print(f"{label:>46} | {mb / 1024:6.2f}GB | {verdict_text(mb < TARGET_PEAK_MB)}")
    print(f"\n(all benchmarks: {time.perf_counter() - start:.0f} s)")


def _command(function: Callable) -> Callable:
    """The function as a command line: its table is the output (fire would also print the returned figures)."""

    @functools.wraps(function)
    def command(*args, **kwargs) -> None:
        function(*args, **kwargs)

    return command


if __name__ == "__main__":
    commands = (offset_conv, generator, iteration, compiled, explain, memory, memory_probe, loader, inference)
    if len(sys.argv) == 1 or (sys.argv[1].startswith("-") and sys.argv[1] not in ("-h", "--help")):
        sys.argv.insert(1, "all")  # no command: run everything
    commands = {"all": run_all, **{function.__name__: function for function in commands}}
    fire.Fire({name: _command(function) for name, function in commands.items()}, name="benchmark")
