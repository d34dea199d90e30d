"""Export: the served network is the undeformed pass, MONAI's ckpt_export / onnx_export / verify_net_in_out work on
configs/inference.json, and scripts/export_bundle.py builds a model-zoo bundle that passes the zoo's checks."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from bundle.networks import DicycleGenerator
from monai.bundle import ConfigParser, ckpt_export, onnx_export, verify_net_in_out

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = [str(ROOT / "configs" / "inference.json")]
METADATA = ROOT / "configs" / "metadata.json"
TINY = {"ngf": 4, "n_blocks": 1}
SHAPES = [(1, 1, 128, 128), (2, 1, 50, 70)]  # the metadata's slice size, and one that is not a multiple of 4
TOLERANCE = 1e-5


def _load_script():
    return importlib.import_module("scripts.export_bundle")


def _tiny_generator(seed: int) -> DicycleGenerator:
    """A tiny generator with non-zero offsets, so that its deformed and undeformed passes differ."""
    torch.manual_seed(seed)
    generator = DicycleGenerator(**TINY, backend="torch")
    with torch.no_grad():
        for p in generator.offset_parameters():
            p.normal_(0.0, 0.3)
    return generator.eval()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """``model.pt``, ``model_g_ba.pt`` (bare state_dicts, as training writes them) and ``intensity_reference.json``."""
    models = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(("model.pt", "model_g_ba.pt")):
        torch.save(_tiny_generator(seed).state_dict(), models / name)
    reference = {"A": {"kind": "MR", "mean": 400.0, "std": 100.0}, "B": {"kind": "MR", "mean": 300.0, "std": 80.0}}
    (models / "intensity_reference.json").write_text(json.dumps(reference), encoding="utf-8")
    return models


def _reference(checkpoint: Path) -> DicycleGenerator:
    generator = DicycleGenerator(**TINY, backend="torch")
    generator.load_state_dict(torch.load(checkpoint, weights_only=True))
    return generator.eval()


def _assert_undeformed_pass(network, generator: DicycleGenerator) -> None:
    """``network`` equals the generator's undeformed pass (1e-5) and not its deformed pass, at every test size."""
    for shape in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out, aligned, deformed = network(x), generator(x, deform=False), generator(x, deform=True)
        assert out.shape == aligned.shape
        assert (out - aligned).abs().max() <= TOLERANCE
        assert (deformed - aligned).abs().max() > 1e-2  # the two passes are distinguishable


# ---------------------------------------------------------------------------------------------------------------
# the exportable network


def test_scripted_generator_loads_the_checkpoint_and_is_the_undeformed_pass(tiny_models):
    generator = _reference(tiny_models / "model.pt")
    _assert_undeformed_pass(generator, generator)  # the plain call
    _assert_undeformed_pass(torch.jit.script(generator), generator)


def test_inference_config_declares_the_undeformed_generator(tiny_models):
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({**TINY, "ckpt_dir": str(tiny_models)})
    for net_id, checkpoint in (("network_def", "model.pt"), ("network_ba_def", "model_g_ba.pt")):
        network = parser.get_parsed_content(net_id)
        assert type(network) is DicycleGenerator, f"{net_id} of configs/inference.json"
        network.load_state_dict(torch.load(tiny_models / checkpoint, weights_only=True), strict=True)


