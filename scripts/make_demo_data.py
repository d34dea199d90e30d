"""Build the offline demo dataset: an MNI152-based multi-contrast brain phantom (PD, T2, T1, CT) and its datalists.

Usage (from the repository root)::

    python -m scripts.make_demo_data --output_dir demo_data [--subjects 12] [--seed 0]

Writes ``DIR/phantomNNN/*.nii.gz`` and three datalists (PD <-> T2, PD <-> distorted T2, T1 <-> CT), then prints the
elapsed time and the peak memory. The physics and sources are in ``scripts/tooling/phantom.py``.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fire
from scripts.tooling.phantom import write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]

DEFAULT_OUTPUT_DIR = str(REPO / "demo_data")  # git-ignored


class PeakMemory:
    """Peak memory (MB) of this process and its workers together, sampled every ``interval_s``: the sum of their
    ``Pss`` (``/proc/PID/smaps_rollup``) on Linux, else this process's peak resident size."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss_mb(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as smaps:
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


def main(output_dir: str = DEFAULT_OUTPUT_DIR, **options: Any) -> None:
    """Build the phantom dataset in ``output_dir``, then print the elapsed time and the peak memory.

    Args:
        output_dir: dataset folder to write (default: ``demo_data/`` at the repository root).
        options: the other arguments of :func:`scripts.tooling.phantom.write_phantom_dataset` (``--help`` lists them
            with their defaults), e.g. ``--force`` to rebuild a folder that holds the same dataset.
    """
    start = time.perf_counter()
    with PeakMemory() as memory:
        result = write_phantom_dataset(output_dir=output_dir, **options)
    print(
        f"done in {time.perf_counter() - start:.1f} s, peak memory {memory.peak_mb:.0f} MB (all processes); "
        f"datalists in {result['output_dir']}"
    )


# fire reads this signature: every option of write_phantom_dataset on the command line and in --help (with
# **options alone, fire would pass --help on as an option)
main.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.signature(main).parameters["output_dir"]]
    + [
        parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, parameter in inspect.signature(write_phantom_dataset).parameters.items()
        if name not in ("output_dir", "progress", "model")
    ],
    return_annotation=None,
)

if __name__ == "__main__":
    fire.Fire(main)
