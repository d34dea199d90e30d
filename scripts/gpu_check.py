"""One prepared check of the bundle's GPU paths, written as a Markdown report with the device's name.

Usage (from the repository root)::

    python -m scripts.gpu_check --output docs/gpu_check.md             # on a CUDA machine: paper size, ~5 min
    python -m scripts.gpu_check --size tiny --output /tmp/gpu_check.md  # anywhere; CI runs this on CPU

Sections, on CUDA when available, else CPU:

1. ``OffsetConv2d``: pure PyTorch against torchvision's ``deform_conv2d`` (values and gradients to 1e-4 of the
   output's scale), both timed against the plain convolution;
2. CycleGAN and DicycleGAN training iterations, fp32 and AMP (bfloat16): median time, peak GPU memory, finite losses;
3. a 2-epoch ``monai.bundle run`` with ``--amp true``, killed after its first checkpoint, resumed, resumed again
   (a finished run must touch nothing);
4. inference of an IXI-sized volume (256 x 256 x 130) through ``configs/inference.json``: seconds per volume;
5. DistributedDataParallel through ``configs/multi_gpu_train.json`` under ``torchrun``, world size 1;
6. ``--compile true`` and, on CUDA, ``--cuda_graphs true`` against eager (fp32 and AMP, batch 1 and 8; on a CPU
   fp32, batch 1, ``aot_eager``, no CUDA graphs): compile time, first-iteration losses against eager's.

``--size tiny`` (about a minute on 2 CPU cores) is what ``tests/test_gpu_check.py`` runs.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import itertools
import json
import math
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fire
import torch
import torch.nn.functional as F
from bundle.deform_conv import torchvision_deform_conv2d_problem
from bundle.networks import OffsetConv2d
from scripts.benchmark import Iteration, backward_step, child_env, forward_backward, median_seconds, verdict_text

ROOT = Path(__file__).resolve().parents[1]

# GPU targets, on the card used
TARGET_MODE_RATIO = 2.0  # DicycleGAN / CycleGAN iteration time
TARGET_AMP_SPEEDUP = 1.5  # fp32 / AMP iteration time, DicycleGAN
TARGET_INFERENCE_S = 2.0  # one IXI-sized volume
TARGET_TRAIN_MEMORY_GB = 4.0  # peak GPU memory of a training iteration, batch 1
TARGET_GRAPHS_SPEEDUP = 2.0  # eager / CUDA-graphs DicycleGAN iteration
# first-iteration losses of a compiled step against the eager step from the same weights and batch, relative:
# fused kernels round differently (and cuDNN may use TF32); bfloat16 keeps 8 bits, a rounding of 2^-8 = 0.4 %
COMPILED_LOSS_TOLERANCE = {"fp32": 1e-2, "AMP": 5e-2}
EQUALITY_TOLERANCE = 1e-4  # OffsetConv2d backends, relative to the reference's largest magnitude

# every size-dependent setting of the check
SIZES: dict[str, dict[str, Any]] = {
    "paper": {
        "offset_inputs": ((64, 128), (256, 32)),
        "iteration_preset": "paper",
        "iteration_overrides": {},
        "iteration_repeats": 10,
        "phantom": {"subjects": 5, "n_validation": 1, "n_test": 1},
        "training_overrides": {"samples_per_epoch": "200", "num_workers": "4", "cache_workers": "4"},
        "inference_copies": 3,
    },
    "tiny": {
        "offset_inputs": ((4, 16), (8, 8)),
        "iteration_preset": "demo",
        "iteration_overrides": {"ngf": 4, "n_blocks": 1, "d_channels": 4, "spatial_size": [32, 32]},
        "iteration_repeats": 2,
        "phantom": {"subjects": 4, "n_validation": 1, "n_test": 1, "downsample": 4},
        "training_overrides": {
            "ngf": "4",
            "n_blocks": "1",
            "d_channels": "4",
            "spatial_size": "[32,32]",
            "pixdim": "[2,2,2]",
            "samples_per_epoch": "4",
            "num_workers": "0",
            "cache_workers": "1",
        },
        "inference_copies": 2,
    },
}


def _synchronized(step: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``step`` followed by a device synchronisation, so wall time measures the kernels and not their launch."""

    def run() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


