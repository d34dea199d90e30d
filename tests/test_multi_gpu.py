"""``configs/multi_gpu_train.json`` under ``torchrun``: two CPU processes on the gloo backend, tiny networks and data.

One distributed run (module fixture) is inspected from several angles through a probe config that each rank appends
to ``finalize``: it saves the rank's final weights, the sample ids its sampler gave, its iteration count, the
handlers attached to its trainer and its validation metrics. A single-process run with the global batch (2) is the
reference that data-parallel training must reproduce. Two further tests need no training: the override keeps every
``training``/``finalize`` step of train.json, and the paper schedule's early-stop decisions agree across ranks.

The trainer itself is also run in two gloo processes (``torch.multiprocessing``, no config): its steps are wrapped in
``DistributedDataParallel``, it equals one process with the global batch, a resumed run restores every rank's image
pools and equals an uninterrupted one, and a NaN on one rank stops every rank with the same error, not a hang.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bundle.handlers import PaperSchedule
from bundle.networks import DicycleGenerator, patch_discriminator
from ignite.engine import Engine
from tests.bundle_fixtures import BUNDLE_ROOT, TINY_OVERRIDES, bundle_command, bundle_env, write_tiny_dataset

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD_SIZE = 2
NETWORKS = ("g_ab", "g_ba", "d_a", "d_b")
RANK0_ONLY = {"ProgressBar", "StatsHandler", "TensorBoardStatsHandler", "TensorBoardImageGrid"}
TIMEOUT_S = 300  # a collective that one rank never joins hangs for gloo's 30 min; fail long before that

# each rank saves what it did; RANK comes from torchrun (the process group is gone when this runs)
PROBE_EXPRESSION = (
    "$torch.save({"
    "'sample_ids': list(@train#sampler), "
    "'iterations': @train#trainer.state.iteration, "
    "'handlers': [type(h).__name__ for h in @train#trainer#train_handlers], "
    "'val_batches': len(@validate#dataloader), "
    "'val_metrics': dict(@validate#evaluator.state.metrics), "
    "'networks': {name: net.state_dict() for name, net in zip(%s, [@g_ab, @g_ba, @d_a, @d_b])}"
    "}, os.path.join(%r, f\"rank{os.environ.get('RANK', 'single')}.pt\"))"
)


def _probe_config(path: Path, out_dir: Path) -> Path:
    path.write_text(json.dumps({"+finalize": [PROBE_EXPRESSION % (list(NETWORKS), str(out_dir))]}), encoding="utf-8")
    return path


def _run(args: list[str], cwd: Path) -> str:
    """Run ``python *args`` in its own session; returns stdout + stderr. On timeout the whole session (torchrun and
    its workers) is killed, so no rank is left waiting in a collective."""
    with subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=bundle_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",  # progress bars
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            pytest.fail(f"no result after {TIMEOUT_S} s (a rank waiting in a collective?)\n{output[-6000:]}")
    assert process.returncode == 0, f"exit code {process.returncode}\n{output[-6000:]}"
    return output


def _overrides(tmp: Path, name: str, **extra: str) -> dict[str, str]:
    # pool_size 0: the image pool is per rank, so only without it is 2 ranks x batch 1 the same as 1 x batch 2
    return {
        **TINY_OVERRIDES,
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(tmp / "data"),
        "ckpt_dir": str(tmp / name / "models"),
        "output_dir": str(tmp / name / "runs"),
        "pool_size": "0",
        **extra,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-rank torchrun of train.json + multi_gpu_train.json, and the same training in one process, batch 2."""
    tmp = tmp_path_factory.mktemp("multi_gpu")
    write_tiny_dataset(tmp / "data")
    train = str(BUNDLE_ROOT / "configs/train.json")
    multi_gpu = str(BUNDLE_ROOT / "configs/multi_gpu_train.json")

    ddp_cwd = tmp / "ddp_cwd"  # the working directory: anything written outside the configured folders shows up here
    ddp_cwd.mkdir()
    probe = _probe_config(tmp / "probe_ddp.json", tmp / "ddp_probe")
    (tmp / "ddp_probe").mkdir()
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
    _run(
        [*torchrun, *bundle_command([train, multi_gpu, str(probe)], _overrides(tmp, "ddp", val_interval="1"))],
        cwd=ddp_cwd,
    )

    probe_single = _probe_config(tmp / "probe_single.json", tmp / "single_probe")
    (tmp / "single_probe").mkdir()
    _run(bundle_command([train, str(probe_single)], _overrides(tmp, "single", batch_size="2")), cwd=tmp)

    def load(path: Path) -> dict[str, Any]:
        return torch.load(path, weights_only=True)

    return {
        "tmp": tmp,
        "ddp_cwd": ddp_cwd,
        "ranks": [load(tmp / "ddp_probe" / f"rank{rank}.pt") for rank in range(WORLD_SIZE)],
        "single": load(tmp / "single_probe" / "ranksingle.pt"),
    }


