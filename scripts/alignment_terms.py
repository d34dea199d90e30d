"""Which alignment term tells a CT from a remapped MR? Each term between a T1 and candidate pseudo-CTs, before training.

Usage (from the repository root)::

    python -m scripts.alignment_terms --output_dir study_terms                       # builds the cpu phantom
    python -m scripts.alignment_terms --output_dir study_pct --cyclegan_run study_pct/runs/mr_ct_CycleGAN

On axial slices through the head of every test subject of ``datalist_mr_ct.json``, preprocessed as training does,
each term between the T1 and: the T1 itself (a reference); (a) its true CT; (b) the T1 histogram-matched to the CT
inside the head (the scalp-ring failure of unpaired training); (c) an unpaired CycleGAN's synthesis
(``--cyclegan_run``). Terms: NMI and local NMI (higher is more alike), MIND and MIND-SSC distances (lower is more
alike). A term is worth training only if it prefers (a) to (b) and (c).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from bundle.data import volume_preprocessing
from bundle.datalist import load_datalist
from bundle.losses import local_normalized_mutual_information, normalized_mutual_information
from bundle.mind import mind_distance
from bundle.pairing import mask_preprocessing
from monai.bundle import ConfigParser
from scripts.tooling.report import command_line, publish
from scripts.tooling.study import EXPERIMENTS, Run, evaluation_parser, log, prepare_data, select_preset

__all__ = ["CANDIDATES", "TERMS", "axial_slices", "measure", "monotone_remap", "terms", "trained_synthesis"]

SECTION = "alignment-terms"
CANDIDATES = ("T1 itself", "(a) true CT", "(b) remapped T1", "(c) CycleGAN")
# name -> (the term on slices (N, 1, H, W) in a mask, True where higher means more alike)
TERMS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "NMI": (lambda a, b, mask: normalized_mutual_information(a, b, mask=mask), True),
    "local NMI": (lambda a, b, mask: local_normalized_mutual_information(a, b, 16), True),
    "MIND": (lambda a, b, mask: mind_distance(a, b, "mind", mask), False),
    "MIND-SSC": (lambda a, b, mask: mind_distance(a, b, "mind_ssc", mask), False),
}


def monotone_remap(source: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``source`` histogram-matched to ``reference`` inside the boolean ``mask``: the k-th smallest source value
    takes the k-th smallest reference value; outside, the reference's mean there (its minimum if nothing is outside).

    Raises:
        ValueError: if the three shapes differ.
    """
    if source.shape != reference.shape or source.shape != mask.shape:
        raise ValueError(f"shapes differ: {source.shape}, {reference.shape}, {mask.shape}.")
    outside = reference[~mask]
    out = np.full(source.shape, float(outside.mean()) if outside.size else float(reference.min()), dtype=np.float64)
    values = np.empty(int(mask.sum()))
    values[np.argsort(source[mask], kind="stable")] = np.sort(reference[mask])
    out[mask] = values
    return out


