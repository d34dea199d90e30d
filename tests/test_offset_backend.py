"""``OffsetConv2d``'s backend choice: torchvision's kernel only for CUDA tensors and only where it actually runs."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from bundle.deform_conv import torchvision_deform_conv2d_problem
from bundle.networks import OffsetConv2d


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, deform_conv2d) -> None:
    """Install a stand-in ``torchvision`` package whose ``ops.deform_conv2d`` is the given function."""
    package = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.deform_conv2d = deform_conv2d
    package.ops = ops
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.ops", ops)
    torchvision_deform_conv2d_problem.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_probe():
    torchvision_deform_conv2d_problem.cache_clear()
    yield
    torchvision_deform_conv2d_problem.cache_clear()


def _broken(*args, **kwargs):
    # what a CUDA build of torchvision raises beside a CPU torch
    raise RuntimeError("operator torchvision::nms does not exist")


def _layers() -> tuple[OffsetConv2d, OffsetConv2d, torch.Tensor]:
    torch.manual_seed(0)
    reference = OffsetConv2d(2, 3, 3, padding=1, backend="torch")
    with torch.no_grad():
        reference.offset_conv.weight.normal_(0, 0.3)
    auto = OffsetConv2d(2, 3, 3, padding=1, backend="auto")
    auto.load_state_dict(reference.state_dict())
    return reference, auto, torch.randn(1, 2, 7, 6)


def test_probe_reports_a_broken_torchvision(monkeypatch):
    _fake_torchvision(monkeypatch, _broken)
    assert torchvision_deform_conv2d_problem("cpu") == "RuntimeError: operator torchvision::nms does not exist"


def test_probe_reports_a_missing_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    assert torchvision_deform_conv2d_problem("cpu").startswith("ModuleNotFoundError")


def test_auto_backend_trains_beside_a_broken_torchvision(monkeypatch):
    """Before the fix, ``find_spec('torchvision')`` chose the broken kernel and training crashed."""
    _fake_torchvision(monkeypatch, _broken)
    reference, auto, x = _layers()
    torch.testing.assert_close(auto(x, deform=True), reference(x, deform=True), rtol=0, atol=0)


def test_auto_backend_keeps_cpu_tensors_on_the_torch_path(monkeypatch):
    calls = []

    def working(*args, **kwargs):
        calls.append(args[0].device.type)
        return torch.zeros(1, 1, 1, 1)

    _fake_torchvision(monkeypatch, working)
    reference, auto, x = _layers()
    torch.testing.assert_close(auto(x, deform=True), reference(x, deform=True), rtol=0, atol=0)
    assert calls == []  # not even probed for CPU tensors


def test_explicit_torchvision_backend_names_the_problem(monkeypatch):
    _fake_torchvision(monkeypatch, _broken)
    layer = OffsetConv2d(1, 1, 3, padding=1, backend="torchvision")
    with pytest.raises(RuntimeError, match=r"does not run on cpu here \(RuntimeError: operator torchvision::nms"):
        layer(torch.randn(1, 1, 5, 5), deform=True)