@contextlib.contextmanager
def _tf32_disabled() -> Iterator[None]:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _values_and_gradients(layer: OffsetConv2d, x: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Deformed output of a ``dtype`` copy of ``layer``, and its loss's gradients: input, weight, offset-conv weight."""
    layer = copy.deepcopy(layer).to(dtype)
    x = x.detach().to(dtype).requires_grad_(True)
    out = layer(x, deform=True)
    out.square().mean().backward()
    return [out.detach(), x.grad, layer.weight.grad, layer.offset_conv.weight.grad]


def offset_conv(device: torch.device, inputs: tuple[tuple[int, int], ...], repeats: int = 20) -> dict[str, Any]:
    """Pure-PyTorch against torchvision's kernel (values and gradients), and both timed against ``F.conv2d``.

    Args:
        device: device of the layers.
        inputs: (channels, size) of each square input, batch 1, 3x3 kernel, padding 1.
        repeats: timed forward + backward passes per contender (median reported).

    Returns:
        ``{"torchvision": problem or None, "ok", "rows", "lines": Markdown}``.
    """
    problem = torchvision_deform_conv2d_problem(device.type)
    rows, equal = [], True
    for channels, size in inputs:
        torch.manual_seed(0)
        reference = OffsetConv2d(channels, channels, 3, padding=1, backend="torch").to(device)
        with torch.no_grad():  # offsets of about a pixel, so the taps land between pixels and outside the image
            reference.offset_conv.weight.normal_(0, 0.5 / math.sqrt(9 * channels))
        x = torch.randn(1, channels, size, size, device=device, requires_grad=True)
        contenders = {"torch": reference}
        if problem is None:
            fused = OffsetConv2d(channels, channels, 3, padding=1, backend="torchvision").to(device)
            fused.load_state_dict(reference.state_dict())
            contenders["torchvision"] = fused

        # the equality check compares the backends' arithmetic, so TF32 (cuDNN's default for fp32 convolutions,
        # used by the offset convolution) is off while it runs; float64 tells rounding from a real disagreement
        differences = {}
        for dtype in (torch.float32, torch.float64) if "torchvision" in contenders else ():
            with _tf32_disabled():
                outputs = [_values_and_gradients(layer, x, dtype) for layer in contenders.values()]
            differences[dtype] = [
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(*outputs, strict=True)
            ]
        if differences:
            equal &= max(differences[torch.float32]) <= EQUALITY_TOLERANCE

        plain = backward_step(lambda: F.conv2d(x, reference.weight, reference.bias, padding=1), reference.parameters())
        deformed = {name: forward_backward(layer, x, deform=True) for name, layer in contenders.items()}
        steps = {name: _synchronized(step, device) for name, step in {"plain": plain, **deformed}.items()}
        ms = {name: 1e3 * seconds for name, seconds in median_seconds(steps, repeats).items()}
        rows.append(
            {
                "input": f"{channels}x{size}x{size}",
                "fp32": differences.get(torch.float32, [float("nan")] * 4),
                "fp64": differences.get(torch.float64, [float("nan")] * 4),
                "plain_ms": ms["plain"],
                "torch_ms": ms["torch"],
                "torchvision_ms": ms.get("torchvision", float("nan")),
            }
        )
    lines = [
        "## 1. OffsetConv2d: pure PyTorch against torchvision's deform_conv2d",
        "",
        f"torchvision's kernel on {device.type}: "
        + ("runs" if problem is None else f"does not run ({problem}); only the pure-PyTorch path is timed"),
        "",
        *_table(
            "input (C x H x W)|max rel. difference fp32: output / grad x / grad weight / grad offset-conv weight|"
            "same in float64|plain conv ms|torch path ms|x plain|torchvision ms|x plain".split("|"),
            [
                [r["input"], *(" / ".join(f"{d:.1e}" for d in r[p]) for p in ("fp32", "fp64")), r["plain_ms"]]
                + [v for k in ("torch_ms", "torchvision_ms") for v in (r[k], r[k] / r["plain_ms"])]
                for r in rows
            ],
        ),
        "",
        f"Forward + backward, batch 1, 3x3, median of {repeats}. Equality target: max |difference| <= "
        f"{EQUALITY_TOLERANCE:g} of the reference's largest magnitude: "
        + (verdict_text(equal) if problem is None else "not checked (torchvision does not run)"),
    ]
    return {"torchvision": problem, "ok": equal, "rows": rows, "lines": lines}


def iterations(device: torch.device, preset: str, overrides: Mapping[str, Any], repeats: int) -> dict[str, Any]:
    """Training iterations of both modes in fp32 and AMP, built from the bundle's configs.

    Args:
        device: training device.
        preset: ``scripts/benchmark.py`` size preset (``"paper"`` or ``"demo"``).
        overrides: further config values.
        repeats: timed iterations per run (median, round-robin over the four runs).

    Returns:
        ``{"seconds": {run: s}, "peak_gb": {run: GB}, "ok": all losses finite, ..., "lines": Markdown}``.
    """
    runs = {
        f"{mode} {'AMP' if amp else 'fp32'}": Iteration(preset, mode, {**overrides, "device": str(device), "amp": amp})
        for mode in ("CycleGAN", "DicycleGAN")
        for amp in (False, True)
    }
    peak_gb: dict[str, float] = {}
    finite = True
    for name, run in runs.items():  # one at a time: its own peak memory, and every loss of a real step checked
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        output = run.trainer._iteration(run.trainer, run.batch)[0]
        finite &= all(bool(torch.isfinite(value)) for value in output["losses"].values())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak_gb[name] = torch.cuda.max_memory_allocated(device) / 1e9
    seconds = median_seconds(dict(runs), repeats, warmup=2)
    description = runs["DicycleGAN fp32"].description
    mode_ratio = {amp: seconds[f"DicycleGAN {amp}"] / seconds[f"CycleGAN {amp}"] for amp in ("fp32", "AMP")}
    amp_speedup = seconds["DicycleGAN fp32"] / seconds["DicycleGAN AMP"]
    rows = [
        [name, s, 1.0 / s, s / seconds[name.replace("DicycleGAN", "CycleGAN")], peak_gb.get(name, "n/a (CPU)")]
        for name, s in seconds.items()
    ]
    peak = max(peak_gb.values()) if peak_gb else float("nan")
    # batch 1 is bound by kernel launches on a GPU: batch 8 shows what AMP buys once arithmetic dominates
    batch8 = {**overrides, "device": str(device), "batch_size": 8}
    larger = {amp: Iteration(preset, "DicycleGAN", {**batch8, "amp": amp == "AMP"}) for amp in ("fp32", "AMP")}
    larger_seconds = median_seconds(dict(larger), repeats, warmup=2)
    larger_speedup = larger_seconds["fp32"] / larger_seconds["AMP"]
    lines = [
        f"## 2. Training iterations ({description})",
        "",
        *_table(["run", "s/iteration", "iterations/s", "x CycleGAN (same precision)", "peak GPU memory GB"], rows),
        "",
        f"Median of {repeats}, round-robin, after 2 warm-up iterations each; AMP is bfloat16 autocast. "
        f"All losses of a step of every run finite: {finite}.",
        "",
        f"- DicycleGAN / CycleGAN: fp32 {mode_ratio['fp32']:.2f}x, AMP {mode_ratio['AMP']:.2f}x "
        f"(target <= {TARGET_MODE_RATIO}x: {verdict_text(max(mode_ratio.values()) <= TARGET_MODE_RATIO)})",
        f"- AMP speed-up of DicycleGAN: {amp_speedup:.2f}x (target >= {TARGET_AMP_SPEEDUP}x: "
        f"{verdict_text(amp_speedup >= TARGET_AMP_SPEEDUP)})",
        f"- peak GPU memory: {peak:.2f} GB (target < {TARGET_TRAIN_MEMORY_GB} GB: "
        + (verdict_text(peak < TARGET_TRAIN_MEMORY_GB) if peak_gb else "not measured on CPU")
        + ")",
        f"- DicycleGAN at batch 8 (not the paper's batch 1): fp32 {larger_seconds['fp32']:.3f} s, AMP "
        f"{larger_seconds['AMP']:.3f} s per iteration, AMP speed-up {larger_speedup:.2f}x",
    ]
    ratios = {"mode_ratio": mode_ratio, "amp_speedup": amp_speedup, "amp_speedup_batch8": larger_speedup}
    return {"seconds": seconds, "peak_gb": peak_gb, "ok": finite, **ratios, "lines": lines}


def _bundle_args(config_files: list[str], overrides: Mapping[str, str]) -> list[str]:
    """``monai.bundle run`` arguments of the config files with ``--key value`` per override."""
    files = "[" + ",".join(f"'{ROOT / 'configs' / f}'" for f in config_files) + "]"
    args = ["-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(ROOT)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


def _run(args: list[str], log: Path, timeout: float = 600) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        completed = subprocess.run(
            args, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    return completed.returncode, time.perf_counter() - start


def _tail(log: Path, lines: int = 6) -> str:
    """The root error of a failed run (MONAI re-raises it as "Failed to evaluate ...") and the end of its log."""
    text = log.read_text(errors="replace", encoding="utf-8").splitlines() if log.is_file() else ["(no log)"]
    errors = [line for line in text if line[:1].isalpha() and ("Error:" in line or "Exception:" in line)]
    return "\n".join([*errors[:1], "...", *text[-lines:]] if errors else text[-lines:])


def _digests(folder: Path) -> dict[str, tuple[str, int]]:
    """md5 and modification time of each model file: a rewrite with equal bytes counts as touched too."""
    files = sorted(folder.glob("*.pt"))
    return {p.name: (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def _one_epoch(dataset_dir: Path, models: Path, runs: Path, **settings: str) -> dict[str, str]:
    """Command-line settings of a training whose first phase is one epoch."""
    paths = {"dataset_dir": dataset_dir, "ckpt_dir": models, "output_dir": runs}
    return {**{key: str(path) for key, path in paths.items()}, "n_epochs": "1", **settings}


def _checkpoint_epoch(path: Path) -> int:
    """The epoch of a resume checkpoint, 0 when there is none."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)["trainer"]  # Ignite keeps iterations, not epochs
    return int(state["iteration"]) // int(state["epoch_length"])


def bundle_training(dataset_dir: Path, work: Path, overrides: Mapping[str, str]) -> dict[str, Any]:
    """A 2-epoch training with ``--amp true`` through ``monai.bundle``, killed once its first checkpoint exists,
    resumed to the end, then resumed once more (a finished run must change no file).

    Args:
        dataset_dir: folder with ``datalist.json``.
        work: scratch folder (``models/`` and ``logs/`` go under it).
        overrides: size settings.

    Returns:
        ``{"ok", "lines": Markdown}``.
    """
    models, logs = work / "models", work / "logs"
    settings = _one_epoch(dataset_dir, models, work / "runs", n_epochs_decay="1", val_interval="1", amp="true")
    args = [sys.executable, *_bundle_args(["train.json"], {**settings, **overrides})]
    checkpoint = models / "checkpoint.pt"

    # first run: SIGKILL as soon as the first checkpoint is complete (it is written by an atomic rename)
    start = time.perf_counter()
    with (logs / "train_interrupted.log").open("w", encoding="utf-8") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None and not checkpoint.exists():
            time.sleep(0.2)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        first_rc = process.wait()
    first_s = time.perf_counter() - start
    first_epoch = _checkpoint_epoch(checkpoint)

    resumed_rc, resumed_s = _run([*args, "--resume", "true"], logs / "train_resumed.log")
    resumed_epoch = _checkpoint_epoch(checkpoint)
    before = _digests(models)
    again_rc, again_s = _run([*args, "--resume", "true"], logs / "train_resumed_again.log")
    unchanged = before == _digests(models) and bool(before)
    ok = resumed_rc == 0 and again_rc == 0 and resumed_epoch == 2 and unchanged
    lines = [
        "## 3. Training through `monai.bundle` with `--amp true`, interrupted and resumed",
        "",
        *_table(
            ["run", "return code", "wall s", "checkpoint epoch after"],
            [
                ["2-epoch training, SIGKILL after its first checkpoint", first_rc, first_s, first_epoch],
                ["`--resume true`", resumed_rc, resumed_s, resumed_epoch],
                ["`--resume true` on the finished run", again_rc, again_s, _checkpoint_epoch(checkpoint)],
            ],
        ),
        "",
        f"Files in the model folder unchanged by the last resume: {unchanged}. Verdict: {verdict_text(ok)}",
    ]
    if not ok:
        for name in ("train_interrupted", "train_resumed", "train_resumed_again"):
            lines += ["", f"Last lines of {name}.log:", "", "```", _tail(logs / f"{name}.log"), "```"]
    return {"ok": ok, "lines": lines}


def inference(models: Path, source: Path, work: Path, copies: int) -> dict[str, Any]:
    """Seconds per volume of ``configs/inference.json``'s workflow, in process, over ``copies`` copies of one volume;
    the networks are rebuilt from the settings training wrote beside the weights.

    Args:
        models: folder of the trained models (``--ckpt_dir``).
        source: the volume (IXI-sized at paper size).
        work: scratch folder.
        copies: how many copies are synthesized; the first is a warm-up, the median of the others is reported.

    Returns:
        ``{"seconds": median s per volume, "ok", "lines": Markdown}``.
    """
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    inputs, outputs = work / "inference_in", work / "inference_out"
    inputs.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        shutil.copy(source, inputs / f"volume{i}_PD.nii.gz")
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update(
        {"bundle_root": str(ROOT), "ckpt_dir": str(models), "input_dir": str(inputs), "output_dir": str(outputs)}
    )
    parser.get_parsed_content("imports")
    for step in range(len(parser["run"]) - 1):  # the setup steps before the evaluator runs
        parser.get_parsed_content(f"run#{step}")
    evaluator = parser.get_parsed_content("evaluator")
    stamps = [time.perf_counter()]
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
    evaluator.run()
    per_volume = [b - a for a, b in itertools.pairwise(stamps)]
    written = sorted(p.name for p in outputs.glob("*.nii*"))
    seconds = statistics.median(per_volume[1:] if len(per_volume) > 1 else per_volume)
    shape = tuple(int(n) for n in __import__("nibabel").load(source).shape)
    ok = len(written) == copies
    lines = [
        "## 4. Inference through `configs/inference.json`",
        "",
        f"{copies} copies of a {shape[0]} x {shape[1]} x {shape[2]} volume; per volume (load, preprocess, "
        f"slice-wise aligned pass, invert, save): {', '.join(f'{s:.2f} s' for s in per_volume)}; the first is a "
        f"warm-up. Outputs written: {len(written)} of {copies}.",
        "",
        f"- seconds per volume (median after warm-up): {seconds:.2f} s (target < {TARGET_INFERENCE_S} s for an "
        f"IXI-sized volume: {verdict_text(seconds < TARGET_INFERENCE_S and ok)})",
    ]
    return {"seconds": seconds, "ok": ok, "lines": lines}


def ddp(dataset_dir: Path, work: Path, overrides: Mapping[str, str]) -> dict[str, Any]:
    """One epoch of ``configs/multi_gpu_train.json`` under ``torchrun``, world size 1; ``{"ok", "lines"}``.

    Args:
        dataset_dir: folder with ``datalist.json``.
        work: scratch folder.
        overrides: size settings.
    """
    models = work / "ddp_models"
    settings = {**_one_epoch(dataset_dir, models, work / "ddp_runs", n_epochs_decay="0"), **overrides}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    args = [*torchrun, *_bundle_args(["train.json", "multi_gpu_train.json"], settings)]
    log = work / "logs" / "ddp.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    rc, seconds = _run(args, log)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    ok = rc == 0 and (models / "model.pt").is_file()
    lines = [
        "## 5. DistributedDataParallel (`configs/multi_gpu_train.json`, torchrun, world size 1)",
        "",
        f"Backend {backend}: return code {rc}, {seconds:.1f} s, models/model.pt written: "
        f"{(models / 'model.pt').is_file()}. Verdict: {verdict_text(ok)}",
    ]
    if not ok:
        lines += ["", "```", _tail(log), "```"]
    return {"ok": ok, "lines": lines}


def compiled(device: torch.device, preset: str, overrides: Mapping[str, Any], repeats: int) -> dict[str, Any]:
    """Eager, compiled and (CUDA) CUDA-graph DicycleGAN iterations, fp32 and AMP, batch 1 and 8.

    Args:
        device: training device.
        preset: ``scripts/benchmark.py`` size preset.
        overrides: further config values.
        repeats: timed iterations per contender (median, round-robin within each precision and batch).

    Returns:
        ``{"seconds": {run: s}, "compile_s": {run: s}, "loss_difference": {run: relative}, "ok": bool, "lines": ...}``.
    """
    cuda = device.type == "cuda"
    # on a CPU only the code path is exercised (inductor's C++ build takes minutes on 2 cores)
    backend = {} if cuda else {"compile_backend": "aot_eager"}
    variants = {"eager": {}, "compiled": {"compile": True}, **({"graphs": {"cuda_graphs": True}} if cuda else {})}
    cases = [(p, b) for p in ("fp32", "AMP") for b in (1, 8)] if cuda else [("fp32", 1)]
    seconds: dict[str, float] = {}
    compile_s: dict[str, float] = {}
    difference: dict[str, float] = {}
    ok = True
    rows = []
    for precision, batch in cases:
        settings = {**overrides, "device": str(device), "amp": precision == "AMP", "batch_size": batch}
        runs = {
            name: Iteration(preset, "DicycleGAN", {**settings, **switches}, trainer_kwargs=backend)
            for name, switches in variants.items()
        }
        first_losses = {}
        for name, run in runs.items():  # the first call compiles; same weights and batch in every run (seed 0)
            start = time.perf_counter()
            first_losses[name] = run.trainer._iteration(run.trainer, run.batch)[0]["losses"]
            if cuda:
                torch.cuda.synchronize(device)
            compile_s[f"{name} {precision} batch {batch}"] = time.perf_counter() - start
        timed = median_seconds(dict(runs), repeats, warmup=2)
        for name in runs:
            key = f"{name} {precision} batch {batch}"
            seconds[key] = timed[name]
            compile_s[key] -= timed[name]
            difference[key] = max(
                float((value - first_losses["eager"][term]).abs() / first_losses["eager"][term].abs().clamp_min(1e-6))
                for term, value in first_losses[name].items()
            )
            finite = all(bool(torch.isfinite(value)) for value in first_losses[name].values())
            ok &= finite and difference[key] <= COMPILED_LOSS_TOLERANCE[precision]
            compared = [compile_s[key], difference[key]] if name != "eager" else ["-", "-"]
            rows.append([key, timed[name], timed["eager"] / timed[name], *compared])
    lines = [
        f"## 6. Compiled training step (DicycleGAN, {runs['eager'].description.split(', batch')[0]})",
        "",
        *_table(["run", "s/iteration", "x faster than eager", "compile s", "max rel. loss difference"], rows),
        "",
        f"Median of {repeats}, round-robin within each precision and batch, after 2 warm-up iterations; compile s: the "
        "first iteration minus a timed one. Loss difference: the first iteration's losses against eager's from the "
        f"same weights and batch (tolerance {COMPILED_LOSS_TOLERANCE['fp32']} fp32, {COMPILED_LOSS_TOLERANCE['AMP']} "
        f"AMP): {verdict_text(ok)}."
        + ("" if cuda else " On this CPU: the aot_eager backend (the code path only), no CUDA graphs."),
    ]
    if cuda:
        speedup = seconds["eager fp32 batch 1"] / seconds["graphs fp32 batch 1"]
        lines += [
            "",
            f"- CUDA graphs speed-up, fp32 batch 1: {speedup:.2f}x (target >= {TARGET_GRAPHS_SPEEDUP}x: "
            f"{verdict_text(speedup >= TARGET_GRAPHS_SPEEDUP)})",
        ]
    return {"seconds": seconds, "compile_s": compile_s, "loss_difference": difference, "ok": ok, "lines": lines}


def _phantom(work: Path, options: Mapping[str, Any]) -> Path:
    dataset = work / "phantom"
    args = [sys.executable, "-m", "scripts.make_demo_data", "--output_dir", str(dataset)]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    rc, _ = _run(args, work / "logs" / "phantom.log")
    if rc != 0:
        raise RuntimeError(f"building the phantom failed (rc {rc}):\n{_tail(work / 'logs' / 'phantom.log')}")
    return dataset


def _source_volume(dataset_dir: Path) -> Path:
    datalist = json.loads((dataset_dir / "datalist.json").read_text(encoding="utf-8"))
    entries = datalist.get("test") or datalist.get("validation") or []
    relative = entries[0]["A"] if entries else datalist["training_A"][0]["image"]
    return dataset_dir / relative


def run_check(
    output: str = "gpu_check.md", size: str | None = None, dataset_dir: str | None = None, work_dir: str | None = None
) -> dict[str, Any]:
    """Run all six checks and write the report.

    Args:
        output: Markdown report to write (an existing file is replaced: it is this script's own output).
        size: ``"paper"`` (default on CUDA) or ``"tiny"`` (default on CPU).
        dataset_dir: a dataset folder with ``datalist.json`` (default: a phantom built into the work folder).
        work_dir: scratch folder (default: a temporary folder, removed at the end).

    Returns:
        The figures of every section and ``"ok"``: every check ran and every correctness check held (speed and
        memory targets are reported, not enforced).

    Raises:
        ValueError: for an unknown ``size``.
    """
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    size = size or ("paper" if device.type == "cuda" else "tiny")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}.")
    preset = SIZES[size]
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="dicyclegan_gpu_check_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    keys = ("offset_conv", "iterations", "training", "inference", "ddp", "compiled")

    def write_report() -> str:
        # written after every section, so a run cut short by a time limit still leaves what it measured
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'n/a'})"
        problem = torchvision_deform_conv2d_problem(device.type)
        results["ok"] = all(results.get(key, {}).get("ok", False) for key in keys)
        status = verdict_text(results["ok"]) if all(key in results for key in keys) else "incomplete"
        header = [
            f"# GPU check: {name}",
            "",
            f"`python -m scripts.gpu_check --size {size}` on {datetime.date.today().isoformat()}: {size} size, "
            f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), torchvision "
            + ("kernel runs" if problem is None else f"kernel not used ({problem})")
            + f", Python {platform.python_version()}; the check took {time.perf_counter() - started:.0f} s. "
            f"All correctness checks: {status}.",
            "",
        ]
        sections = [results[key]["lines"] for key in keys if key in results]
        text = "\n".join(header + [line for lines in sections for line in [*lines, ""]])
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text, encoding="utf-8")
        return text

    def section(key: str, title: str, check: Callable[[], dict[str, Any]]) -> None:
        # a failing section is reported and the others still run: a GPU session may allow a single run
        try:
            results[key] = check()
        except Exception as error:
            while error.__cause__ is not None:  # MONAI's config resolver wraps the root error
                error = error.__cause__
            results[key] = {"ok": False, "lines": [f"## {title}", "", f"FAILED: {type(error).__name__}: {error}"]}
        write_report()
        print(f"[gpu_check] {title}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    try:
        dataset = Path(dataset_dir) if dataset_dir else _phantom(work, preset["phantom"])
        print(f"[gpu_check] {device} ({size} size), data in {dataset} ({time.perf_counter() - started:.0f} s)")
        training = preset["training_overrides"]
        sized = (preset["iteration_preset"], preset["iteration_overrides"], preset["iteration_repeats"])
        section("offset_conv", "1. OffsetConv2d", lambda: offset_conv(device, preset["offset_inputs"]))
        section("iterations", "2. Training iterations", lambda: iterations(device, *sized))
        section("training", "3. Training through monai.bundle", lambda: bundle_training(dataset, work, training))
        copies = preset["inference_copies"]
        section("inference", "4. Inference", lambda: inference(work / "models", _source_volume(dataset), work, copies))
        section("ddp", "5. DistributedDataParallel", lambda: ddp(dataset, work, training))
        section("compiled", "6. Compiled training step", lambda: compiled(device, *sized))
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(write_report())
    return results


def main(
    output: str = "gpu_check.md", size: str | None = None, dataset_dir: str | None = None, work_dir: str | None = None
) -> None:
    """Command line of :func:`run_check` (a given ``work_dir`` is kept); exits 1 when a correctness check failed."""
    if not run_check(output, size, dataset_dir, work_dir)["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
