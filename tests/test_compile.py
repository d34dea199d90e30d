"""The opt-in compiled path (``--compile true``, ``--cuda_graphs true``): which code path each setting selects, no
graph breaks in the step, and compiled results equal to eager ones at tiny size on the CPU.

Inductor compiles CPU kernels with a C++ compiler and is slow to do so (minutes for a whole training step on 2
cores), so only the inference graph is compiled by inductor here; the 20-iteration training comparison runs the same
dynamo + AOTAutograd graphs (forward and backward) with the ``aot_eager`` backend. ``scripts/benchmark.py compiled``
runs the inductor-compiled training step at paper and demo size.
"""

from __future__ import annotations

import pytest
import torch
from bundle.compilation import compile_options, compile_problem
from bundle.dicyclegan import DicycleGANLoss, DiscriminatorObjective, GeneratorObjective
from bundle.inference import Synthesis
from bundle.networks import DicycleGenerator, patch_discriminator
from bundle.trainer import DicycleGANTrainer, ImagePool
from monai.transforms import Compose

EPS32 = torch.finfo(torch.float32).eps
CPU_COMPILE_PROBLEM = compile_problem("cpu")  # e.g. no C++ compiler: the inductor test is skipped, saying why


def _generator(dtype: torch.dtype = torch.float32, seed: int = 0) -> DicycleGenerator:
    torch.manual_seed(seed)
    g = DicycleGenerator(ngf=4, n_blocks=1, backend="torch")
    with torch.no_grad():  # non-zero offsets, so the deformed pass samples between pixels
        for p in g.offset_parameters():
            p.normal_(0, 0.05)
    return g.to(dtype)


def test_compile_options_select_the_code_path(monkeypatch):
    assert compile_options("cpu", compile=False) is None  # the paper's eager step is the default
    if compile_problem("cpu") is None:
        assert compile_options("cpu", compile=True) == {"backend": "inductor", "dynamic": False}
    assert compile_options("cpu", compile=True, backend="aot_eager") == {"backend": "aot_eager", "dynamic": False}
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        compile_options("cpu", compile=True, cuda_graphs=True)
    # on CUDA (decided from the device alone, so testable here): CUDA graphs are inductor's reduce-overhead mode
    monkeypatch.setattr("bundle.compilation.compile_problem", lambda device: None)
    assert compile_options("cuda:0", compile=False, cuda_graphs=True) == {
        "backend": "inductor",
        "dynamic": False,
        "mode": "reduce-overhead",
    }
    with pytest.raises(ValueError, match="inductor backend"):
        compile_options("cuda:0", compile=True, cuda_graphs=True, backend="aot_eager")


def test_compile_without_a_cpp_compiler_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-c++")
    assert "no C++ compiler ('no-such-compiler-c++'" in compile_problem("cpu")
    with pytest.raises(RuntimeError, match=r"compile=True cannot run here: no C\+\+ compiler .* \(compile=False"):
        compile_options("cpu", compile=True)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        Synthesis(_generator(), Compose([]), compile=True)
    assert compile_options("cpu", compile=False) is None  # eager needs no toolchain


@pytest.mark.parametrize("deform", [False, True], ids=["undeformed", "deformed"])
def test_generator_passes_compile_without_graph_breaks(deform):
    g = _generator()
    torch._dynamo.reset()
    found = torch._dynamo.explain(g)(torch.randn(1, 1, 16, 16), deform=deform)
    torch._dynamo.reset()
    assert (found.graph_count, found.graph_break_count) == (1, 0), [str(b.reason) for b in found.break_reasons]


def test_training_objectives_compile_without_graph_breaks():
    g_ab, g_ba = _generator(seed=0), _generator(seed=1)
    d_a, d_b = patch_discriminator(channels=4, num_layers_d=2), patch_discriminator(channels=4, num_layers_d=2)
    x_a, x_b = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
    for module, args in (
        (GeneratorObjective(g_ab, g_ba, d_a, d_b, DicycleGANLoss()), (x_a, x_b)),
        (DiscriminatorObjective(d_a, d_b), (x_a, x_b, x_b, x_a)),
    ):
        torch._dynamo.reset()
        found = torch._dynamo.explain(module)(*args)
        assert (found.graph_count, found.graph_break_count) == (1, 0), [str(b.reason) for b in found.break_reasons]
    torch._dynamo.reset()


def _trainer(dtype: torch.dtype, **compile_settings) -> DicycleGANTrainer:
    """A tiny DicycleGAN trainer (16 x 16 slices: 2-layer PatchGANs) with the paper's loss, Adam settings and (small)
    image pools."""
    g_ab, g_ba = _generator(dtype, seed=0), _generator(dtype, seed=1)
    torch.manual_seed(2)
    d_a, d_b = (patch_discriminator(channels=4, num_layers_d=2).to(dtype) for _ in range(2))
    g_opt = torch.optim.Adam([*g_ab.parameters(), *g_ba.parameters()], 2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], 2e-4, betas=(0.5, 0.999))
    pools = ImagePool(4, seed=0), ImagePool(4, seed=1)
    return DicycleGANTrainer("cpu", 1, [], g_ab, g_ba, d_a, d_b, g_opt, d_opt, None, *pools, **compile_settings)


