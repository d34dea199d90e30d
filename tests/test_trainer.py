"""DicycleGANTrainer, its image pool and handlers, on tiny networks and synthetic unpaired slices."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from bundle.dicyclegan import DicycleGANLoss
from bundle.handlers import AtomicCheckpointer, PaperSchedule, ResumeCheckpointLoader, TensorBoardImageGrid, TimeBudget
from bundle.networks import DicycleGenerator, patch_discriminator
from bundle.trainer import DicycleGANTrainer, ImagePool, prepare_unpaired_batch
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader, Dataset

SIZE = 32


class SyntheticUnpairedSlices(Dataset):
    """Fixed random 'A' and 'B' slices (B is a brighter, shifted copy of other A slices: unpaired)."""

    def __init__(self, length: int = 4, nan_at: int | None = None) -> None:
        gen = torch.Generator().manual_seed(123)
        self.a = torch.randn(length, 1, SIZE, SIZE, generator=gen)
        self.b = torch.roll(torch.randn(length, 1, SIZE, SIZE, generator=gen), 3, dims=-1) * 2 + 1
        if nan_at is not None:
            self.a[nan_at, 0, 5, 5] = float("nan")

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"A": self.a[index], "B": self.b[index]}


def build(
    tmp_path,
    deformable: bool = True,
    max_epochs: int = 2,
    dataset: Dataset | None = None,
    resume=False,
    lr: float = 2e-4,
    schedule_kwargs: dict | None = None,
):
    torch.manual_seed(0)
    g_ab = DicycleGenerator(ngf=4, n_blocks=1, deformable=deformable, backend="torch")
    g_ba = DicycleGenerator(ngf=4, n_blocks=1, deformable=deformable, backend="torch")
    d_a, d_b = patch_discriminator(channels=4), patch_discriminator(channels=4)
    # small non-zero offsets so that the deformed passes differ from the undeformed ones from the first step
    with torch.no_grad():
        for p in g_ab.offset_parameters() + g_ba.offset_parameters():
            p.normal_(0, 0.01)
    g_opt = torch.optim.Adam(itertools.chain(g_ab.parameters(), g_ba.parameters()), lr=lr, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(itertools.chain(d_a.parameters(), d_b.parameters()), lr=lr, betas=(0.5, 0.999))
    loss = DicycleGANLoss() if deformable else DicycleGANLoss(lambda_align=0.0, lambda_dicyc=0.0)
    loader = DataLoader(dataset or SyntheticUnpairedSlices(), batch_size=2, shuffle=False)
    pools = {"pool_a": ImagePool(3, seed=7), "pool_b": ImagePool(3, seed=8)}
    trainer = DicycleGANTrainer("cpu", max_epochs, loader, g_ab, g_ba, d_a, d_b, g_opt, d_opt, loss, **pools)
    # by default epoch 2 runs at 3/4 of the rate
    schedule = PaperSchedule([g_opt, d_opt], **(schedule_kwargs or {"n_epochs": 1, "n_epochs_decay": 3}))
    state = {
        "g_ab": g_ab,
        "g_ba": g_ba,
        "d_a": d_a,
        "d_b": d_b,
        "g_optimizer": g_opt,
        "d_optimizer": d_opt,
        **pools,
        "schedule": schedule,
    }
    if resume:
        ResumeCheckpointLoader(tmp_path / "checkpoint.pt", state).attach(trainer)
    schedule.attach(trainer)
    AtomicCheckpointer(tmp_path, {"model.pt": g_ab, "model_g_ba.pt": g_ba}, state).attach(trainer)
    return trainer, state


def _parameters(state) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("g_ab", "g_ba", "d_a", "d_b")
        for key, value in state[name].state_dict().items()
    }


def test_image_pool_fills_then_mixes_and_resumes_identically():
    pool = ImagePool(pool_size=3, seed=0)
    first = [torch.full((1, 1, 2, 2), float(i)) for i in range(3)]
    for image in first:  # while filling, every query returns its input
        torch.testing.assert_close(pool.query(image), image)
    seen_old = False
    for i in range(3, 30):
        out = pool.query(torch.full((1, 1, 2, 2), float(i)))
        assert out.shape == (1, 1, 2, 2)
        assert float(out[0, 0, 0, 0]) <= i  # either the new image or an older one
        seen_old |= float(out[0, 0, 0, 0]) < i
    assert seen_old
    state = pool.state_dict()
    twin = ImagePool(pool_size=3, seed=99)
    twin.load_state_dict(state)
    for i in range(30, 40):
        image = torch.full((1, 1, 2, 2), float(i))
        torch.testing.assert_close(pool.query(image), twin.query(image))


def test_image_pool_of_size_zero_passes_images_through():
    images = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(ImagePool(0).query(images), images)


def test_prepare_batch_names_the_expected_keys():
    with pytest.raises(ValueError, match="keys 'A' and 'B', got \\['image'\\]"):
        prepare_unpaired_batch({"image": torch.zeros(1)}, "cpu")


@pytest.mark.parametrize("deformable", [True, False])
def test_one_epoch_updates_every_network_and_reports_every_term(tmp_path, deformable):
    trainer, state = build(tmp_path, deformable=deformable, max_epochs=1)
    before = _parameters(state)
    trainer.run()
    after = _parameters(state)
    for network in ("g_ab", "g_ba", "d_a", "d_b"):
        changed = [k for k in before if k.startswith(network) and not torch.equal(before[k], after[k])]
        assert changed, f"{network} was not updated"
    losses = trainer.state.output[0]["losses"]
    assert set(losses) == {"gan_ab", "gan_ba", "align", "cyc", "dicyc", "nmi_a", "nmi_b", "total", "d_a", "d_b"}
    assert all(math.isfinite(float(v)) for v in losses.values())
    images = trainer.state.output[0]["images"]
    assert images["fake_b"].shape == images["real_a"].shape == (2, 1, SIZE, SIZE)
    if deformable:  # the discriminator sees the deformed output, which differs from the aligned one
        assert not torch.allclose(images["fake_b"], images["aligned_b"])
    else:
        torch.testing.assert_close(images["fake_b"], images["aligned_b"])


def test_checkpoint_files_hold_bare_generators_and_everything_to_resume(tmp_path):
    trainer, state = build(tmp_path, max_epochs=1)
    trainer.run()
    model = DicycleGenerator(ngf=4, n_blocks=1, backend="torch")
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))  # strict: a bare state_dict
    for key, value in state["g_ab"].state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    other = DicycleGenerator(ngf=4, n_blocks=1, backend="torch")
    other.load_state_dict(torch.load(tmp_path / "model_g_ba.pt", weights_only=True))
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(checkpoint) == set(state) | {"trainer"}
    assert checkpoint["trainer"]["iteration"] == 2  # one epoch of two batches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "model.pt", "model_g_ba.pt"]


def test_two_epochs_equal_one_epoch_resume_and_one_more(tmp_path):
    straight, straight_state = build(tmp_path / "straight", max_epochs=2)
    straight.run()

    first, _ = build(tmp_path / "resumed", max_epochs=1)
    first.run()
    # a new process: new objects, everything restored from the checkpoint of epoch 1
    second, second_state = build(tmp_path / "resumed", max_epochs=2, resume=True)
    second.run()

    assert second.state.epoch == straight.state.epoch == 2
    expected, got = _parameters(straight_state), _parameters(second_state)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_time_budget_stops_after_the_iteration_that_crosses_it_and_saves_that_iteration(tmp_path):
    readings = iter(float(t) for t in range(100))  # each reading of the clock is one second later
    trainer, state = build(tmp_path, max_epochs=5)
    TimeBudget(limit_s=3, clock=lambda: next(readings)).attach(trainer)
    trainer.run()
    # started at t=0; iterations end at t=1, 2, 3: the third reaches the budget, mid-way through epoch 2
    assert (trainer.state.iteration, trainer.state.epoch) == (3, 2)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 3
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    for key, value in state["g_ab"].state_dict().items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="time_limit_s must be a positive number of seconds, got 0"):
        TimeBudget(0)


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_checkpoint(tmp_path):
    trainer, _ = build(tmp_path, max_epochs=1)
    trainer.run()
    saved = (tmp_path / "checkpoint.pt").read_bytes()

    bad, bad_state = build(tmp_path, max_epochs=2, dataset=SyntheticUnpairedSlices(nan_at=2), resume=True)
    before = _parameters(bad_state)
    with pytest.raises(FloatingPointError, match="non-finite generator loss at epoch 2, iteration 4"):
        bad.run()
    # iteration 3 (a finite batch) updated the weights, iteration 4 was refused before its update
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    assert any(not torch.equal(before[k], v) for k, v in _parameters(bad_state).items())


@pytest.mark.parametrize(
    "how, lr, max_epochs, schedule_kwargs, stop_epoch, message",
    [
        # lr 0: the generator loss repeats exactly, so epoch 2 is stale and the plateau rule stops (patience_decay 1)
        ("plateau", 0.0, 4, {"n_epochs": 0, "n_epochs_decay": 5, "patience_decay": 1}, 2, "no improvement for 1"),
        ("decay complete", 2e-4, 4, {"n_epochs": 1, "n_epochs_decay": 1}, 2, "decay was complete after epoch 2"),
        ("all epochs", 2e-4, 2, {"n_epochs": 1, "n_epochs_decay": 3}, 2, "all 2 epochs done"),
    ],
)
def test_resuming_a_finished_run_says_so_and_touches_nothing(
    tmp_path, caplog, how, lr, max_epochs, schedule_kwargs, stop_epoch, message
):
    trainer, state = build(tmp_path, max_epochs=max_epochs, lr=lr, schedule_kwargs=schedule_kwargs)
    trainer.run()
    trained = _parameters(state)
    assert trainer.state.epoch == stop_epoch, how
    files = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert set(files) == {"checkpoint.pt", "model.pt", "model_g_ba.pt"}

    resumed, resumed_state = build(tmp_path, max_epochs=max_epochs, resume=True, lr=lr, schedule_kwargs=schedule_kwargs)
    with caplog.at_level(logging.INFO, logger="bundle.handlers"):
        resumed.run()
    assert resumed.state.epoch == stop_epoch and resumed.state.iteration == 2 * stop_epoch  # nothing trained
    finished = [r.getMessage() for r in caplog.records if "training had already finished" in r.getMessage()]
    assert len(finished) == 1 and message in finished[0], finished
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == files  # byte-identical, nothing new
    after = _parameters(resumed_state)  # the finished run's weights, restored and not trained further
    assert all(torch.equal(trained[key], after[key]) for key in trained)


def test_corrupt_resume_checkpoint_gives_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    trainer, _ = build(tmp_path, max_epochs=1, resume=True)
    with pytest.raises(RuntimeError, match=r"cannot resume from .*checkpoint\.pt: it is not a readable"):
        trainer.run()
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_missing_resume_checkpoint_is_named(tmp_path):
    trainer, _ = build(tmp_path, max_epochs=1, resume=True)
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*checkpoint\.pt does not exist"):
        trainer.run()


def _constant_loss_engine(losses_per_epoch: list[float], epoch_length: int = 2) -> Engine:
    def step(engine, _):
        return [{"losses": {"total": torch.tensor(losses_per_epoch[engine.state.epoch - 1])}}]

    engine = Engine(step)
    engine.state.epoch_length = epoch_length
    return engine


def test_schedule_is_constant_then_linear_decay():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=2e-4)
    schedule = PaperSchedule([optimizer], n_epochs=2, n_epochs_decay=3, patience=0, patience_decay=0)
    engine = _constant_loss_engine([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    schedule.attach(engine)
    lrs = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: lrs.append(optimizer.param_groups[0]["lr"]))
    engine.run(range(2), max_epochs=6)
    assert engine.state.epoch == 5  # the decay is complete after 2 + 3 epochs
    assert lrs == pytest.approx([2e-4, 2e-4, 1.5e-4, 1e-4, 0.5e-4])
    assert engine.state.metrics["lr_0"] == pytest.approx(0.5e-4)  # the last epoch's rate, for the epoch loggers
    assert engine.state.metrics["epoch_g_loss"] == pytest.approx(1.0)


def test_early_stop_moves_to_decay_then_stops():
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = PaperSchedule([optimizer], n_epochs=100, n_epochs_decay=100, patience=2, patience_decay=3)
    engine = _constant_loss_engine([3.0, 2.0] + [2.5] * 20)
    schedule.attach(engine)
    engine.run(range(2), max_epochs=200)
    # best at epoch 2; epochs 3, 4 stale -> decay starts after epoch 4; epochs 5, 6, 7 stale -> stop
    assert schedule.decay_start == 4
    assert engine.state.epoch == 7
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 3 / 101)


def test_tensorboard_image_grid_writes_one_image_per_direction(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    trainer, _ = build(tmp_path / "models", max_epochs=1)
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    TensorBoardImageGrid(writer).attach(trainer)
    trainer.run()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["train/A_to_B", "train/B_to_A"]
    image = events.Images("train/A_to_B")[0]
    assert (image.width, image.height) == (4 * SIZE, SIZE)


def test_image_pool_stores_plain_tensors_that_load_with_weights_only(tmp_path):
    from monai.data import MetaTensor

    pool = ImagePool(pool_size=2)
    pool.query(MetaTensor(torch.randn(2, 1, 4, 4), meta={"filename_or_obj": "x.nii.gz"}))
    torch.save(pool.state_dict(), tmp_path / "pool.pt")
    restored = ImagePool(pool_size=2)
    restored.load_state_dict(torch.load(tmp_path / "pool.pt", weights_only=True))
    assert len(restored.images) == 2
