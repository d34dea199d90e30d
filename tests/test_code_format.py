"""The model zoo's code-format check on this repository: ruff set up as the zoo's black, isort and flake8
(pyproject.toml names the zoo file of each setting), and the zoo's ``pretty-format-json`` on ``configs/*.json``.

To reformat the configs as the zoo's pre-commit hook (``pretty-format-json --autofix --no-sort-keys --indent=4``)
does, from the repository root::

    for f in configs/*.json; do .venv/bin/python -c "import json, sys; c = json.load(open(sys.argv[1])); \
open(sys.argv[1], 'w').write(json.dumps(c, indent=4) + '\\n')" "$f"; done
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CODE = ("bundle",)  # the Python that scripts/export_bundle.py copies into the zoo bundle


def zoo_json(text: str) -> str:
    """``text`` as the zoo's ``pretty-format-json --autofix --no-sort-keys --indent=4`` writes it."""
    return json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\n"


def _ruff(*args: str, source: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, input=source, capture_output=True, text=True, timeout=120
    )


def test_zoo_json_keeps_key_order_and_escapes_non_ascii() -> None:
    assert zoo_json('{"b": 1, "a": [1, 2], "unit": "\u00b5m"}') == (
        '{\n    "b": 1,\n    "a": [\n        1,\n        2\n    ],\n    "unit": "\\u00b5m"\n}\n'
    )
    formatted = zoo_json('{"x": {"y": true}}')
    assert zoo_json(formatted) == formatted


@pytest.mark.parametrize(
    "source, rule",
    [
        ("import SimpleITK as sitk\n", "N813"),  # pep8-naming
        ("def f(training_A: int) -> int:\n    return training_A\n", "N803"),
        ("import os\n\nx = 1\nimport sys\n\nprint(os, sys, x)\n", "E402"),  # pycodestyle
        ("import time\n\n\ndef f(t=time.time()):\n    return t\n", "B008"),  # bugbear
        ("x = {k: None for k in range(3)}\n", "C420"),  # comprehensions
        ("import torch\n\nfrom bundle import networks\nimport numpy\n\nprint(torch, networks, numpy)\n", "I001"),
        ("from pathlib import Path\n\nprint(Path('results.md').read_text())\n", "PLW1514"),  # ours: no locale
    ],
)
def test_ruff_lints_as_the_zoo_flake8_and_isort(source: str, rule: str) -> None:
    result = _ruff(
        "check", "--no-cache", "--output-format", "json", "--stdin-filename", "bundle/example.py", "-", source=source
    )
    # codes from the JSON report: with a preview rule selected, ruff's text report names rules instead of codes
    assert rule in {finding["code"] for finding in json.loads(result.stdout)}, result.stdout + result.stderr


def test_ruff_formats_as_black_with_skip_magic_trailing_comma() -> None:
    source = "x = f(\n    1,\n    2,\n)\n"  # black without the flag keeps this exploded (magic trailing comma)
    result = _ruff("format", "--no-cache", "--stdin-filename", "bundle/example.py", "-", source=source)
    assert result.returncode == 0 and result.stdout == "x = f(1, 2)\n", result.stderr


def test_ruff_sorts_the_bundles_own_packages_with_the_third_party_imports() -> None:
    """In the zoo a bundle lives in ``models/<name>/``: isort sorts its packages with the third-party imports."""
    source = "import torch\n\nfrom bundle import networks\n\nprint(torch, networks)\n"
    result = _ruff("check", "--no-cache", "--fix", "--stdin-filename", "bundle/example.py", "-", source=source)
    assert result.stdout == "import torch\nfrom bundle import networks\n\nprint(torch, networks)\n", result.stderr


def test_configs_are_formatted_as_the_zoo_wants() -> None:
    unformatted = [
        p.name
        for p in sorted((ROOT / "configs").glob("*.json"))
        if zoo_json(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")
    ]
    assert not unformatted, f"not in the zoo's JSON format (indent 4): {unformatted}"


def test_shipped_code_passes_the_zoo_format_and_lint() -> None:
    lint, layout = _ruff("check", "--no-cache", *SHIPPED_CODE), _ruff("format", "--check", "--no-cache", *SHIPPED_CODE)
    assert lint.returncode == 0 and layout.returncode == 0, lint.stdout + layout.stdout