def _build(name: str) -> torch.nn.Module:
    return DicycleGenerator(ngf=4, n_blocks=1) if name.startswith("g") else patch_discriminator(channels=4)


def test_rank0_writes_the_models_and_the_resume_checkpoint(runs):
    models = runs["tmp"] / "ddp" / "models"
    assert {"model.pt", "model_g_ba.pt", "checkpoint.pt", "model_best.pt"} <= {p.name for p in models.iterdir()}
    assert not [p for p in models.iterdir() if p.name.startswith("tmp")], "a temporary checkpoint file was left"
    final = runs["ranks"][0]["networks"]
    for filename, name in (("model.pt", "g_ab"), ("model_g_ba.pt", "g_ba")):
        generator = DicycleGenerator(ngf=4, n_blocks=1)
        generator.load_state_dict(torch.load(models / filename, weights_only=True))  # strict: the bare state dict
        assert all(torch.equal(value, final[name][key]) for key, value in generator.state_dict().items())
    checkpoint = torch.load(models / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == len(runs["ranks"][0]["sample_ids"])  # the iterations of one rank
    for pool in ("pool_a", "pool_b"):  # the image pool of every rank, each with its own random state
        assert len(checkpoint[pool]["ranks"]) == WORLD_SIZE
        generators = [state["generator"] for state in checkpoint[pool]["ranks"]]
        assert not torch.equal(*generators), f"{pool}: the ranks draw from the same random stream"


def test_every_rank_ends_with_the_same_weights(runs):
    rank0, rank1 = (probe["networks"] for probe in runs["ranks"])
    for name in NETWORKS:
        different = [key for key in rank0[name] if not torch.equal(rank0[name][key], rank1[name][key])]
        assert not different, f"{name}: ranks diverged in {different} (gradients not synchronised)"


def test_data_parallel_training_equals_one_process_with_the_global_batch(runs):
    """2 ranks x batch 1 with averaged gradients is the same optimisation as 1 process x batch 2.

    Compared by the networks' outputs: conv biases in front of InstanceNorm have a true gradient of 0, so their
    values after Adam follow rounding noise, which differs between the two runs but changes no output.
    """
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    for name in NETWORKS:
        ddp, single, initial = _build(name), _build(name), _build(name)
        ddp.load_state_dict(runs["ranks"][0]["networks"][name])
        single.load_state_dict(runs["single"]["networks"][name])
        passes = (
            [lambda g: g(x, deform=False), lambda g: g(x, deform=True)]
            if name.startswith("g")
            else [lambda d: d(x)[-1]]
        )
        with torch.no_grad():
            for forward in passes:
                out_ddp, out_single = forward(ddp), forward(single)
                torch.testing.assert_close(out_ddp, out_single, atol=1e-5, rtol=1e-4, msg=f"{name} differs")
                assert (out_ddp - forward(initial)).abs().max() > 1e-2, f"{name} did not train"


def test_each_rank_trains_on_its_own_shard_of_the_epoch(runs):
    shards = [set(probe["sample_ids"]) for probe in runs["ranks"]]
    samples = int(TINY_OVERRIDES["samples_per_epoch"])
    assert [len(shard) for shard in shards] == [samples // WORLD_SIZE] * WORLD_SIZE
    assert not shards[0] & shards[1]
    union = shards[0] | shards[1]
    assert union == set(range(min(union), min(union) + samples))  # together: exactly one epoch's sample ids
    assert [probe["iterations"] for probe in runs["ranks"]] == [samples // WORLD_SIZE] * WORLD_SIZE


def test_only_rank0_logs_saves_and_shows_progress(runs):
    rank0, rank1 = (set(probe["handlers"]) for probe in runs["ranks"])
    assert rank0 >= RANK0_ONLY
    assert not rank1 & RANK0_ONLY
    assert rank0 - RANK0_ONLY == rank1  # the schedule and validation run everywhere
    assert {"PaperSchedule", "ValidationHandler", "AtomicCheckpointer"} <= rank1  # saving gathers every pool
    events = list((runs["tmp"] / "ddp" / "runs").glob("events.out.tfevents.*"))
    assert len(events) == 1, f"one TensorBoard event file expected, got {events}"
    assert not list(runs["ddp_cwd"].iterdir()), "a rank wrote into the working directory"


def test_validation_is_sharded_and_its_metrics_agree_across_ranks(runs):
    rank0, rank1 = runs["ranks"]
    assert rank0["val_batches"] == rank1["val_batches"] == 1  # 2 validation volumes, one per rank
    assert rank0["val_metrics"] and rank0["val_metrics"] == rank1["val_metrics"]


def test_multi_gpu_training_and_finalize_keep_every_step_of_train_json():
    """The override replaces ``training`` and ``finalize`` (the process group must exist first): every step of
    train.json must still be there, in the same order."""
    train = json.loads((BUNDLE_ROOT / "configs/train.json").read_text(encoding="utf-8"))
    multi_gpu = json.loads((BUNDLE_ROOT / "configs/multi_gpu_train.json").read_text(encoding="utf-8"))
    for section in ("training", "finalize"):
        steps = iter(multi_gpu[section])
        missing = [step for step in train[section] if step not in steps]  # `in` consumes: an ordered subsequence
        assert not missing, f"multi_gpu_train.json {section} lacks (or reorders) {missing}"
    assert multi_gpu["training"].index("$dist.is_initialized() or dist.init_process_group(backend=@backend)") < (
        multi_gpu["training"].index(train["training"][0])
    )
    # rank 0 still writes the checkpoints when the other ranks finish; a rank that tears its process group down
    # and exits meanwhile was seen to abort ("terminate called without an active exception"): all leave together
    barrier = multi_gpu["finalize"].index("$ignite.distributed.barrier() if dist.is_initialized() else None")
    assert barrier < multi_gpu["finalize"].index("$ignite.distributed.finalize() if dist.is_initialized() else None")


# epoch losses of each rank's shard: rank 0 stalls at epoch 2, rank 1 improves; their mean improves, then stalls
SHARD_LOSSES = ([1.0, 3.0, 3.0, 3.0, 3.0, 3.0], [3.0, 0.5, 0.5, 0.5, 0.5, 0.5])


def _schedule_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    """Run the paper schedule with patience 1 on this rank's losses; save where its decay started and its lr."""
    timeout = datetime.timedelta(seconds=60)  # a rank left alone in a collective fails instead of hanging
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE, timeout=timeout
    )
    try:
        idist.sync()
        losses = SHARD_LOSSES[rank]
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        engine = Engine(lambda engine, _: [{"losses": {"total": torch.tensor(losses[engine.state.epoch - 1])}}])
        schedule = PaperSchedule([optimizer], n_epochs=4, n_epochs_decay=2, patience=1, patience_decay=0)
        schedule.attach(engine)
        engine.run(range(2), max_epochs=len(losses))
        result = {
            "decay_start": schedule.decay_start,
            "epochs": engine.state.epoch,
            "lr": optimizer.param_groups[0]["lr"],
        }
        torch.save(result, Path(out_dir) / f"schedule{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_schedule_decides_on_the_loss_of_all_ranks(tmp_path):
    """Early stop under DDP: every rank must start the decay (and stop) at the same epoch, decided on the mean loss
    of all ranks; on its own shard's loss rank 0 would start the decay at epoch 2 and stop one epoch early."""
    mp.spawn(_schedule_on_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"schedule{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    assert results[0] == results[1]
    assert results[0]["decay_start"] == 3  # mean losses 2.0, 1.75, 1.75: no improvement at epoch 3


# --- the trainer itself under DDP: 2 gloo processes (torch.multiprocessing), tiny networks, no config ---

SPAWN_TIMEOUT_S = 240  # the whole 2-process run; a rank left alone in a collective fails after GLOO_TIMEOUT
GLOO_TIMEOUT = datetime.timedelta(seconds=45)
N_SAMPLES = 4  # two iterations per epoch per rank with batch 1, one iteration of batch 2 in one process


def _spawn(fn: Any, args: tuple, timeout_s: float = SPAWN_TIMEOUT_S) -> None:
    """``fn(rank, *args)`` in WORLD_SIZE processes; kills them and fails the test if they are not done in time."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks were not done after {timeout_s} s (one waiting in a collective?)")


def _init_rank(rank: int, tmp: Path) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=WORLD_SIZE, timeout=GLOO_TIMEOUT
    )


def _tiny_trainer(
    loader: Any, max_epochs: int, pool_size: int, rank: int = 0, ckpt_dir: Path | None = None, resume: bool = False
) -> tuple[Any, dict[str, Any]]:
    """A tiny DicycleGAN trainer (same initial weights on every rank), optionally saving to / resuming from
    ``ckpt_dir``; returns the trainer and its resumable state."""
    from bundle.dicyclegan import DicycleGANLoss
    from bundle.handlers import AtomicCheckpointer, ResumeCheckpointLoader
    from bundle.trainer import DicycleGANTrainer, ImagePool

    torch.manual_seed(0)
    g_ab, g_ba = (DicycleGenerator(ngf=4, n_blocks=1, backend="torch") for _ in range(2))
    d_a, d_b = patch_discriminator(channels=4), patch_discriminator(channels=4)
    with torch.no_grad():  # non-zero offsets: the deformed passes differ from the aligned ones from the first step
        for p in g_ab.offset_parameters() + g_ba.offset_parameters():
            p.normal_(0, 0.01)
    g_opt = torch.optim.Adam([*g_ab.parameters(), *g_ba.parameters()], lr=1e-3, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=1e-3, betas=(0.5, 0.999))
    pools = {"pool_a": ImagePool(pool_size, seed=10 + 2 * rank), "pool_b": ImagePool(pool_size, seed=11 + 2 * rank)}
    trainer = DicycleGANTrainer(
        "cpu", max_epochs, loader, g_ab, g_ba, d_a, d_b, g_opt, d_opt, DicycleGANLoss(), **pools
    )
    state = {"g_ab": g_ab, "g_ba": g_ba, "d_a": d_a, "d_b": d_b, "g_optimizer": g_opt, "d_optimizer": d_opt, **pools}
    if resume:
        ResumeCheckpointLoader(ckpt_dir / "checkpoint.pt", state).attach(trainer)
    if ckpt_dir is not None:
        AtomicCheckpointer(ckpt_dir, {"model.pt": g_ab}, state).attach(trainer)
    return trainer, state


def _shard_loader(rank: int, world_size: int, nan_at: int | None = None) -> torch.utils.data.DataLoader:
    from tests.test_trainer import SyntheticUnpairedSlices

    dataset = SyntheticUnpairedSlices(N_SAMPLES, nan_at=nan_at)
    shard = torch.utils.data.Subset(dataset, range(rank, N_SAMPLES, world_size))  # rank r: samples r, r + 2, ...
    return torch.utils.data.DataLoader(shard, batch_size=1, shuffle=False)


def _weights(state: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in state[name].state_dict().items()} for name in NETWORKS}


def _pools(state: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
    return {name: [image.clone() for image in state[name].images] for name in ("pool_a", "pool_b")}


def _train_on_rank(rank: int, tmp: Path) -> None:
    """Per rank: 2 epochs straight; 1 epoch, checkpoint, then new objects resumed for epoch 2; 2 epochs without pool.
    In float64, so that comparisons with one process see the arithmetic, not float32 rounding of another order."""
    _init_rank(rank, tmp)
    torch.set_default_dtype(torch.float64)
    try:
        straight, straight_state = _tiny_trainer(_shard_loader(rank, WORLD_SIZE), 2, pool_size=2, rank=rank)
        straight.run()
        first, _ = _tiny_trainer(_shard_loader(rank, WORLD_SIZE), 1, pool_size=2, rank=rank, ckpt_dir=tmp / "ckpt")
        first.run()
        resumed, resumed_state = _tiny_trainer(
            _shard_loader(rank, WORLD_SIZE), 2, pool_size=2, rank=rank, ckpt_dir=tmp / "ckpt", resume=True
        )
        resumed.run()
        no_pool, no_pool_state = _tiny_trainer(_shard_loader(rank, WORLD_SIZE), 2, pool_size=0, rank=rank)
        no_pool.run()
        result = {
            "wrapped": type(straight.generator_objective).__name__,
            "straight": _weights(straight_state),
            "straight_pools": _pools(straight_state),
            "resumed": _weights(resumed_state),
            "resumed_pools": _pools(resumed_state),
            "no_pool": _weights(no_pool_state),
            "no_pool_loss": float(no_pool.state.output[0]["loss"]),
        }
        torch.save(result, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ddp_trainer")
    _spawn(_train_on_rank, (tmp,))
    ranks = [torch.load(tmp / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    return {"tmp": tmp, "ranks": ranks}


def test_trainer_wraps_its_steps_in_ddp_and_every_rank_ends_with_the_same_weights(trainer_runs):
    rank0, rank1 = trainer_runs["ranks"]
    assert rank0["wrapped"] == rank1["wrapped"] == "DistributedDataParallel"
    for run in ("straight", "resumed", "no_pool"):
        for name in NETWORKS:
            for key, value in rank0[run][name].items():
                assert torch.equal(value, rank1[run][name][key]), f"{run}: {name}.{key} differs between the ranks"


def test_trainer_under_ddp_equals_one_process_with_the_global_batch(trainer_runs):
    """2 ranks x batch 1 (no pool: each rank has its own) against 1 process x batch 2, same samples; compared by the
    networks' outputs (conv biases in front of InstanceNorm have no true gradient and follow rounding noise). Both
    train in float64: the ranks sum the gradients in another order than one process, and Adam turns the rounding of
    near-zero gradients into steps of the full learning rate, so in float32 the two end 1.2e-2 apart on an AMD EPYC
    (2e-6 on an Intel Xeon); in float64 they end 2.1e-15 apart there, and 1e-8 leaves a wide margin above that."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loader = torch.utils.data.DataLoader(_shard_loader(0, 1).dataset, batch_size=WORLD_SIZE, shuffle=False)
        single, single_state = _tiny_trainer(loader, 2, pool_size=0)
        initial = _tiny_trainer(loader, 2, pool_size=0)[1]
        # one thread, as the ranks: a multi-threaded reduction rounds differently, and Adam amplifies that over the
        # steps (found in CI, where pytest runs on 2 threads: 3e-3 apart instead of 2e-6)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single.run()
        finally:
            torch.set_num_threads(threads)
        assert type(single.generator_objective).__name__ == "GeneratorObjective"  # no process group: no DDP
        torch.manual_seed(1)
        x = torch.randn(2, 1, 32, 32)
        for name in NETWORKS:
            ddp, reference = _build(name), single_state[name]
            ddp.load_state_dict(trainer_runs["ranks"][0]["no_pool"][name])
            passes = (
                [lambda g: g(x, deform=False), lambda g: g(x, deform=True)] if name[0] == "g" else [lambda d: d(x)[-1]]
            )
            with torch.no_grad():
                for forward in passes:
                    torch.testing.assert_close(
                        forward(ddp), forward(reference), atol=1e-8, rtol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
                    )
                    assert (forward(ddp) - forward(initial[name])).abs().max() > 1e-3, f"{name} did not train"
        # the last step's generator loss of rank 0 is that of its own sample, of the same magnitude as the batch's
        assert 0.2 < trainer_runs["ranks"][0]["no_pool_loss"] / float(single.state.output[0]["loss"]) < 5.0
    finally:
        torch.set_default_dtype(dtype)


def test_resumed_ddp_run_equals_an_uninterrupted_one_with_every_rank_pool(trainer_runs):
    checkpoint = torch.load(trainer_runs["tmp"] / "ckpt" / "checkpoint.pt", weights_only=True)
    for pool in ("pool_a", "pool_b"):
        assert len(checkpoint[pool]["ranks"]) == WORLD_SIZE
        assert [len(state["images"]) for state in checkpoint[pool]["ranks"]] == [2, 2]  # each rank's own fakes
        assert not torch.equal(*(state["images"] for state in checkpoint[pool]["ranks"]))
    for rank, result in enumerate(trainer_runs["ranks"]):
        for pool, images in result["straight_pools"].items():
            assert len(images) == len(result["resumed_pools"][pool]) == 2
            for straight, resumed in zip(images, result["resumed_pools"][pool], strict=True):
                torch.testing.assert_close(resumed, straight, rtol=0, atol=0, msg=f"rank {rank}: {pool}")
        for name in NETWORKS:
            for key, value in result["straight"][name].items():
                torch.testing.assert_close(result["resumed"][name][key], value, msg=f"rank {rank}: {name}.{key}")


def _nan_on_rank1(rank: int, tmp: Path) -> None:
    """Rank 1's second sample holds a NaN (its 2nd iteration); every rank records how its training ended."""
    _init_rank(rank, tmp)
    try:
        trainer, state = _tiny_trainer(_shard_loader(rank, WORLD_SIZE, nan_at=3), 2, pool_size=2, rank=rank)
        try:
            trainer.run()
            ended = {"error": None, "message": ""}
        except Exception as error:  # recorded for the test: FloatingPointError expected, a timeout is a failure
            ended = {"error": type(error).__name__, "message": str(error)}
        ended["iteration"] = trainer.state.iteration
        ended["weights"] = _weights(state)
        torch.save(ended, tmp / f"nan{rank}.pt")
        # both ranks leave together: a rank that exits while the other still tears down its gloo pairs aborted it
        # (rank 0 ended with SIGABRT once, in a full run on a loaded machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_nan_on_one_rank_stops_every_rank_without_a_hang(tmp_path):
    _spawn(_nan_on_rank1, (tmp_path,))  # a rank left waiting ends with gloo's timeout error, not FloatingPointError
    rank0, rank1 = (torch.load(tmp_path / f"nan{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE))
    for result in (rank0, rank1):
        assert result["error"] == "FloatingPointError", result["message"]
        assert "non-finite generator loss at epoch 1, iteration 2" in result["message"]
        assert result["iteration"] == 2
    assert "total=nan" in rank1["message"] and "on rank 1" in rank1["message"]
    assert "on rank(s) other than 0" in rank0["message"]
    for name in NETWORKS:  # no rank made the update of iteration 2
        for key, value in rank0["weights"][name].items():
            assert torch.equal(value, rank1["weights"][name][key]), f"{name}.{key} differs between the ranks"
