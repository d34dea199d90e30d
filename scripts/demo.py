"""The end-to-end demo: build the phantom data set, train DicycleGAN PD -> T2 on it, evaluate on held-out subjects.

Usage (from the repository root; ``make demo`` runs it)::

    python -m scripts.demo [--dataset_dir demo_data] [--preset configs/demo.json]

Steps, each printed with the command it runs:

1. ``scripts/make_demo_data.py`` builds the MNI152-based phantom (skipped when ``DIR/datalist.json`` exists);
2. ``python -m monai.bundle run`` trains with ``configs/train.json`` and the demo preset
   (small networks, 2.4 mm slices) and writes ``models/model.pt`` (G PD -> T2), ``models/model_g_ba.pt`` and
   TensorBoard logs in ``runs/``;
3. every held-out test subject's PD volume is synthesized into T2 by the bundle's one synthesis path and compared
   with the subject's real T2 (PSNR on the z-scored volumes, as the paper normalises them) against the trivial
   baseline of the z-scored PD itself. The demo fails (exit 1) unless synthesis beats the baseline by ``min_gain_db``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch
from bundle.datalist import load_datalist, synthesis_pair
from bundle.metrics import volume_psnr
from bundle.settings import resolve_settings
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def evaluate(dataset_dir: str, ckpt_dir: str) -> list[dict]:
    """PSNR of synthesis and of the baseline (the normalised source) for every test subject, through
    ``configs/inference.json``'s ``synthesis`` rebuilt from ``ckpt_dir/settings.json`` (so any preset works)."""
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), "ckpt_dir": ckpt_dir})
    synthesis, settings = parser.get_parsed_content("synthesis"), parser.get_parsed_content("settings")
    synthesis.network.load_state_dict(torch.load(Path(ckpt_dir) / "model.pt", map_location="cpu", weights_only=True))
    target_preprocessing = parser.get_parsed_content("preprocessing")("image", settings["domain_b"])
    rows = []
    for entry in load_datalist(dataset_dir, "datalist.json", "test"):
        pair = synthesis_pair(entry, "A2B")
        source = synthesis.preprocessing({"image": pair["source"]})["image"].as_tensor()
        target = target_preprocessing({"image": pair["ground_truth"]})["image"].as_tensor()
        synthesized = synthesis.synthesize(source).cpu()
        subject = entry.get("subject", Path(pair["source"]).name)
        synthesis_db, baseline = volume_psnr(torch.stack([synthesized, source]), torch.stack([target, target])).tolist()
        rows.append({"subject": subject, "synthesis": synthesis_db, "baseline": baseline})
    return rows


def main(
    dataset_dir: str = "demo_data", preset: str = "configs/demo.json", seed: int = 0, min_gain_db: float = 3.0
) -> None:
    """Build the data if needed, train, evaluate.

    Args:
        dataset_dir: where the phantom data set is (or is written).
        preset: override file for ``configs/train.json``.
        seed: seed of the data set and of training.
        min_gain_db: required mean PSNR gain of synthesis over the baseline.
    """
    start = time.perf_counter()
    python = sys.executable
    if not (ROOT / dataset_dir / "datalist.json").exists():
        _run([python, "-m", "scripts.make_demo_data", "--output_dir", dataset_dir, "--seed", str(seed)])
    options = ["--config_file", f"['configs/train.json','{preset}']", "--dataset_dir", dataset_dir, "--seed", str(seed)]
    _run([python, "-m", "monai.bundle", "run", *options])
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / preset)])
    parser["bundle_root"] = str(ROOT)
    ckpt_dir = parser.get_parsed_content("ckpt_dir")
    rows = evaluate(str(ROOT / dataset_dir), ckpt_dir)
    names = resolve_settings(ckpt_dir)
    print(f"\n{names['name_a']} -> {names['name_b']} on held-out phantom subjects (PSNR in dB, normalised volumes):")
    print(f"{'subject':>12} | {'synthesis':>9} | {'baseline: source itself':>23} | {'gain':>5}")
    for row in rows:
        gain = row["synthesis"] - row["baseline"]
        print(f"{row['subject']:>12} | {row['synthesis']:9.2f} | {row['baseline']:23.2f} | {gain:5.2f}")
    mean_gain = float(np.mean([row["synthesis"] - row["baseline"] for row in rows]))
    print(f"mean gain {mean_gain:.2f} dB; demo finished in {time.perf_counter() - start:.0f} s")
    if mean_gain < min_gain_db:
        print(f"FAILED: synthesis beats the baseline by less than {min_gain_db} dB")
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
