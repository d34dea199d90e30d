"""Inference refuses an incomplete model folder before any work, names every bad file in one line, keeps the input's
header geometry and resumes an interrupted batch (configs/inference.json, bundle/inputs.py, bundle/inference.py)."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle.inputs import find_inputs
from bundle.networks import DicycleGenerator
from bundle.settings import paper_settings, write_settings
from monai.bundle import run
from tests.bundle_fixtures import root_error

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = [str(ROOT / "configs" / "inference.json")]
TINY = {"ngf": 4, "n_blocks": 1, "pixdim": [2.0, 2.0, 2.0]}
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
REFERENCE = {"A": {"kind": "MR", "mean": 100.0, "std": 20.0}, "B": {"kind": "MR", "mean": 500.0, "std": 50.0}}


def _head(shape=(20, 24, 10), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[:3]], indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.8) ** 2 + (z / 0.8) ** 2 <= 1
    volume = np.where(inside, 100 + 50 * x, 0.0) + np.abs(rng.normal(0, 3, shape[:3]))
    return volume.reshape(shape).astype(np.float32)


def _models(ckpt_dir: Path, **drop: bool) -> Path:
    """A tiny trained-model folder as training writes it: both generators, settings.json, intensity reference;
    ``drop`` names settings to leave out of settings.json."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("model.pt", "model_g_ba.pt")):
        torch.manual_seed(seed)
        torch.save(DicycleGenerator(ngf=4, n_blocks=1, backend="torch").state_dict(), ckpt_dir / name)
    write_settings(ckpt_dir, {**paper_settings(), **TINY})
    settings = json.loads((ckpt_dir / "settings.json").read_text(encoding="utf-8"))
    (ckpt_dir / "settings.json").write_text(
        json.dumps({k: v for k, v in settings.items() if k not in drop}), encoding="utf-8"
    )
    (ckpt_dir / "intensity_reference.json").write_text(json.dumps(REFERENCE), encoding="utf-8")
    return ckpt_dir


def _save(path: Path, seed: int = 0, affine: np.ndarray = AFFINE, shape=(20, 24, 10), codes=(2, 1)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(_head(shape, seed), affine)
    image.set_sform(affine, code=codes[0])
    image.set_qform(affine, code=codes[1])
    nib.save(image, path)
    return path


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The bundle's log messages of the test (MONAI's run applies configs/logging.conf, which removes the handlers of
    the root logger, pytest's caplog included; a handler on the bundle's own logger stays)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("bundle").addHandler(handler)
    yield messages
    logging.getLogger("bundle").removeHandler(handler)


def infer(tmp_path: Path, output_dir: Path, **overrides) -> None:
    """Inference with the model folder's own settings (no network flags)."""
    run(
        config_file=INFERENCE,
        bundle_root=str(ROOT),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(output_dir),
        sw_batch_size=8,
        **overrides,
    )


def infer_failing(tmp_path: Path, output_dir: Path, **overrides) -> str:
    """Run inference that must fail; returns the root error's message."""
    with pytest.raises(Exception) as caught:
        infer(tmp_path, output_dir, **overrides)
    return str(root_error(caught.value))


def _model_folder_refused(tmp_path: Path) -> str:
    """The error of a run whose input folder does not exist: a model-folder error comes first, before any input."""
    message = infer_failing(tmp_path, tmp_path / "out", input_dir=str(tmp_path / "no_such_folder"))
    assert "no_such_folder" not in message and not (tmp_path / "out").exists(), message
    assert len(message.splitlines()) == 1, message
    return message


# ------------------------------------------------------------------------------- an incomplete model folder


@pytest.mark.parametrize("missing", [("pixdim",), ("ngf", "n_blocks")])
def test_a_settings_file_without_a_key_stops_the_run_naming_the_file_and_the_key(tmp_path, missing):
    """Without pixdim the run used the paper's 1.8 mm instead of the trained spacing; without ngf/n_blocks it
    printed a 221-line state-dict dump."""
    _models(tmp_path / "models", **dict.fromkeys(missing, True))
    message = _model_folder_refused(tmp_path)
    assert message.startswith(f"{tmp_path / 'models' / 'settings.json'} is incomplete: no ")
    assert all(f"'{key}'" in message for key in missing) and "state_dict" not in message


