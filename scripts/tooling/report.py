"""What a study writes: the Fig. 4 panel of its runs, table cells, its command line and its results.md section."""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bundle.reports import display_range, mean_sd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.bundle import ConfigParser
from scripts.tooling.study import Experiment, log

__all__ = [
    "column_cell",
    "command_line",
    "comparison_figure",
    "marked_sections",
    "mean_of",
    "publish",
    "publish_section",
]


def comparison_figure(
    path: Path,
    experiment: Experiment,
    parsers: Mapping[str, ConfigParser],
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """Write the paper's Fig. 4 for one experiment to ``path`` and return it: per direction, the source, the ground
    truth and each method's synthesis in a row, their absolute errors below, on the middle axial slice of the first
    test subject's mask, whose outline is drawn on every panel.

    Args:
        path: the PNG to write.
        experiment: the experiment the runs belong to.
        parsers: evaluation parsers (:class:`scripts.tooling.study.StudyRuns`) by method, in column order.
        labels: column titles by method (default: the method names, CycleGAN and DicycleGAN spelled out).
        title: the figure's title (default: the experiment's table and title).
    """
    labels = {"Cycle": "CycleGAN", "Dicycle": "DicycleGAN", **(labels or {})}
    first = next(iter(parsers.values()))
    cases = first.get_parsed_content("cases")
    directions = list(dict.fromkeys(case["direction"] for case in cases))
    first_subject = cases[0]["subject"]
    columns = 2 + len(parsers)
    figure = Figure(figsize=(3.0 * columns, 6.0 * len(directions)), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 * len(directions), columns, squeeze=False)
    for index, direction in enumerate(directions):
        predictions = {}
        for method, parser in parsers.items():  # the evaluator's first item, synthesized by its Synthesis
            evaluator = parser.get_parsed_content(f"{direction}#evaluator")
            parser.get_parsed_content(f"{direction}#loader")(evaluator)
            item = evaluator.data_loader.dataset[0]
            prediction = parser.get_parsed_content(f"{direction}#synthesis").synthesize(item["image"])
            predictions[method] = prediction[0].cpu().numpy()
        source, target = item["image"], item["label"][0].numpy()
        mask = item["label"][-1].numpy() > 0 if item["masked"] else None
        z_extent = np.nonzero(mask.any(axis=(0, 1)))[0] if mask is not None else [0, target.shape[-1] - 1]
        z = int((z_extent[0] + z_extent[-1]) // 2)

        def axial(volume: np.ndarray, z: int = z) -> np.ndarray:
            return np.rot90(np.asarray(volume, dtype=np.float32)[..., z])

        target_range = display_range(target)
        errors = {method: np.abs(prediction - target) for method, prediction in predictions.items()}
        error_max = max(display_range(error)[1] for error in errors.values())
        images = [
            (f"source ({item['source_name']})", axial(source[0].numpy()), "gray", display_range(source[0].numpy())),
            (f"ground truth ({item['target_name']})", axial(target), "gray", target_range),
            *((labels.get(m, m), axial(p), "gray", target_range) for m, p in predictions.items()),
        ]
        error_panels = [
            None,
            None,
            *((f"|{labels.get(m, m)} - truth|", axial(e), "magma", (0.0, error_max)) for m, e in errors.items()),
        ]
        for row, panels in zip(axes[2 * index : 2 * index + 2], (images, error_panels), strict=True):
            for ax, panel in zip(row, panels, strict=True):
                ax.axis("off")
                if panel is None:
                    continue
                label, image, cmap, (vmin, vmax) = panel
                ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
                if mask is not None:
                    ax.contour(axial(mask), levels=[0.5], colors="cyan", linewidths=0.7)
                ax.set_title(textwrap.fill(label, 28), fontsize=10)  # long variant names wrap
        ax = axes[2 * index][0]
        ax.text(
            -0.08, 0.5, item["experiment"], transform=ax.transAxes, rotation=90, va="center", ha="right", fontsize=11
        )
    figure.suptitle(
        f"{title or f'{experiment.table} analogue, {experiment.title}'}: test subject {first_subject}, axial slice "
        f"{z}; cyan: the ground truth's {experiment.mask}",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return path


def mean_of(rows: Sequence[Mapping[str, Any]], metric: str) -> float:
    """Mean of a metric over rows, NaN (no value, a failed registration) left out; NaN when none is left."""
    values = [v for v in (float(r.get(metric, "nan")) for r in rows) if not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def column_cell(rows: Sequence[Mapping[str, Any]], metric: str, decimals: int) -> str:
    """``mean (sd)`` of a metric over rows, for a Markdown table."""
    return mean_sd([float(row.get(metric, "nan")) for row in rows], decimals)


def command_line(module: str, flags: Mapping[str, Any]) -> str:
    """The published command: ``python -m <module>`` and ``--name value`` for every flag whose value is not None."""
    return " ".join(
        [f"python -m {module}", *(f"--{name} {value}" for name, value in flags.items() if value is not None)]
    )


def marked_sections(text: str) -> list[str]:
    """The ``<!-- name -->`` ... ``<!-- /name -->`` blocks of a results file: other studies' sections."""
    return [match.group(0) for match in re.finditer(r"<!-- ([\w-]+) -->\n.*?\n<!-- /\1 -->", text, flags=re.S)]


def publish_section(path: Path, section: str, text: str) -> None:
    """Replace the text between ``<!-- section -->`` and ``<!-- /section -->`` in ``path`` (appended when absent)."""
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    path.write_text(new, encoding="utf-8")


def publish(publish_dir: str | os.PathLike, text: str, figures: Iterable[Path], section: str | None = None) -> Path:
    """Put a study's text into ``PUBLISH_DIR/results.md`` (returned) and its ``figures`` into ``PUBLISH_DIR/figures``.

    Args:
        publish_dir: e.g. ``docs``.
        text: the study's Markdown.
        figures: its figures.
        section: its marked section (:func:`publish_section`); None: the text replaces the file, the marked
            sections of the other studies kept after it.
    """
    publish_dir = Path(publish_dir)
    (publish_dir / "figures").mkdir(parents=True, exist_ok=True)
    for figure in figures:
        shutil.copy2(figure, publish_dir / "figures" / Path(figure).name)
    published = publish_dir / "results.md"
    if section is not None:
        publish_section(published, section, text)
    else:
        kept = marked_sections(published.read_text(encoding="utf-8")) if published.is_file() else []
        published.write_text(text.rstrip() + "".join(f"\n\n{block}" for block in kept) + "\n", encoding="utf-8")
    log(f"published to {published}")
    return published
