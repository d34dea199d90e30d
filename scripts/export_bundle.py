"""Export this repository as a MONAI model-zoo bundle (folder + zip), and check it the way the zoo's CI does.

Usage (from the repository root)::

    # after training: models/model.pt (G A->B), optionally models/model_g_ba.pt and models/intensity_reference.json
    python -m scripts.export_bundle export --changelog "first trained release"      # version: patch bump
    python -m scripts.export_bundle export --version 0.2.0 --changelog "..."  # network settings: models/settings.json

    # check an exported bundle folder again (a clean copy of it, in a fresh interpreter)
    python -m scripts.export_bundle verify dist/dicyclegan_cross_domain_synthesis

``export`` writes ``dist/<name>/`` and ``dist/<name>_v<version>.zip`` (the folder at the top of the zip):

- ``configs/`` as they are, ``metadata.json`` with the new version and its changelog entry (newest first), and
  ``--overrides`` written into every config that declares the id;
- ``models/``: ``model.pt`` and ``model.ts`` (``monai.bundle.ckpt_export``, ``torch.jit.script``), the same for
  ``model_g_ba.pt`` (B2A) when it exists, ``intensity_reference.json`` and ``settings.json`` when they exist;
- ``bundle/`` (the custom code), ``docs/`` (model card, ``data_license.txt``), ``LICENSE``; not ``scripts/``;
- ``large_files.yml``: the model files with their md5 and a URL placeholder (``--base_url`` fills it): upload the
  files, put the URLs in, and drop ``models/*.pt|ts`` from the zoo pull request.

The checks (``verify``, also the end of ``export``) run on a temporary copy, with that copy alone on ``PYTHONPATH``:
what the zoo's ``ci/verify_bundle.py`` runs (required files, ``large_files.yml`` hashes, version in the changelog,
``verify_metadata``, ``verify_net_in_out`` and ``ckpt_export`` from ``configs/inference.json``, loading
``models/model.ts``), and that the shipped TorchScript files equal ``DicycleGenerator``'s undeformed pass (1e-5,
CPU, two slice sizes) and carry this bundle's metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fire

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NAME = "dicyclegan_cross_domain_synthesis"
DEFAULT_SCHEMA_DIR = ROOT / "tests" / "data"  # offline copies of MONAI's metadata schema, named as in its URL

# what is copied from the repository (directories: every file except caches); scripts/ is repository tooling
COPIED_DIRS = ("configs", "bundle", "docs")
COPIED_FILES = ("LICENSE",)
REQUIRED_SOURCES = (
    "configs/metadata.json",
    "configs/train.json",
    "configs/inference.json",
    "LICENSE",
    "docs/README.md",
    "docs/data_license.txt",
    "bundle",
)
# the inference config as the zoo's CI reads it
INFERENCE_CONFIGS = ("inference.json",)
# configs whose ids ``--overrides`` sets (the ones that load models/model.pt); an override must match one of them
OVERRIDE_CONFIGS = ("inference.json", "evaluate.json")
# (network id in configs/inference.json, checkpoint, TorchScript file); the first is required
MODEL_FILES = (("network_def", "model.pt", "model.ts"), ("network_ba_def", "model_g_ba.pt", "model_g_ba.ts"))
SIDE_FILES = ("intensity_reference.json", "settings.json")
# the zoo's ci/verify_bundle.py: necessary and preferred files; ours adds the model card and the large-file list
REQUIRED_FILES = (
    "configs/metadata.json",
    "LICENSE",
    "models/model.pt",
    "configs/inference.json",
    "docs/README.md",
    "models/model.ts",
    "large_files.yml",
)
TOLERANCE = 1e-5  # TorchScript against eager, absolute
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


class BundleExportError(RuntimeError):
    """A problem with the sources or the exported bundle; the message names the file."""


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _parse_version(version: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", str(version))
    if not match:
        raise BundleExportError(f"version {version!r} is not of the form MAJOR.MINOR.PATCH (e.g. 0.2.0).")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def bump_version(version: str) -> str:
    """The next patch version: ``MAJOR.MINOR.PATCH`` -> ``MAJOR.MINOR.(PATCH + 1)``."""
    major, minor, patch = _parse_version(version)
    return f"{major}.{minor}.{patch + 1}"


def _file_hash(path: str | os.PathLike, hash_type: str = "md5") -> str:
    """The hexadecimal digest of a file (md5 is what the zoo's ``large_files.yml`` files use)."""
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _set_config_id(config: dict, config_id: str, value: Any) -> bool:
    """Set ``config_id`` (MONAI's ``a#b#0`` syntax) in a raw config when its parent exists; True when it was set."""
    node: Any = config
    for key in config_id.split("#"):
        index: str | int = key
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            index = int(key)
        elif not (isinstance(node, dict) and key in node):
            return False
        parent, node = node, node[index]
    parent[index] = value
    return True


@contextmanager
def _quiet_monai_bundle() -> Iterator[None]:
    """Silence the INFO input summaries that ``monai.bundle`` functions log, for readable progress output."""
    loggers = [logging.getLogger(name) for name in ("monai.bundle.scripts", "monai.apps")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _write_zip(archive: Path, folder: Path) -> None:
    """Zip ``folder`` with the folder itself at the top, as zoo releases are; model files stored, text deflated."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stored = path.suffix in (".pt", ".ts", ".onnx")
            zf.write(path, path.relative_to(folder.parent), zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)


def _json_text(content: Any, compact_lists: bool = False, level: int = 0) -> str:
    """``json.dumps(content, indent=4)``, optionally with lists of numbers on one line (the configs' style)."""
    if not compact_lists:
        return json.dumps(content, indent=4)
    pad, inner = " " * 4 * level, " " * 4 * (level + 1)
    if isinstance(content, dict) and content:
        items = [f"{inner}{json.dumps(k)}: {_json_text(v, True, level + 1)}" for k, v in content.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(content, list) and content and not all(isinstance(v, (int, float)) for v in content):
        items = [f"{inner}{_json_text(v, True, level + 1)}" for v in content]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(content)


def _write_json(path: Path, content: Any, compact_lists: bool = False) -> None:
    path.write_text(_json_text(content, compact_lists) + "\n", encoding="utf-8")


def _load_state_dict(path: Path) -> dict:
    """Read a checkpoint that must be a bare state_dict, with errors that name the file."""
    import torch

    if not path.is_file():
        raise BundleExportError(
            f"{path}: model file not found. Train first (models/model.pt is written by configs/train.json) or pass "
            "--models_dir with the folder that holds model.pt."
        )
    if path.stat().st_size == 0:
        raise BundleExportError(f"{path}: model file is empty (0 bytes).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise BundleExportError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
        raise BundleExportError(
            f"{path}: expected the bare state_dict of the generator (what training writes to models/model.pt), "
            f"got {keys}. A resume checkpoint cannot be exported as is."
        )
    return dict(state)


def _inference_configs(root: Path) -> list[str]:
    """The config files of :data:`INFERENCE_CONFIGS` in a bundle folder, as ``--config_file`` takes them."""
    return [str(root / "configs" / name) for name in INFERENCE_CONFIGS]


def _parsed_network(config_files: list[str], meta_file: Path, net_id: str, bundle_root: Path):
    """``net_id`` of the merged configs, instantiated (needs the bundle's ``bundle`` package importable)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    parser.read_meta(str(meta_file))
    parser["bundle_root"] = str(bundle_root)
    try:
        return parser.get_parsed_content(net_id)
    except Exception as e:
        raise BundleExportError(f"{config_files}: cannot build {net_id!r} ({type(e).__name__}: {e}).") from e


def _check_checkpoint_fits(checkpoint: Path, config_files: list[str], meta_file: Path, net_id: str, root: Path) -> None:
    """The checkpoint loads strictly into ``net_id`` of the config."""
    state = _load_state_dict(checkpoint)
    network = _parsed_network(config_files, meta_file, net_id, root)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleExportError(
            f"{checkpoint} does not fit {net_id} of configs/inference.json: {e}\nIf the model was trained "
            "with a preset (e.g. configs/demo.json: ngf 16, n_blocks 4), pass the same values: --overrides "
            "\"{'ngf': 16, 'n_blocks': 4}\"."
        ) from e


def _large_files_yaml(entries: list[dict[str, str]]) -> str:
    lines = [
        "# Model files of this bundle. `python -m monai.bundle download_large_files` fetches them (the model zoo does",
        "# before checking a bundle; existing files whose hash matches are kept). Upload each file, put its URL in",
        "# place of the placeholder, and keep hash_val (md5 of the file exported with it).",
        "large_files:",
    ]
    for entry in entries:
        lines += [f'  - path: "{entry["path"]}"']
        lines += [f'    {key}: "{entry[key]}"' for key in ("url", "hash_val", "hash_type")]
    return "\n".join(lines) + "\n"


def _load_large_files(bundle_dir: Path) -> list[dict[str, str]]:
    """The entries of a bundle's ``large_files.yml``."""
    import yaml

    path = bundle_dir / "large_files.yml"
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        entries = content.get("large_files") or []
        if not all(isinstance(e, dict) and "path" in e and "url" in e for e in entries):
            raise ValueError("every entry needs 'path' and 'url'")
    except Exception as e:
        raise BundleExportError(f"{path}: not a valid large-file list ({type(e).__name__}: {e}).") from e
    return entries


def _assemble(
    out: Path, models_dir: Path, version: str, changelog: str, overrides: Mapping[str, Any], base_url: str | None
) -> list[str]:
    """Copy the sources into ``out``, write the versioned metadata, overridden configs and ``large_files.yml``;
    export the TorchScript files in place. Returns the model files written."""
    from monai.bundle import ckpt_export

    for name in COPIED_DIRS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, out / name, ignore=_IGNORED)
    for name in COPIED_FILES:
        shutil.copy2(ROOT / name, out / name)

    meta_file = out / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    metadata["version"] = version
    older = {k: v for k, v in metadata.get("changelog", {}).items() if k != version}
    metadata["changelog"] = {version: changelog, **older}  # newest first, as zoo bundles keep it
    _write_json(meta_file, metadata)

    unmatched = dict(overrides)
    for name in OVERRIDE_CONFIGS:
        config_file = out / "configs" / name
        if not config_file.is_file() or not overrides:
            continue
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for config_id, value in overrides.items():
            if _set_config_id(config, config_id, value):
                unmatched.pop(config_id, None)
        _write_json(config_file, config, compact_lists=True)
    if unmatched:
        files = " or ".join(f"configs/{name}" for name in OVERRIDE_CONFIGS)
        raise BundleExportError(f"overrides {sorted(unmatched)} match no id in {files}.")

    (out / "models").mkdir()
    for name in SIDE_FILES:  # first: ckpt_export builds the networks from models/settings.json
        if (models_dir / name).is_file():
            shutil.copy2(models_dir / name, out / "models" / name)
        elif name == "settings.json":
            print(f"      {_rel(models_dir / name, ROOT)} not found: the networks are built from configs and overrides")
        else:
            print(f"      {_rel(models_dir / name, ROOT)} not found: MR outputs will stay z-scored at inference")
    inference = _inference_configs(out)
    written = []
    for net_id, checkpoint, torchscript in MODEL_FILES:
        source = models_dir / checkpoint
        if not source.exists() and checkpoint != MODEL_FILES[0][1]:
            print(f"      {_rel(source, ROOT)} not found: the bundle will have no {net_id} (direction B2A)")
            continue
        _check_checkpoint_fits(source, inference, meta_file, net_id, out)
        shutil.copy2(source, out / "models" / checkpoint)
        print(f"      models/{checkpoint} <- {_rel(source, ROOT)}; ckpt_export {net_id} -> models/{torchscript}")
        target = {"filepath": str(out / "models" / torchscript), "ckpt_file": str(out / "models" / checkpoint)}
        ckpt_export(net_id=net_id, **target, meta_file=str(meta_file), config_file=inference, bundle_root=str(out))
        written += [f"models/{checkpoint}", f"models/{torchscript}"]

    entries = []
    for path in written:
        url = f"{base_url.rstrip('/')}/{out.name}_v{version}_{Path(path).name}" if base_url else f"<URL of {path}>"
        entries.append({"path": path, "url": url, "hash_val": _file_hash(out / path), "hash_type": "md5"})
    (out / "large_files.yml").write_text(_large_files_yaml(entries), encoding="utf-8")
    return written


def export(
    name: str = DEFAULT_NAME,
    output_dir: str = "dist",
    version: str | None = None,
    changelog: str | None = None,
    models_dir: str = "models",
    overrides: dict[str, Any] | None = None,
    base_url: str | None = None,
    schema: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Build the model-zoo bundle folder and zip, then check them as the zoo's CI does.

    Args:
        name: bundle name (the folder name in the zoo's ``models/``).
        output_dir: where ``<name>/`` and ``<name>_v<version>.zip`` are written (relative to the repository root).
        version: the new version, newer than ``configs/metadata.json``'s; default: the next patch version.
        changelog: the changelog entry of the new version; default: a line naming the export.
        models_dir: folder with ``model.pt`` (required), ``model_g_ba.pt``, ``intensity_reference.json``,
            ``settings.json`` (optional), relative to the repository root.
        overrides: config ids and values written into ``configs/inference.json`` and ``configs/evaluate.json``, e.g.
            ``{"ngf": 16, "n_blocks": 4}`` for a model trained with ``configs/demo.json``.
        base_url: where the model files will be uploaded; fills the URLs of ``large_files.yml``.
        schema: local copy of the metadata schema (default: ``tests/data/<file named in metadata.json>``).
        overwrite: replace an existing export of the same name (only a folder that holds a bundle).
        verify: run the zoo-style checks on a clean copy before zipping.

    Returns:
        ``{"folder": ..., "zip": ..., "version": ..., "checks": [the checks that passed]}``.

    Raises:
        BundleExportError: naming the source or exported file at fault.
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise BundleExportError(f"bundle name {name!r}: use letters, digits and underscores (zoo folder names).")
    missing = [p for p in REQUIRED_SOURCES if not (ROOT / p).exists()]
    if missing:
        raise BundleExportError(f"missing in {ROOT}: {', '.join(missing)}.")
    previous = json.loads((ROOT / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]
    version = version or bump_version(previous)
    if _parse_version(version) <= _parse_version(previous):
        raise BundleExportError(
            f"version {version} must be newer than {previous} (configs/metadata.json): the zoo refuses a bundle "
            "whose version is already published."
        )
    changelog = changelog or f"model-zoo export of {models_dir}/model.pt"
    output = (ROOT / output_dir).resolve()
    out = output / name
    archive = output / f"{name}_v{version}.zip"
    if out.exists() and not overwrite:
        raise BundleExportError(f"{out} exists: pass --overwrite True to replace it.")
    if out.exists() and not (out / "configs" / "metadata.json").is_file():
        raise BundleExportError(f"{out} exists and does not hold a bundle: not removing it.")
    models = (ROOT / models_dir).resolve()
    for _, checkpoint, _ in MODEL_FILES:  # fail before writing anything: model.pt must exist, every file must load
        if checkpoint == MODEL_FILES[0][1] or (models / checkpoint).exists():
            _load_state_dict(models / checkpoint)

    if out.exists():
        shutil.rmtree(out)
    output.mkdir(parents=True, exist_ok=True)
    archive.unlink(missing_ok=True)

    start = time.monotonic()
    print(f"[1/4] assembling {_rel(out, ROOT)} (version {previous} -> {version})", flush=True)
    out.mkdir()
    try:
        with _quiet_monai_bundle():
            written = _assemble(out, models, version, changelog, overrides or {}, base_url)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-made bundle
        raise
    print(f"[2/4] wrote {', '.join(written)}, large_files.yml ({time.monotonic() - start:.0f} s)", flush=True)
    checks: list[str] = []
    if verify:
        print("[3/4] model-zoo checks on a clean copy", flush=True)
        checks = verify_bundle(str(out), schema=schema, previous_version=previous)
    else:
        print("[3/4] checks skipped (--verify False)", flush=True)
    _write_zip(archive, out)
    print(f"[4/4] wrote {_rel(archive, ROOT)} ({time.monotonic() - start:.0f} s in all)", flush=True)
    return {"folder": str(out), "zip": str(archive), "version": version, "checks": checks}


def _schema_copy(meta_file: Path, schema: str | None) -> Path | None:
    if schema:
        return Path(schema).resolve()
    url = json.loads(meta_file.read_text(encoding="utf-8")).get("schema", "")
    candidate = DEFAULT_SCHEMA_DIR / url.rsplit("/", 1)[-1]
    return candidate if url and candidate.is_file() else None


def verify_bundle(bundle_dir: str, schema: str | None = None, previous_version: str | None = None) -> list[str]:
    """Check an exported bundle folder as the model zoo's CI does, on a clean copy in a fresh interpreter.

    Args:
        bundle_dir: the exported bundle folder.
        schema: local metadata schema copy (default: ``tests/data/<file named in metadata.json>``, else a download).
        previous_version: the published version the bundle's version must be newer than.

    Returns:
        The checks that passed, one line each.

    Raises:
        BundleExportError: with the failing check and the output of the checking process.
    """
    source = Path(bundle_dir).resolve()
    if not (source / "configs" / "metadata.json").is_file():
        raise BundleExportError(f"{source}: not a bundle folder (no configs/metadata.json).")
    schema_path = _schema_copy(source / "configs" / "metadata.json", schema)
    with tempfile.TemporaryDirectory(prefix="bundle-check-") as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy, ignore=_IGNORED)
        command = [sys.executable, str(Path(__file__).resolve()), "check_in_place", "--bundle_dir", str(copy)]
        if schema_path is not None:
            command += ["--schema", str(schema_path)]
        if previous_version:
            command += ["--previous_version", str(previous_version)]
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
    passed = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ok ")]
    for line in passed:
        print(f"      {line}", flush=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise BundleExportError(f"{source}: model-zoo check failed (in a clean copy):\n{tail}")
    return passed


def _compare(name: str, expected, actual, tolerance: float) -> float:
    import torch

    error = float((expected.float() - actual.float()).abs().max())
    if not torch.isfinite(actual).all() or error > tolerance:
        raise BundleExportError(f"{name}: differs from the eager undeformed pass by {error:.3g} (> {tolerance}).")
    return error


def check_in_place(bundle_dir: str = ".", schema: str | None = None, previous_version: str | None = None) -> None:
    """The checks of :func:`verify_bundle` on ``bundle_dir`` itself, in an interpreter whose ``PYTHONPATH`` is the
    bundle folder; prints ``  ok <check>`` per check.

    Args:
        bundle_dir: the bundle folder.
        schema: local copy of the metadata schema; without it ``verify_metadata`` downloads the schema.
        previous_version: the published version the bundle's version must be newer than.

    Raises:
        BundleExportError: naming the check and the file.
    """
    with _quiet_monai_bundle():
        _check(Path(bundle_dir).resolve(), schema, previous_version)


def _check(root: Path, schema: str | None, previous_version: str | None) -> None:
    meta_file, inference = root / "configs" / "metadata.json", _inference_configs(root)

    # file-level checks first: they need neither torch nor MONAI, so a broken bundle fails fast
    missing = [p for p in REQUIRED_FILES if not (root / p).is_file()]
    if missing:
        raise BundleExportError(f"{root}: necessary files missing: {', '.join(missing)}.")
    print("  ok required files: " + ", ".join(REQUIRED_FILES), flush=True)

    listed = _load_large_files(root)
    for entry in listed:
        path, hash_type = root / entry["path"], entry.get("hash_type") or "md5"
        if not path.is_file():
            raise BundleExportError(f"{root / 'large_files.yml'}: lists {entry['path']}, which is missing.")
        if entry.get("hash_val") and _file_hash(path, hash_type) != entry["hash_val"]:
            raise BundleExportError(f"{path}: its {hash_type} differs from the one in large_files.yml.")
    print(f"  ok large_files.yml: {len(listed)} files present, hashes match", flush=True)

    metadata = json.loads(meta_file.read_text(encoding="utf-8"))
    version = metadata.get("version")
    if not version or version not in metadata.get("changelog", {}):
        raise BundleExportError(f"{meta_file}: version {version!r} has no changelog entry.")
    if previous_version and _parse_version(version) <= _parse_version(previous_version):
        raise BundleExportError(f"{meta_file}: version {version} is not newer than {previous_version}.")
    print(f"  ok version {version} in the changelog", flush=True)

    import torch
    from monai.bundle import ckpt_export, download_large_files, verify_metadata, verify_net_in_out

    sys.path.insert(0, str(root))  # as the zoo's CI does, for the custom code
    download_large_files(bundle_path=str(root))  # the zoo's first step: keeps the files whose hash matches
    print("  ok download_large_files (every file present)", flush=True)

    with tempfile.TemporaryDirectory(prefix="schema-") as tmp:
        schema_file = Path(tmp) / "schema.json"
        if schema:
            shutil.copy(schema, schema_file)  # verify_metadata downloads only when the file is missing
        verify_metadata(meta_file=str(meta_file), filepath=str(schema_file))
    print("  ok verify_metadata", flush=True)

    import bundle as custom_code  # imported by the configs; must be this folder's copy

    if not Path(custom_code.__file__).resolve().is_relative_to(root):
        raise BundleExportError(f"the bundle's custom code was imported from {custom_code.__file__}, not {root}.")
    from bundle.networks import DicycleGenerator

    for net_id, checkpoint, torchscript in MODEL_FILES:
        ckpt, shipped = root / "models" / checkpoint, root / "models" / torchscript
        if not ckpt.is_file():
            continue
        files = {"meta_file": str(meta_file), "config_file": inference, "bundle_root": str(root)}
        verify_net_in_out(net_id=net_id, **files)
        print(f"  ok verify_net_in_out {net_id}", flush=True)
        with tempfile.TemporaryDirectory(prefix="ts-") as tmp:
            fresh = Path(tmp) / "verify_model.ts"
            ckpt_export(net_id=net_id, filepath=str(fresh), ckpt_file=str(ckpt), **files)
            extra = {"metadata.json": "", "inference.json": ""}
            shipped_ts = torch.jit.load(str(shipped), map_location="cpu", _extra_files=extra)
            fresh_ts = torch.jit.load(str(fresh), map_location="cpu")
        print(f"  ok ckpt_export {net_id} (torch.jit.script) and torch.jit.load models/{torchscript}", flush=True)
        if json.loads(extra["metadata.json"] or "{}").get("version") != version:
            raise BundleExportError(f"{shipped}: was not exported with this bundle's metadata (version {version}).")

        reference = _parsed_network(inference, meta_file, net_id, root).cpu().eval()
        if not isinstance(reference, DicycleGenerator):
            raise BundleExportError(
                f"configs/inference.json: {net_id} does not build a DicycleGenerator from its arguments."
            )
        reference.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        channels = metadata["network_data_format"]["inputs"]["image"]["num_channels"]
        height, width = (int(s) for s in metadata["network_data_format"]["inputs"]["image"]["spatial_shape"])
        generator = torch.Generator().manual_seed(0)
        errors = []
        for shape in ((1, channels, height, width), (2, channels, height - 3, width + 2)):
            x = torch.randn(shape, generator=generator)
            with torch.no_grad():
                expected = reference(x, deform=False)
                errors.append(_compare(f"models/{torchscript}", expected, shipped_ts(x), TOLERANCE))
                errors.append(_compare(f"ckpt_export of {net_id}", expected, fresh_ts(x), TOLERANCE))
        print(
            f"  ok models/{torchscript} == DicycleGenerator(x, deform=False) with models/{checkpoint} "
            f"(max |diff| {max(errors):.1e} <= {TOLERANCE}, slices {height}x{width} and {height - 3}x{width + 2})",
            flush=True,
        )


def main() -> None:
    """Command-line entry: python-fire over :func:`export`, :func:`verify_bundle` and :func:`check_in_place`."""
    try:
        commands = {"export": export, "verify": verify_bundle, "check_in_place": check_in_place}
        fire.Fire(commands, name="export_bundle", serialize=lambda result: None)  # progress is printed as it goes
    except BundleExportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