def terms(source: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Every term of :data:`TERMS` between ``source`` and ``candidate`` slices (N, 1, H, W), mean over the slices."""
    with torch.no_grad():
        return {name: float(term(source, candidate, mask).mean()) for name, (term, _) in TERMS.items()}


def axial_slices(mask: np.ndarray, count: int = 5) -> list[int]:
    """``count`` axial indices evenly spread over the middle half of the mask's extent."""
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    low, high = z[0] + (z[-1] - z[0]) // 4, z[-1] - (z[-1] - z[0]) // 4
    return sorted({round(float(v)) for v in np.linspace(low, high, count)})


def _test_volumes(
    data_dir: Path, pixdim: list[float], synthesize: Callable[[torch.Tensor], torch.Tensor] | None
) -> Iterator[tuple[str, dict[str, np.ndarray], np.ndarray]]:
    """Per test subject: its name, the candidates (T1 and CTs on the training scales) and the head mask."""
    mr, ct = volume_preprocessing("image", "MR", pixdim), volume_preprocessing("image", "CT", pixdim)
    masks = mask_preprocessing("image", pixdim)
    for entry in load_datalist(data_dir, "datalist_mr_ct.json", "test"):
        t1 = mr({"image": entry["A"]})["image"]
        true_ct = ct({"image": entry["B"]})["image"][0].numpy()
        mask = masks({"image": entry["mask"]})["image"][0].numpy() > 0
        source = t1[0].numpy()
        volumes = dict(zip(CANDIDATES[:3], (source, true_ct, monotone_remap(source, true_ct, mask)), strict=True))
        if synthesize is not None:
            with torch.no_grad():
                volumes[CANDIDATES[3]] = synthesize(t1)[0].float().cpu().numpy()
        yield Path(entry["A"]).name.split(".")[0], volumes, mask


def measure(
    data_dir: Path, pixdim: list[float], synthesize: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> list[dict[str, Any]]:
    """The terms between each test subject's T1 and every candidate on :func:`axial_slices` of its head: a row
    ``{"subject", "candidate", <term>: value}`` per subject and candidate."""
    rows = []
    for subject, volumes, mask in _test_volumes(data_dir, pixdim, synthesize):
        z = axial_slices(mask)
        stack = {
            name: torch.from_numpy(np.stack([v[..., k] for k in z])[:, None]).float() for name, v in volumes.items()
        }
        region = torch.from_numpy(np.stack([mask[..., k] for k in z])[:, None])
        for name, slices in stack.items():
            rows.append({"subject": subject, "candidate": name, **terms(stack[CANDIDATES[0]], slices, region)})
        log(f"{subject}: measured on slices {z}")
    return rows


def table(rows: list[Mapping[str, Any]]) -> str:
    """Markdown: mean (sd) over the subjects per candidate and term, and whether the term prefers (a)."""
    candidates = [c for c in CANDIDATES if any(r["candidate"] == c for r in rows)]
    means = {(c, t): [float(r[t]) for r in rows if r["candidate"] == c] for c in candidates for t in TERMS}
    header = " | ".join(f"{t} ({'higher' if up else 'lower'} = alike)" for t, (_, up) in TERMS.items())
    lines = [f"| candidate | {header} |", "| --- |" + " ---: |" * len(TERMS)]
    for c in candidates:
        cells = [f"{statistics.fmean(v):.3f} ({statistics.pstdev(v):.3f})" for v in (means[c, t] for t in TERMS)]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    verdict = []
    for t, (_, up) in TERMS.items():
        truth = statistics.fmean(means[CANDIDATES[1], t])
        others = [statistics.fmean(means[c, t]) for c in candidates[2:]]
        verdict.append("yes" if all((truth > o) if up else (truth < o) for o in others) else "no")
    lines.append(
        "| prefers (a) to " + " and ".join(c.split(" ")[0] for c in candidates[2:]) + " | " + " | ".join(verdict) + " |"
    )
    return "\n".join(lines)


def trained_synthesis(parser: ConfigParser) -> Callable[[torch.Tensor], torch.Tensor]:
    """The T1 -> CT synthesis of a run's evaluation parser (:func:`scripts.tooling.study.evaluation_parser`), its
    trained weights loaded."""
    parser.get_parsed_content("A2B#loader")(parser.get_parsed_content("A2B#evaluator"))
    return parser.get_parsed_content("A2B#synthesis").synthesize


def main(
    output_dir: str = "study_terms",
    preset: str = "cpu",
    dataset_dir: str | None = None,
    cyclegan_run: str | None = None,
    publish_dir: str | None = None,
) -> str:
    """Measure every term (module docstring), write ``OUTPUT_DIR/alignment_terms.md`` and return its path.

    Args:
        output_dir: where the phantom (unless ``dataset_dir``) and the table go.
        preset: a preset of :data:`scripts.tooling.study.PRESETS`: the phantom and the voxel size.
        dataset_dir: an existing phantom folder instead of building ``OUTPUT_DIR/data``.
        cyclegan_run: a CycleGAN run folder (``runs/<run>`` with ``models/``) trained on T1 -> CT: adds (c).
        publish_dir: also put the section into ``PUBLISH_DIR/results.md``.

    Raises:
        FileNotFoundError: if ``cyclegan_run`` holds no ``models/model.pt``.
    """
    start = time.perf_counter()
    settings = select_preset(preset)
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    data_dir, _ = prepare_data(output, settings, dataset_dir, seed=0)
    synthesize = None
    if cyclegan_run:
        run_dir = Path(cyclegan_run).resolve()
        if not (run_dir / "models" / "model.pt").is_file():
            raise FileNotFoundError(f"{run_dir / 'models' / 'model.pt'}: no trained CycleGAN in --cyclegan_run.")
        synthesize = trained_synthesis(
            evaluation_parser(Run(run_dir.name, EXPERIMENTS["mr_ct"], "Cycle"), settings, data_dir, run_dir)
        )
    rows = measure(data_dir, settings.pixdim(), synthesize)
    command = command_line(
        "scripts.alignment_terms",
        {"output_dir": output_dir, "preset": preset, "dataset_dir": dataset_dir, "cyclegan_run": cyclegan_run},
    )
    subjects = sorted({r["subject"] for r in rows})
    text = "\n\n".join(
        [
            "## Alignment terms: which one tells a CT from a remapped T1?",
            f"```bash\n{command}\n```",
            f"Preset `{preset}` ({settings.pixdim()} mm voxels); {len(subjects)} test subjects, 5 axial slices through "
            "the middle half of each head, inside the head mask (NMI, MIND, MIND-SSC; local NMI on the whole slice); "
            f"mean (sd) over the subjects; {time.perf_counter() - start:.0f} s.",
            table(rows) + "\n",
        ]
    )
    path = output / "alignment_terms.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    if publish_dir:
        publish(publish_dir, text, [], section=SECTION)
    return str(path)


if __name__ == "__main__":
    fire.Fire(main)
