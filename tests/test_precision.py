"""One precision setting: ``amp`` is bfloat16 autocast on the device in use, in training, validation, inference and
evaluation alike (bundle.settings.autocast), and MONAI's float16 CUDA autocast is never switched on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bundle.networks import DicycleGenerator
from bundle.settings import autocast
from bundle.trainer import DicycleGANTrainer
from monai.bundle import ConfigParser
from torch import nn

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Probe(nn.Module):
    """Records the dtype its matrix multiplications run in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        self.dtypes.append(out.dtype)
        return out


def _inferer(overlay: str, amp: str, item: str):
    parser = ConfigParser()
    parser.read_config(
        [str(CONFIGS / name) for name in (["train.json"] if overlay == "evaluate.json" else []) + [overlay]]
    )
    parser.update({"amp": amp, "device": "cpu", "ckpt_dir": "/nonexistent", "dataset_dir": "/nonexistent"})
    return parser.get_parsed_content(item)


@pytest.mark.parametrize(
    "overlay, item",
    [("inference.json", "synthesis"), ("train.json", "validate#inferer"), ("evaluate.json", "A2B#synthesis")],
)
@pytest.mark.parametrize("amp", ["true", "false"])
def test_every_stage_synthesizes_in_the_precision_of_amp(overlay, item, amp):
    inferer = _inferer(overlay, amp, item)
    inferer = getattr(inferer, "inferer", inferer)  # the synthesis component's inferer
    probe = _Probe()
    with torch.no_grad():
        out = inferer(torch.randn(1, 1, 6, 5, 3), probe)
    assert probe.dtypes and set(probe.dtypes) == {torch.bfloat16 if amp == "true" else torch.float32}
    assert out.dtype == torch.float32  # outputs always float32, whatever the precision


def test_validation_uses_the_synthesis_inferer_and_no_engine_autocast():
    train = json.loads((CONFIGS / "train.json").read_text(encoding="utf-8"))
    inference = json.loads((CONFIGS / "inference.json").read_text(encoding="utf-8"))
    assert train["validate"]["inferer"]["_target_"] == "bundle.inference.AxialSliceInferer"
    assert train["validate"]["evaluator"]["inferer"] == train["train"]["inferer"] == "@validate#inferer"
    assert inference["evaluator"]["inferer"] == "@inferer" and inference["inferer"] == "$@synthesis.inferer"
    for evaluator in (train["validate"]["evaluator"], inference["evaluator"]):
        assert "amp" not in evaluator  # MONAI's engine amp is float16 CUDA autocast: left off


@pytest.mark.parametrize("amp", [True, False])
def test_training_autocasts_with_the_same_setting(amp):
    probe = _Probe()
    generator = DicycleGenerator(ngf=4, n_blocks=1, backend="torch")
    trainer = DicycleGANTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=[],
        g_ab=generator,
        g_ba=generator,
        d_a=probe,
        d_b=probe,
        g_optimizer=torch.optim.SGD(probe.parameters(), lr=0.1),
        d_optimizer=torch.optim.SGD(probe.parameters(), lr=0.1),
        amp=amp,
    )
    with trainer._autocast():
        probe(torch.randn(1, 1, 4, 4))
    with autocast(amp, "cpu"):
        probe(torch.randn(1, 1, 4, 4))
    assert probe.dtypes == [torch.bfloat16 if amp else torch.float32] * 2


def test_bf16_is_an_alias_of_amp_for_inference():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"amp": False, "bf16": "true", "device": "cpu", "ckpt_dir": "/nonexistent"})
    assert parser.get_parsed_content("synthesis").inferer.amp is True
