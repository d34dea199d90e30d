"""Build the offline demo dataset: an MNI152-based multi-contrast brain phantom (PD, T2, T1, CT) and its datalists.

Usage (from the repository root)::

    PYTHONPATH=. python scripts/make_demo_data.py --output_dir demo_data [--subjects 12] [--seed 0]

Writes ``DIR/phantomNNN/*.nii.gz`` and three datalists: ``datalist.json`` (PD <-> T2), ``datalist_deformed_t2.json``
(PD <-> T2 under a fixed domain-specific distortion) and ``datalist_mr_ct.json`` (T1 <-> CT with differing scanner
beds). Prints the elapsed time and the peak memory. See ``bundle/phantom.py`` for the physics and the sources.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import threading
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the bundle root, when run without PYTHONPATH


class PeakMemory:
    """Peak memory of this process and its worker processes together, sampled every 0.2 s.

    On Linux it sums the proportional set size (``Pss`` of ``/proc/PID/smaps_rollup``), which splits pages shared
    between processes (the forked head model, the libraries) among them instead of counting them once per
    process as resident sizes do. Elsewhere it falls back to this process's peak resident size.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss_mb(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as smaps:
                return next(int(line.split()[1]) for line in smaps if line.startswith("Pss:")) / 1024
        except (OSError, StopIteration, ValueError):
            return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [os.getpid(), *(child.pid for child in multiprocessing.active_children())]
            self.peak_mb = max(self.peak_mb, sum(self._pss_mb(pid) for pid in pids))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.peak_mb == 0.0:  # no /proc: this process's peak resident size (KiB on Linux, bytes on macOS)
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
                1024**2 if sys.platform == "darwin" else 1024
            )


def main(
    output_dir: str = str(REPO / "demo_data"),
    subjects: int = 12,
    seed: int = 0,
    n_validation: int = 2,
    n_test: int = 2,
    downsample: int = 1,
    snr: float = 30.0,
    bias_field: float = 0.2,
    ct_noise_hu: float = 8.0,
    anatomy_mm: float = 4.0,
    scanner_bed: bool = True,
    distortion_mm: float = 8.0,
    distortion_spacing_mm: float = 40.0,
    distortion_seed: int = 0,
    workers: int | None = None,
    force: bool = False,
) -> None:
    """Build the phantom dataset in ``output_dir`` (default ``demo_data/``, git-ignored).

    Args:
        output_dir: dataset folder to write (default: ``demo_data/`` at the repository root).
        subjects: number of subjects (at least ``n_validation + n_test + 1``).
        seed: seed of anatomy, noise, split and shuffles.
        n_validation: paired validation subjects.
        n_test: paired test subjects.
        downsample: integer factor for a coarser grid over IXI's field of view (1 = 256 x 256 x 130).
        snr: MR signal-to-noise ratio (mean brain signal / noise sd).
        bias_field: peak-to-peak MR bias field amplitude (0.2 = +-10 %).
        ct_noise_hu: CT noise sd in HU.
        anatomy_mm: bound on each component of the anatomical deformation between subjects (mm).
        scanner_bed: add the MR positioning pad and the CT head holder.
        distortion_mm: largest displacement of the T2 domain distortion (mm).
        distortion_spacing_mm: its control-point spacing (mm).
        distortion_seed: its seed.
        workers: worker processes (default one per core, at most 2).
        force: rebuild even if the folder already holds the same dataset.
    """
    start = time.perf_counter()
    from bundle.phantom import write_phantom_dataset

    with PeakMemory() as memory:
        result = write_phantom_dataset(
            output_dir=output_dir,
            subjects=subjects,
            seed=seed,
            n_validation=n_validation,
            n_test=n_test,
            downsample=downsample,
            snr=snr,
            bias_field=bias_field,
            ct_noise_hu=ct_noise_hu,
            anatomy_mm=anatomy_mm,
            scanner_bed=scanner_bed,
            distortion_mm=distortion_mm,
            distortion_spacing_mm=distortion_spacing_mm,
            distortion_seed=distortion_seed,
            workers=workers,
            force=force,
        )
    print(
        f"done in {time.perf_counter() - start:.1f} s, peak memory {memory.peak_mb:.0f} MB (all processes); "
        f"datalists in {result['output_dir']}"
    )


if __name__ == "__main__":
    fire.Fire(main)