def _losses(trainer: DicycleGANTrainer, batches: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> dict:
    rows = [trainer._iteration(trainer, {k: v.to(dtype) for k, v in b.items()})[0]["losses"] for b in batches]
    return {name: torch.stack([row[name].double() for row in rows]) for name in rows[0]}


def test_compiled_training_gives_the_eager_losses_for_20_iterations():
    """20 seeded iterations (generator and discriminator steps, Adam, image pools) compiled and eager.

    Tolerance, derived from float32 arithmetic: float32 eager and compiled runs round differently (the compiled
    graph reorders and fuses operations), and Adam turns rounding noise in near-zero gradients into full-size steps,
    so no fixed number of ulps bounds a 20-step trajectory. Both float32 runs are therefore compared with the same
    run in float64 (rounding error ~1e-16): for every loss term, the compiled run's largest deviation from it must be
    at most 2x the largest deviation of eager float32 (float32's own uncertainty on this trajectory), plus 64 float32
    ulps of the term's magnitude. Measured: aot_eager within 1.0x of eager's deviation; inductor (scripts run, not in
    this test) up to 1.2x.
    """
    gen = torch.Generator().manual_seed(3)
    batches = [{d: torch.randn(1, 1, 16, 16, generator=gen) for d in "AB"} for _ in range(20)]
    reference = _losses(_trainer(torch.float64), batches, torch.float64)
    eager = _losses(_trainer(torch.float32), batches, torch.float32)
    compiled_trainer = _trainer(torch.float32, compile=True, compile_backend="aot_eager")
    compiled = _losses(compiled_trainer, batches, torch.float32)
    assert compiled_trainer._compiled and hasattr(compiled_trainer.generator_objective, "_orig_mod")
    assert set(compiled) == set(eager) >= {"total", "gan_ab", "align", "cyc", "dicyc", "d_a", "d_b"}
    for name in eager:
        eager_error = (eager[name] - reference[name]).abs().max()
        compiled_error = (compiled[name] - reference[name]).abs().max()
        tolerance = 2 * eager_error + 64 * EPS32 * reference[name].abs().max()
        assert compiled_error <= tolerance, (name, float(compiled_error), float(eager_error))
        assert torch.isfinite(compiled[name]).all()
    # the compiled run trained: its generator loss moved like the eager one's
    assert not torch.equal(compiled["total"][0], compiled["total"][-1])


def test_eager_is_the_default_step():
    trainer = _trainer(torch.float32)
    trainer._iteration(trainer, {d: torch.randn(1, 1, 16, 16) for d in "AB"})
    assert trainer.compile_options is None and not trainer._compiled
    assert isinstance(trainer.generator_objective, GeneratorObjective)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        _trainer(torch.float32, cuda_graphs=True)


@pytest.mark.skipif(CPU_COMPILE_PROBLEM is not None, reason=f"inductor cannot compile here: {CPU_COMPILE_PROBLEM}")
def test_compiled_synthesis_gives_the_eager_volume():
    """A volume synthesized with ``compile=True`` (inductor) and eagerly, against the float64 eager volume.

    Tolerance, derived from float32 arithmetic: the compiled volume's largest deviation from the float64 volume is at
    most 4x that of the eager float32 volume plus 64 float32 ulps of the volume's magnitude (fused kernels reorder
    the sums of each convolution and instance norm, which changes rounding by a small multiple of float32's).
    """
    network = _generator().eval()
    volume = torch.randn(1, 32, 32, 8, generator=torch.Generator().manual_seed(4))  # (C, X, Y, Z): 2 batches of 4
    eager = Synthesis(network, Compose([]), sw_batch_size=4).synthesize(volume)
    torch._dynamo.reset()
    synthesis = Synthesis(network, Compose([]), sw_batch_size=4, compile=True)
    compiled = synthesis.synthesize(volume)
    assert synthesis.inferer._compiled is not None and synthesis.inferer._compiled[0] is network
    torch._dynamo.reset()
    network64 = _generator(torch.float64).eval()
    with torch.no_grad():
        slices = volume.double().permute(3, 0, 1, 2)  # (Z, C, X, Y): the axial slices
        reference = network64(slices).permute(1, 2, 3, 0)
    assert compiled.shape == eager.shape == volume.shape and compiled.dtype == torch.float32
    eager_error = (eager.double() - reference).abs().max()
    compiled_error = (compiled.double() - reference).abs().max()
    assert compiled_error <= 4 * eager_error + 64 * EPS32 * reference.abs().max(), (compiled_error, eager_error)
    assert not torch.equal(compiled, torch.zeros_like(compiled))


# torch reads inductor's kernel templates in the locale's encoding; in the C locale (UTF-8 mode off) that is ASCII
_COMPILE_IN_THE_C_LOCALE = """
import locale
import torch
from bundle.compilation import load_inductor
locale.setlocale(locale.LC_CTYPE, "C")
assert locale.getpreferredencoding(False) == "ANSI_X3.4-1968"
load_inductor()
assert locale.setlocale(locale.LC_CTYPE) == "C", "load_inductor must restore the locale"
square = torch.compile(lambda x: (x * x).sum(), backend="aot_eager")
x = torch.arange(4.0, requires_grad=True)
square(x).backward()
assert x.grad.tolist() == [0.0, 2.0, 4.0, 6.0]
print("compiled")
"""


def test_compile_works_where_a_library_set_the_c_locale():
    """Found in the suite: once the C locale was in force, the first compile failed with a UnicodeDecodeError on
    inductor's templates (and the next with "duplicate template name")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUTF8": "0", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_IN_THE_C_LOCALE], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-2000:]
