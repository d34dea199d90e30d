"""scripts/pseudo_ct_study.py: the misaligned pairs it builds, the section it publishes, and the study end to end at
a tiny size (smoke preset: tiny phantom and networks; checks the plumbing, not the method)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle.datalist import load_datalist
from scripts import pseudo_ct_study
from scripts.tooling.report import publish, publish_section

pytestmark = pytest.mark.filterwarnings("ignore")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_pairs_are_the_same_subject_misregistered_by_a_distortion_of_their_own(phantom: Path) -> None:
    name, applied = pseudo_ct_study.pairs_datalist(phantom, 10.0, [4.8, 4.8, 4.8])
    pairs = load_datalist(phantom, name, "training_pairs")
    training_a = load_datalist(phantom, "datalist_mr_ct.json", "training_A")
    assert [pair["A"] for pair in pairs] == [entry["image"] for entry in training_a]
    assert applied > 1.0  # mean over the head masks, mm
    fields = []
    for pair in pairs:
        subject = Path(pair["A"]).parent.name
        assert Path(pair["B"]).parent.name == subject and "pairs_CT_10mm" in pair["B"]
        original = nib.load(phantom / subject / f"{subject}_CT.nii.gz")
        moved = nib.load(pair["B"])
        np.testing.assert_allclose(moved.affine, original.affine)  # same grid, other content position
        fields.append(np.asarray(moved.dataobj) - np.asarray(original.dataobj))
        assert np.abs(fields[-1]).max() > 100  # HU: bone and air moved
    assert not np.allclose(fields[0], fields[1])  # each pair its own misregistration
    # the other lists are datalist_mr_ct.json's; a second call reuses the files
    assert load_datalist(phantom, name, "test") == load_datalist(phantom, "datalist_mr_ct.json", "test")
    assert pseudo_ct_study.pairs_datalist(phantom, 10.0, [4.8, 4.8, 4.8]) == (name, applied)
    aligned, none = pseudo_ct_study.pairs_datalist(phantom, 0.0, [4.8, 4.8, 4.8])
    assert none == 0.0
    for pair in load_datalist(phantom, aligned, "training_pairs"):
        assert Path(pair["B"]).name == Path(pair["A"]).name.replace("_T1", "_CT") and "pairs_CT" not in pair["B"]


def test_publish_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    results.write_text("# Results\n\nthe reproduction's tables\n", encoding="utf-8")
    publish_section(results, "study", "first version")
    publish_section(results, "study", "second version")
    text = results.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\nthe reproduction's tables\n")
    assert "second version" in text and "first version" not in text and text.count("<!-- study -->") == 1


def test_publish_puts_the_section_and_copies_the_figures_into_a_new_folder(tmp_path: Path) -> None:
    figure = tmp_path / "study" / "figures" / "dose.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"\x89PNG figure bytes")
    published = publish(tmp_path / "docs", "the study's text", [figure], section="study")
    assert published == tmp_path / "docs" / "results.md"
    assert published.read_text(encoding="utf-8") == "<!-- study -->\nthe study's text\n<!-- /study -->\n"
    assert (tmp_path / "docs" / "figures" / "dose.png").read_bytes() == figure.read_bytes()


def test_study_end_to_end_at_a_tiny_size(phantom: Path, tmp_path: Path) -> None:
    variants = ["Dicycle_shared_mind", "Dicycle_misaligned_pairs"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n", encoding="utf-8")
    output = tmp_path / "study"
    options = {"output_dir": str(output), "variants": ",".join(variants), "dataset_dir": str(phantom)}
    # trained only (as on a GPU machine without SimpleITK), then evaluated by the same command without the flag
    trained = pseudo_ct_study.study(**options, preset="smoke", concurrent=2, evaluate="false")
    assert trained["results"] is None and sorted(trained["records"]) == [f"mr_ct_{v}" for v in sorted(variants)]
    assert all(trained["records"][f"mr_ct_{v}"]["trained_on"].endswith("CPU cores") for v in variants)
    assert not (output / "metrics").exists() and not (output / "pseudo_ct.md").exists()
    result = pseudo_ct_study.study(**options, preset="smoke", publish_dir=str(docs), concurrent=2)
    commands = {
        v: json.loads((output / "runs" / f"mr_ct_{v}" / "run.json").read_text(encoding="utf-8"))["command"]
        for v in variants
    }
    assert "--offsets shared --alignment mind_ssc" in commands["Dicycle_shared_mind"]
    assert "--lambda_paired" not in commands["Dicycle_shared_mind"]
    assert "--lambda_paired 10.0" in commands["Dicycle_misaligned_pairs"]
    assert "datalist_mr_ct_pairs_10mm.json" in commands["Dicycle_misaligned_pairs"]
    for variant in variants:
        with (output / "metrics" / f"{variant}.csv").open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
        assert {row["direction"] for row in rows} == {"A2B", "B2A"}
        assert all(row["MAE_HU"] for row in rows if row["direction"] == "A2B")  # a CT target: HU metrics
        assert [float(row["MAE_HU"]) for row in result["rows"][variant] if row["direction"] == "A2B"] == [
            pytest.approx(float(row["MAE_HU"])) for row in rows if row["direction"] == "A2B"
        ]
    text = (output / "pseudo_ct.md").read_text(encoding="utf-8")
    for variant in variants:
        assert f"| {pseudo_ct_study.VARIANTS[variant].label} |" in text
    assert "--preset smoke" in text and "misaligned pairs: best variant" in text
    assert "| (a) true CT |" in text and "| (b) remapped T1 |" in text and "(c) CycleGAN" not in text  # no CycleGAN run
    assert (output / "figures" / "fig4_pseudo_ct.png").read_bytes()[:8] == PNG_SIGNATURE
    published = (docs / "results.md").read_text(encoding="utf-8")
    assert published.startswith("# Results\n") and text.strip() in published
    assert (docs / "figures" / "fig4_pseudo_ct.png").is_file()
    # a tagged study (finished runs reused) has a section and figure of its own: the first stays published
    with pytest.raises(ValueError, match="tag must be letters"):
        pseudo_ct_study.study(output_dir=str(output), variants=variants[0], preset="smoke", tag="a b")
    pseudo_ct_study.study(
        output_dir=str(output),
        variants=variants[0],
        dataset_dir=str(phantom),
        preset="smoke",
        publish_dir=str(docs),
        tag="mind",
    )
    both = (docs / "results.md").read_text(encoding="utf-8")
    assert text.strip() in both and "## Pseudo-CT study (mind): which setting" in both
    assert "<!-- pseudo-ct-study-mind -->" in both and "--tag mind" in both
    assert (docs / "figures" / "fig4_pseudo_ct_mind.png").read_bytes()[:8] == PNG_SIGNATURE


def test_unknown_variant_and_bad_budget_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown variants"):
        pseudo_ct_study.study(output_dir=str(tmp_path), variants="Dicycle,Nope")
    with pytest.raises(ValueError, match="budget"):
        pseudo_ct_study.study(output_dir=str(tmp_path), budget=0)
    with pytest.raises(ValueError, match="concurrent must be a whole number"):
        pseudo_ct_study.study(output_dir=str(tmp_path / "study"), concurrent=0)
    assert not (tmp_path / "study").exists()  # refused before any data is built
