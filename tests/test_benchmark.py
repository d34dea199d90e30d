"""Smoke tests of scripts/benchmark.py: every command runs at a tiny size and prints its table (no timing checks)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from tests.bundle_fixtures import write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
# tiny networks and slices: seconds on a CPU
TINY = {"ngf": 4, "n_blocks": 1, "d_channels": 4, "spatial_size": [32, 32]}


@pytest.fixture(scope="module")
def benchmark():
    return importlib.import_module("scripts.benchmark")


def test_offset_conv_prints_its_table(benchmark, capsys):
    rows = benchmark.offset_conv(repeats=1)
    assert [row["input"] for row in rows] == ["64x128x128", "256x32x32"]
    assert "OffsetConv2d ms" in capsys.readouterr().out
    for row in rows:
        kernels = row["offset_conv_ms"] + row["sampling_ms"] + row["contraction_ms"]
        assert row["kernels_ratio"] == pytest.approx(kernels / row["plain_ms"])
        assert row["ratio"] == pytest.approx(row["offset_ms"] / row["plain_ms"])


def test_generator_prints_its_table(benchmark, capsys):
    figures = benchmark.generator(repeats=1, size=16, ngf=4, n_blocks=1)
    assert set(figures) == {"undeformed_ms", "deformed_ms", "both_separate_ms", "both_batched_ms"}
    assert "both passes, one batch of 2" in capsys.readouterr().out


def test_iteration_times_both_modes_of_both_presets(benchmark, capsys):
    timed = benchmark.iteration("paper,demo", repeats=1, warmup=0, overrides=TINY)
    assert set(timed) == {"paper", "demo"}
    assert all(set(modes) == {"DicycleGAN", "CycleGAN"} and min(modes.values()) > 0 for modes in timed.values())
    out = capsys.readouterr().out
    assert "Training iteration, paper size (ngf 4, 1 blocks, 32x32, batch 1, d_channels 4)" in out
    assert "x CycleGAN" in out and "<= 2.0x CycleGAN" in out
    assert "GFLOP" in out and "is the time ratio the DicycleGAN mode cannot beat" in out


def test_matrix_flop_of_the_dicyclegan_mode_exceeds_twice_the_generators(benchmark):
    """The deformed passes double every generator convolution and add the offset convolutions on top."""
    dicycle = benchmark.Iteration("demo", "DicycleGAN", TINY)
    cyclegan = benchmark.Iteration("demo", "CycleGAN", TINY)
    flop_dicycle, flop_cyclegan = dicycle.matrix_flop(), cyclegan.matrix_flop()
    assert flop_dicycle > flop_cyclegan > 0
    assert dicycle.matrix_flop() == flop_dicycle  # a count, not a timing: the same every iteration


def test_iteration_is_the_configs_training_step(benchmark):
    dicycle = benchmark.Iteration("demo", "DicycleGAN", TINY)
    cyclegan = benchmark.Iteration("demo", "CycleGAN", TINY)
    assert dicycle.trainer.g_ab.deformable and not cyclegan.trainer.g_ab.deformable
    assert cyclegan.trainer.loss_function.lambda_align == 0 and cyclegan.trainer.loss_function.lambda_dicyc == 0
    assert dicycle.trainer.loss_function.lambda_align == 0.9 and dicycle.trainer.loss_function.lambda_dicyc == 10
    before = dicycle.trainer.g_ab.model[1].weight.detach().clone()
    dicycle()
    assert not dicycle.trainer.g_ab.model[1].weight.detach().equal(before)  # the generator step updated it
    assert len(dicycle.trainer.pool_a.images) == 1  # the discriminator step drew from the image pool


def test_memory_measures_a_fresh_process_per_mode(benchmark, capsys):
    peaks = benchmark.memory("paper", iterations=1, overrides=TINY)
    assert set(peaks) == {"DicycleGAN", "CycleGAN"}
    assert all(r["peak_mb"] >= r["built_mb"] > 0 for r in peaks.values())
    assert "peak RSS MB" in capsys.readouterr().out


def test_loader_reads_the_configs_pipeline(benchmark, capsys, tmp_path):
    dataset = write_tiny_dataset(tmp_path / "data", shape=(40, 40, 12))
    overrides = {"spatial_size": [32, 32], "pixdim": [2, 2, 2], "num_workers": 0, "cache_workers": 1}
    rates = benchmark.loader(str(dataset), preset="demo", samples=4, overrides=overrides)
    assert rates["demo"]["samples_per_s"] > 0 and rates["demo"]["volumes"] == (2, 2)
    out = capsys.readouterr().out
    assert "samples/s" in out and str(dataset) in out and "existing" in out


def test_command_line_runs_a_command(benchmark, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["benchmark.py"])
    assert benchmark._command(benchmark.generator)(repeats=1, size=8, ngf=2, n_blocks=1) is None
    assert "undeformed G(x)" in capsys.readouterr().out


def test_inference_prints_its_stages(benchmark, capsys, monkeypatch, tmp_path):
    import bundle.networks

    small = bundle.networks.DicycleGenerator
    monkeypatch.setattr(bundle.networks, "DicycleGenerator", lambda: small(ngf=4, n_blocks=1))
    figures = benchmark.inference(dataset_dir=None, repeats=1)
    assert set(figures["fp32"]) >= {"load", "preprocess", "network", "invert", "save", "total"}
    assert figures["fp32"]["total"] >= figures["fp32"]["network"] > 0
    assert "net GFLOP/s" in capsys.readouterr().out


def test_explain_counts_no_graph_break_in_the_step(benchmark, capsys):
    counts = benchmark.explain(size=32, ngf=2, n_blocks=1)
    assert set(counts) >= {"undeformed pass G(x)", "deformed pass G_T(x)", "generator objective"}
    assert all(c == {"graphs": 1, "graph_breaks": 0} for c in counts.values()), counts
    assert "graph breaks" in capsys.readouterr().out


def test_bf16_is_timed_only_where_the_cpu_has_bf16_units(benchmark):
    problem = benchmark.cpu_bf16_problem()
    assert problem is None or "avx512_bf16" in problem