def test_a_truncated_model_file_is_named_in_one_line(tmp_path):
    models = _models(tmp_path / "models")
    whole = (models / "model.pt").read_bytes()
    (models / "model.pt").write_bytes(whole[: len(whole) // 2])
    message = _model_folder_refused(tmp_path)
    assert message.startswith(f"model file {models / 'model.pt'} ({len(whole) // 2} bytes) is truncated or corrupted")
    (models / "model.pt").write_bytes(b"")
    assert "(0 bytes) is truncated or corrupted" in _model_folder_refused(tmp_path)


def test_a_model_file_refused_by_weights_only_is_named_and_weights_only_false_never_suggested(tmp_path):
    models = _models(tmp_path / "models")
    state = torch.load(models / "model.pt", weights_only=True)
    torch.save({**state, "args": argparse.Namespace(ngf=4)}, models / "model.pt")  # unpickling runs a constructor
    message = _model_folder_refused(tmp_path)
    assert message.startswith(f"model file {models / 'model.pt'} holds Python objects other than tensors")
    assert "weights_only=False" not in message and "is refused" in message


def test_weights_of_another_network_are_refused_before_any_input(tmp_path):
    models = _models(tmp_path / "models")
    torch.save(DicycleGenerator(ngf=8, n_blocks=1).state_dict(), models / "model.pt")  # settings.json says ngf 4
    message = _model_folder_refused(tmp_path)
    assert message.startswith(f"model file {models / 'model.pt'} does not fit the network built from settings.json")
    assert "of another shape" in message


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not a readable intensity reference (JSONDecodeError"),
        (json.dumps({"A": REFERENCE["A"]}), "no intensity reference for domain B"),
        (
            json.dumps({**REFERENCE, "B": {"kind": "MR", "mean": 500.0}}),
            "domain B: expected a finite 'mean' and a positive 'std'",
        ),
        (json.dumps({**REFERENCE, "B": {"kind": "CT", "hu_window": [-1000, 2000]}}), "domain B is 'CT' there but 'MR'"),
    ],
)
def test_a_broken_intensity_reference_is_refused_before_any_work(tmp_path, content, problem):
    """It failed every input with "JSONDecodeError" only after the network had run on it."""
    models = _models(tmp_path / "models")
    (models / "intensity_reference.json").write_text(content, encoding="utf-8")
    message = _model_folder_refused(tmp_path)
    assert message.startswith(f"{models / 'intensity_reference.json'}: {problem}"), message


# ------------------------------------------------------------------------------------- inputs and outputs


def test_an_rgb_volume_is_named_as_unsupported_and_the_good_volume_is_written(tmp_path):
    _models(tmp_path / "models")
    scans = tmp_path / "scans"
    rgb = np.zeros((20, 24, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = _head().astype(np.uint8)
    scans.mkdir()
    nib.save(nib.Nifti1Image(rgb, AFFINE), scans / "a_colour.nii.gz")  # datatype 128, RGB24
    _save(scans / "b_good.nii.gz")
    message = infer_failing(tmp_path, tmp_path / "out", input_dir=str(scans))
    assert "1 of 2 inputs could not be synthesized (1 written)" in message
    assert (
        f"{scans / 'a_colour.nii.gz'}: has voxels of 3 components per voxel (R, G, B: colour): unsupported" in message
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b_good_T2.nii.gz"]


def test_the_output_header_has_one_geometry_with_the_inputs_codes(tmp_path, logged):
    """A sheared input got a qform (code 1) 12 mm away from its sform at the corners, and sform_code 2 became 1."""
    _models(tmp_path / "models")
    sheared = AFFINE.copy()
    sheared[0, 1] = 0.6  # x grows with y: a shear no qform holds
    sheared[:3, 3] = [-20.0, -24.0, -10.0]
    oblique = AFFINE.copy()
    oblique[:3, :3] = AFFINE[:3, :3] @ np.array([[1.0, 0, 0], [0, 0.8, -0.6], [0, 0.6, 0.8]])  # a rotation: holdable
    scans = tmp_path / "scans"
    _save(scans / "sheared.nii.gz", affine=sheared, codes=(2, 1))
    _save(scans / "oblique.nii.gz", affine=oblique, codes=(3, 4))
    infer(tmp_path, tmp_path / "out", input_dir=str(scans))
    out = nib.load(tmp_path / "out" / "sheared_T2.nii.gz").header
    np.testing.assert_allclose(out.get_sform(), sheared, atol=1e-5)
    assert (int(out["sform_code"]), int(out["qform_code"])) == (2, 0)  # no second, approximate geometry
    assert any(m.startswith(f"{scans / 'sheared.nii.gz'}: its voxel-to-world affine is sheared") for m in logged)
    out = nib.load(tmp_path / "out" / "oblique_T2.nii.gz").header
    np.testing.assert_allclose(out.get_sform(), oblique, atol=1e-5)
    np.testing.assert_allclose(out.get_qform(), oblique, atol=1e-5)
    assert (int(out["sform_code"]), int(out["qform_code"])) == (3, 4)
    assert not any("oblique.nii.gz: its voxel-to-world affine is sheared" in m for m in logged)


def test_a_trailing_time_point_of_one_is_kept_and_thick_slices_get_a_warning(tmp_path, logged):
    _models(tmp_path / "models")
    scans = tmp_path / "scans"
    _save(scans / "four_d.nii.gz", shape=(20, 24, 10, 1))
    _save(scans / "thick.nii.gz", affine=np.diag([2.0, 2.0, 10.0, 1.0]), shape=(20, 24, 4), seed=1)
    infer(tmp_path, tmp_path / "out", input_dir=str(scans))
    assert nib.load(tmp_path / "out" / "four_d_T2.nii.gz").shape == (20, 24, 10, 1)
    assert nib.load(tmp_path / "out" / "thick_T2.nii.gz").shape == (20, 24, 4)
    thick = f"{scans / 'thick.nii.gz'}: voxels of 2 x 2 x 10 mm, up to 5.0 times thicker than the trained spacing"
    assert any(m.startswith(thick) for m in logged), logged
    assert not any("four_d.nii.gz: voxels" in m for m in logged)


def test_the_output_folder_is_created_only_when_an_output_is_written(tmp_path):
    _models(tmp_path / "models")
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    message = infer_failing(tmp_path, tmp_path / "out" / "nested", input_dir=str(tmp_path / "scans"))
    assert "1 of 1 inputs could not be synthesized (0 written)" in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- interrupted batches

_KILLED_WHILE_SAVING = """
import os, signal, sys
import torch
from bundle.outputs import SaveSynthesisd
os.link = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # killed once the partial file is written
SaveSynthesisd("pred")({"pred": torch.rand(1, 8, 8, 4), "output": sys.argv[1]})
"""


def test_the_next_run_removes_the_partial_files_a_killed_run_left_and_only_those(tmp_path):
    out = tmp_path / "out"
    target = out / "a_T2.nii.gz"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_SAVING, str(target)], env=env)
    assert killed.wait(timeout=300) == -9
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and re.fullmatch(rf"\.a_T2\.{killed.pid}-[0-9a-f]{{8}}\.partial\.nii\.gz", left[0]), left
    old_style = out / f".a_T2.{'0' * 32}.partial.nii.gz"  # as named before the process id was in the name
    old_style.write_bytes(gzip.compress(b"truncated")[:8])
    alive = out / f".a_T2.{os.getpid()}-0123abcd.partial.nii.gz"  # being written by a running process
    others = [out / f".b_T2.{'0' * 32}.partial.nii.gz", out / ".a_T2.nii.gz.notes", out / "a_T2.partial.nii.gz"]
    for path in (alive, *others):
        path.write_bytes(b"x")
    _save(tmp_path / "scans" / "a.nii.gz")
    inputs = find_inputs(input_dir=str(tmp_path / "scans"), output_dir=str(out), output_postfix="T2")
    assert [e["output"] for e in inputs.good] == [str(target.resolve())]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (alive, *others))


def test_skip_existing_keeps_finished_outputs_synthesizes_the_rest_and_exits_zero(tmp_path):
    """A rerun after an interruption exited 1 and counted the written outputs as "could not be synthesized"."""
    _models(tmp_path / "models")
    scans, out = tmp_path / "scans", tmp_path / "out"
    _save(scans / "a.nii.gz")
    _save(scans / "b.nii.gz", seed=1)
    out.mkdir()
    (out / "a_T2.nii.gz").write_bytes(b"written by the interrupted run")
    message = infer_failing(tmp_path, out, input_dir=str(scans))  # the default: refuse to replace, and say so
    assert "1 of 2 inputs could not be synthesized (1 written)" in message and "exists and is not replaced" in message
    (out / "b_T2.nii.gz").unlink()
    infer(tmp_path, out, input_dir=str(scans), skip_existing="true")  # no error: every input has its output
    assert (out / "a_T2.nii.gz").read_bytes() == b"written by the interrupted run"
    assert nib.load(out / "b_T2.nii.gz").shape == (20, 24, 10)
    (scans / "c.nii.gz").write_bytes(b"")
    message = infer_failing(tmp_path, out, input_dir=str(scans), skip_existing=True)
    assert message.startswith("1 of 3 inputs could not be synthesized (0 written, 2 already there)")
    message = infer_failing(tmp_path, out, input_dir=str(scans), skip_existing=True, overwrite=True)
    assert message == "--overwrite true replaces existing outputs, --skip_existing true keeps them: give one."


# ----------------------------------------------------------------------------------- the command line


def _command_line(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFERENCE[0], "--bundle_root", str(ROOT)]
    command += ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "out"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_a_failure_prints_its_reason_alone_and_the_traceback_only_with_debug(tmp_path):
    """Each failure printed its one-line reason and then 2-3 tracebacks of 62-221 lines."""
    models = _models(tmp_path / "models", pixdim=True)
    _save(tmp_path / "scans" / "a.nii.gz")
    result = _command_line(tmp_path, "--input_dir", str(tmp_path / "scans"))
    assert result.returncode == 1
    assert f"ValueError: {models / 'settings.json'} is incomplete: no 'pixdim'" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr and "--debug true" in result.stderr
    _models(tmp_path / "models")
    (tmp_path / "scans" / "b.nii.gz").write_bytes(b"not an image")
    result = _command_line(tmp_path, "--input_dir", str(tmp_path / "scans"), "--debug", "true")
    assert result.returncode == 1 and (tmp_path / "out" / "a_T2.nii.gz").is_file()
    assert "1 of 2 inputs could not be synthesized (1 written)" in result.stderr
    assert "Traceback" in result.stderr, result.stderr[-3000:]