# ---------------------------------------------------------------------------------------------------------------
# MONAI's bundle commands on configs/inference.json


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # InstanceNorm's own input check, not our code
@pytest.mark.parametrize("use_trace", [False, True], ids=["script", "trace"])
def test_ckpt_export_torchscript_equals_the_eager_undeformed_pass(tiny_models, tmp_path, use_trace):
    ts_file = tmp_path / "model.ts"
    trace = {"use_trace": True, "input_shape": [1, 1, 128, 128]} if use_trace else {}
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_file),
        ckpt_file=str(tiny_models / "model.pt"),
        meta_file=str(METADATA),
        config_file=INFERENCE,
        **trace,
        ckpt_dir=str(tiny_models),
        **TINY,
    )
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(ts_file), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads(METADATA.read_text(encoding="utf-8"))["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "bundle.networks.DicycleGenerator"
    _assert_undeformed_pass(scripted, _reference(tiny_models / "model.pt"))


@pytest.mark.filterwarnings(
    "ignore:Constant folding",
    "ignore:ONNX export mode",
    "ignore:The feature will be removed",
    "ignore::torch.jit.TracerWarning",
)
def test_onnx_export_equals_the_eager_undeformed_pass(tiny_models, tmp_path):
    pytest.importorskip("onnx", reason="monai.bundle onnx_export saves with the onnx package")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX model is run with onnxruntime")
    onnx_file = tmp_path / "model.onnx"
    dynamic = {0: "batch", 2: "height", 3: "width"}
    onnx_export(  # the command of docs/README.md: TorchScript-based exporter, any batch and slice size
        net_id="network_def",
        filepath=str(onnx_file),
        ckpt_file=str(tiny_models / "model.pt"),
        meta_file=str(METADATA),
        config_file=INFERENCE,
        use_trace=True,
        converter_kwargs={
            "dynamo": False,
            "input_names": ["image"],
            "output_names": ["pred"],
            "dynamic_axes": {"image": dynamic, "pred": dynamic},
        },
        ckpt_dir=str(tiny_models),
        **TINY,
    )
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    generator = _reference(tiny_models / "model.pt")
    for shape in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        (out,) = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), generator(x, deform=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("net_id", ["network_def", "network_ba_def"])
def test_verify_net_in_out_on_the_inference_config(net_id, tmp_path):
    overrides = {**TINY, "ckpt_dir": str(tmp_path)}  # no settings.json: the paper's settings and the overrides
    verify_net_in_out(net_id=net_id, meta_file=str(METADATA), config_file=INFERENCE, device="cpu", **overrides)


# ---------------------------------------------------------------------------------------------------------------
# scripts/export_bundle.py


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory) -> dict:
    """One export of the tiny models (checks included), shared by the tests that read it."""
    output = tmp_path_factory.mktemp("dist")
    script = _load_script()
    result = script.export(
        name="tiny_bundle",
        output_dir=str(output),
        models_dir=str(tiny_models),
        overrides=TINY,
        changelog="tiny test export",
    )
    return {**result, "script": script, "output": output}


