"""scripts/alignment_terms.py: the remap it builds, the terms it reports and its refusal of a missing run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scripts import alignment_terms
from scripts.tooling.study import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore")


def test_monotone_remap_is_a_non_decreasing_map_with_the_references_histogram() -> None:
    rng = np.random.default_rng(0)
    source, reference = rng.normal(size=(12, 10)), rng.uniform(-1, 1, size=(12, 10))
    mask = np.zeros((12, 10), dtype=bool)
    mask[2:10, 1:9] = True
    remapped = alignment_terms.monotone_remap(source, reference, mask)
    np.testing.assert_array_equal(np.sort(remapped[mask]), np.sort(reference[mask]))
    order = np.argsort(source[mask])
    assert np.all(np.diff(remapped[mask][order]) >= 0)
    assert np.all(remapped[~mask] == pytest.approx(reference[~mask].mean()))
    with pytest.raises(ValueError, match="shapes differ"):
        alignment_terms.monotone_remap(source, reference[:5], mask)


def test_terms_on_the_phantom_score_the_t1_best_and_say_which_prefer_the_true_ct(phantom: Path, tmp_path) -> None:
    pixdim = PRESETS["smoke"].pixdim()
    rows = alignment_terms.measure(phantom, pixdim)
    n_test = PRESETS["smoke"].data["n_test"]
    assert len(rows) == 3 * n_test
    for subject in {r["subject"] for r in rows}:  # every term is best against the image itself
        itself, *others = sorted(
            (r for r in rows if r["subject"] == subject), key=lambda r: r["candidate"] != "T1 itself"
        )
        assert itself["candidate"] == "T1 itself" and itself["MIND"] == 0.0 and itself["MIND-SSC"] == 0.0
        for other in others:
            assert other["NMI"] < itself["NMI"] and other["local NMI"] < itself["local NMI"]
            assert other["MIND"] > 0.0 and other["MIND-SSC"] > 0.0
    text = alignment_terms.table(rows)
    assert text.count("\n") == 2 + 3 and "| prefers (a) to (b) |" in text
    verdicts = text.splitlines()[-1].split(" | ")[1:]
    true_ct = {t: np.mean([r[t] for r in rows if r["candidate"] == "(a) true CT"]) for t in alignment_terms.TERMS}
    remap = {t: np.mean([r[t] for r in rows if r["candidate"] == "(b) remapped T1"]) for t in alignment_terms.TERMS}
    for (term, (_, higher)), verdict in zip(alignment_terms.TERMS.items(), verdicts, strict=True):
        prefers = true_ct[term] > remap[term] if higher else true_ct[term] < remap[term]
        assert verdict.strip(" |") == ("yes" if prefers else "no")


def test_a_missing_cyclegan_run_is_named(phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.pt: no trained CycleGAN in --cyclegan_run"):
        alignment_terms.main(
            output_dir=str(tmp_path), preset="smoke", dataset_dir=str(phantom), cyclegan_run=str(tmp_path / "none")
        )
