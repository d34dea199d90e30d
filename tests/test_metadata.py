"""The bundle's metadata passes MONAI's schema and agrees with the pinned requirements."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from monai.bundle import verify_metadata

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "data" / "meta_schema_20240725.json"  # offline copy of MONAI's published schema


def _metadata() -> dict:
    return json.loads((ROOT / "configs" / "metadata.json").read_text(encoding="utf-8"))


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_metadata_verifies_against_the_schema(tmp_path):
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)  # verify_metadata reads the file and would download only if it were missing
    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(schema))


def test_metadata_schema_url_names_the_vendored_schema():
    assert _metadata()["schema"].endswith("/" + SCHEMA.name)


def test_top_level_metadata_is_a_link_to_the_config():
    link = ROOT / "metadata.json"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "configs" / "metadata.json").resolve()


def test_versions_match_the_pinned_requirements():
    meta, pins = _metadata(), _pins()
    assert meta["monai_version"] == pins["monai"]
    assert meta["pytorch_version"] == pins["torch"]
    assert meta["numpy_version"] == pins["numpy"]
    for package, version in meta["required_packages_version"].items():
        assert pins.get(package.lower()) == version, package


def test_changelog_has_the_current_version():
    meta = _metadata()
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("key,direction", [("inputs", "image"), ("outputs", "pred")])
def test_network_data_format_describes_one_channel_slices(key, direction):
    tensor = _metadata()["network_data_format"][key][direction]
    assert tensor["num_channels"] == 1
    assert len(tensor["spatial_shape"]) == 2


def test_verify_net_in_out_runs_the_generator_with_the_metadata_shapes(tmp_path):
    from monai.bundle import verify_net_in_out

    config = tmp_path / "network.json"
    config.write_text(
        json.dumps(
            {
                "imports": ["$import bundle"],
                "network_def": {"_target_": "bundle.networks.DicycleGenerator", "ngf": 4, "n_blocks": 1},
            }
        ),
        encoding="utf-8",
    )
    verify_net_in_out(
        net_id="network_def", meta_file=str(ROOT / "configs" / "metadata.json"), config_file=str(config), device="cpu"
    )