def test_export_writes_the_zoo_layout_with_a_new_version(exported):
    folder = Path(exported["folder"])
    source_meta = json.loads(METADATA.read_text(encoding="utf-8"))
    meta = json.loads((folder / "configs" / "metadata.json").read_text(encoding="utf-8"))
    major, minor, patch = (int(v) for v in source_meta["version"].split("."))
    assert meta["version"] == exported["version"] == f"{major}.{minor}.{patch + 1}"
    assert next(iter(meta["changelog"].items())) == (meta["version"], "tiny test export")  # newest first
    assert json.loads(METADATA.read_text(encoding="utf-8")) == source_meta  # the repository's metadata is untouched
    # what ships is what the repository runs: every config copied as it is, but for the overridden ids
    assert not (folder / "configs" / "common.json").exists()
    for name in ("train.json", "demo.json", "cyclegan.json"):
        assert (folder / "configs" / name).read_bytes() == (ROOT / "configs" / name).read_bytes()
    # the zoo's CI reads configs/inference.json alone: it declares the networks and their settings itself
    inference = json.loads((folder / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert inference["network_def"]["_target_"] == "bundle.networks.DicycleGenerator"
    assert (inference["ngf"], inference["n_blocks"]) == (4, 1)
    assert "evaluator" in inference and "settings" in inference
    for path in (
        "LICENSE",
        "docs/README.md",
        "docs/data_license.txt",
        "bundle/networks.py",
        "configs/train.json",
        "configs/logging.conf",
        "models/model.pt",
        "models/model.ts",
        "models/model_g_ba.pt",
        "models/model_g_ba.ts",
        "models/intensity_reference.json",
    ):
        assert (folder / path).is_file(), path
    assert not list(folder.rglob("__pycache__"))
    # experiment tooling (phantom, dataset builders, studies, benchmarks) stays in the repository
    assert not (folder / "scripts").exists() and not (folder / "bundle" / "phantom.py").exists()
    shipped_code = "\n".join(p.read_text(encoding="utf-8") for p in folder.rglob("*.py"))
    assert "write_phantom_dataset" not in shipped_code and "make_ixi_datalist" not in shipped_code

    large_files = exported["script"]._load_large_files(folder)
    assert [e["path"] for e in large_files] == [
        "models/model.pt",
        "models/model.ts",
        "models/model_g_ba.pt",
        "models/model_g_ba.ts",
    ]
    for entry in large_files:
        assert entry["hash_type"] == "md5" and entry["url"].startswith("<URL of")
        assert entry["hash_val"] == exported["script"]._file_hash(folder / entry["path"])

    with zipfile.ZipFile(exported["zip"]) as zf:
        names = set(zf.namelist())
    assert Path(exported["zip"]).name == f"tiny_bundle_v{meta['version']}.zip"
    assert {"tiny_bundle/configs/metadata.json", "tiny_bundle/models/model.ts", "tiny_bundle/large_files.yml"} <= names


def test_exported_bundle_passed_the_zoo_checks_in_a_clean_copy(exported):
    checks = "\n".join(exported["checks"])
    for expected in (
        "ok required files",
        "ok large_files.yml: 4 files present",
        "ok download_large_files",
        f"ok version {exported['version']}",
        "ok verify_metadata",
        "ok verify_net_in_out network_def",
        "ok ckpt_export network_def (torch.jit.script)",
        "ok models/model.ts == DicycleGenerator(x, deform=False)",
        "ok models/model_g_ba.ts == DicycleGenerator(x, deform=False)",
    ):
        assert expected in checks


def test_verify_names_a_model_file_changed_after_export(exported, tmp_path):
    import shutil

    folder = tmp_path / "tiny_bundle"
    shutil.copytree(exported["folder"], folder)
    with open(folder / "models" / "model.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(exported["script"].BundleExportError, match=r"models/model\.pt: its md5 differs"):
        exported["script"].verify_bundle(str(folder))


def test_export_refuses_to_overwrite_and_old_versions(exported):
    script, output = exported["script"], exported["output"]
    with pytest.raises(script.BundleExportError, match="exists: pass --overwrite"):
        script.export(name="tiny_bundle", output_dir=str(output))
    with pytest.raises(script.BundleExportError, match="must be newer than"):
        script.export(name="other", output_dir=str(output), version="0.0.1")


def test_export_names_a_missing_model_file(tmp_path):
    script = _load_script()
    with pytest.raises(script.BundleExportError, match=r"model\.pt: model file not found") as error:
        script.export(output_dir=str(tmp_path / "dist"), models_dir=str(tmp_path / "empty"))
    assert str(tmp_path / "empty" / "model.pt") in str(error.value)
    assert not (tmp_path / "dist").exists()  # nothing written


def test_export_names_a_corrupted_model_file(tmp_path):
    script = _load_script()
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(script.BundleExportError, match="not a readable PyTorch checkpoint") as error:
        script.export(output_dir=str(tmp_path / "dist"), models_dir=str(models))
    assert str(models / "model.pt") in str(error.value)


def test_export_names_a_checkpoint_of_another_size(tiny_models, tmp_path):
    script = _load_script()
    with pytest.raises(script.BundleExportError, match=r"(?s)model\.pt does not fit network_def.*--overrides") as error:
        script.export(output_dir=str(tmp_path / "dist"), models_dir=str(tiny_models))  # no TINY overrides
    assert "inference.json" in str(error.value)
    assert not (tmp_path / "dist" / script.DEFAULT_NAME).exists()  # the half-made folder is removed


def test_cli_reports_errors_without_a_traceback(tmp_path):
    command = [sys.executable, "-m", "scripts.export_bundle", "export", "--models_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "model.pt: model file not found" in result.stderr
    assert "Traceback" not in result.stderr
