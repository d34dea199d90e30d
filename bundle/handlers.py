"""Ignite handlers of DicycleGAN training: the paper's schedule, atomic checkpoints, resume, TensorBoard images."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader
from torch import nn
from torch.optim import Optimizer

__all__ = [
    "AtomicCheckpointer",
    "BestModelSaver",
    "PaperSchedule",
    "ResumeCheckpointLoader",
    "TensorBoardImageGrid",
    "TimeBudget",
    "atomic_save",
]


def _unwrap(obj: Any) -> Any:
    """The module inside DataParallel / DistributedDataParallel wrappers, else the object itself."""
    return obj.module if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else obj


def atomic_save(state: Any, save_dir: str | os.PathLike, filename: str) -> Path:
    """``torch.save`` through Ignite's atomic ``DiskSaver`` (temporary file, then rename).

    An interruption leaves the previous complete file in place. The result gets the usual permissions (the
    temporary file is private).

    Args:
        state: what to save.
        save_dir: folder (created if missing).
        filename: file name inside ``save_dir``.

    Returns:
        The path written.
    """
    DiskSaver(save_dir, atomic=True, create_dir=True, require_empty=False)(state, filename)
    path = Path(save_dir) / filename
    if path.exists():
        umask = os.umask(0)
        os.umask(umask)
        path.chmod(0o666 & ~umask)
    return path


class PaperSchedule:
    """Learning-rate schedule and early stop of Wang et al. (2018), on top of CycleGAN's linear decay.

    The learning rate is constant for ``n_epochs`` epochs and then decays linearly over ``n_epochs_decay`` epochs
    (CycleGAN's rule: epoch ``k`` of the decay, counted from 1, runs at ``1 - k / (n_epochs_decay + 1)`` of the base
    rate). Early stop: when the epoch's mean total generator loss has not improved for ``patience`` epochs of the
    constant stage, decay starts at once; ``patience_decay`` epochs without improvement during the decay stop
    training. Training also stops when the decay is complete. The state (decay start, best loss, stale epochs, and
    an early stop: why and at which epoch) is part of the resume checkpoint via :meth:`state_dict`.

    A resumed run that had already finished (early-stopped, decay complete, or every epoch of the engine done) logs
    one line and ends at ``Events.STARTED`` without ``COMPLETED``, so no epoch runs and no checkpoint handler writes:
    the files of the finished run stay as they are. An early stop is final; a run that ended with its schedule
    continues when resumed with more epochs (``n_epochs``, ``n_epochs_decay``). Attach the schedule after the
    checkpoint loader, whose ``STARTED`` handler must restore the state first.

    The learning rate of each optimizer is published when the epoch starts as ``engine.state.metrics["lr_<name>"]``
    (e.g. ``lr_g`` and ``lr_d``), so the epoch logs of MONAI's stats, TensorBoard and MLflow handlers record it: with
    two optimizers the trainer has no ``optimizer`` attribute, where ``MLFlowHandler`` looks for one.
    The epoch's mean loss is published as ``engine.state.metrics["epoch_g_loss"]`` for the stats handlers. Under
    ``torch.distributed`` it is the mean over the samples of all ranks, so every rank decays and stops together.

    Args:
        optimizers: optimizers whose learning rate is scheduled (both generators' and both discriminators'), as a
            mapping name -> optimizer (``{"g": g_optimizer, "d": d_optimizer}``: metrics ``lr_g``, ``lr_d``) or a
            sequence (metrics ``lr_0``, ``lr_1``, ...).
        n_epochs: epochs at the base learning rate (paper: 100).
        n_epochs_decay: epochs of linear decay (paper: 100).
        patience: stale epochs that end the constant stage early (paper: 10; 0 disables).
        patience_decay: stale epochs that stop training during the decay (paper: 20; 0 disables).
        loss_key: key of the generator's total loss in ``engine.state.output[0]["losses"]``.
    """

    def __init__(
        self,
        optimizers: Mapping[str, Optimizer] | Sequence[Optimizer],
        n_epochs: int = 100,
        n_epochs_decay: int = 100,
        patience: int = 10,
        patience_decay: int = 20,
        loss_key: str = "total",
    ) -> None:
        if n_epochs < 0 or n_epochs_decay < 0:
            raise ValueError(f"n_epochs and n_epochs_decay must be >= 0, got {n_epochs} and {n_epochs_decay}.")
        named = optimizers if isinstance(optimizers, Mapping) else {str(i): opt for i, opt in enumerate(optimizers)}
        self.lr_names = [f"lr_{name}" for name in named]
        self.optimizers = list(named.values())
        self.base_lrs = [[group["lr"] for group in opt.param_groups] for opt in self.optimizers]
        self.n_epochs_decay = n_epochs_decay
        self.patience = patience
        self.patience_decay = patience_decay
        self.loss_key = loss_key
        self.n_epochs = n_epochs
        self.decay_start = n_epochs  # epochs completed before the decay begins
        self.best_loss = float("inf")
        self.stale_epochs = 0
        self.stopped = ""  # why the early-stop rule ended training, "" otherwise
        self.stopped_epoch = 0
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Register with ``engine``."""
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def lr_factor(self, epoch: int) -> float:
        """Fraction of the base learning rate for (1-based) ``epoch``."""
        return max(0.0, 1.0 - max(0, epoch - self.decay_start) / (self.n_epochs_decay + 1))

    def started(self, engine: Engine) -> None:
        """End a (resumed) run that has already finished, before it trains or writes anything."""
        epoch, max_epochs = engine.state.epoch, engine.state.max_epochs
        if self.stopped:
            reason = f"early stop after epoch {self.stopped_epoch}: {self.stopped}"
        elif epoch > 0 and epoch >= self.decay_start + self.n_epochs_decay:
            reason = f"the learning-rate decay was complete after epoch {epoch}"
        elif max_epochs is not None and epoch >= max_epochs > 0:
            reason = f"all {max_epochs} epochs done"
        else:
            return
        self.logger.info(f"training had already finished ({reason}); nothing to do, no file was changed")
        engine.terminate(skip_completed=True)  # no COMPLETED: the checkpoint handlers write nothing

    def epoch_started(self, engine: Engine) -> None:
        factor = self.lr_factor(engine.state.epoch)
        for optimizer, base_lrs, lr_name in zip(self.optimizers, self.base_lrs, self.lr_names, strict=True):
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * factor
            engine.state.metrics[lr_name] = optimizer.param_groups[0]["lr"]
        self._loss_sum, self._loss_count = None, 0

    def iteration_completed(self, engine: Engine) -> None:
        loss = engine.state.output[0]["losses"][self.loss_key].detach()  # summed on the device: no sync per step
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def epoch_completed(self, engine: Engine) -> None:
        if self._loss_count == 0:
            return
        epoch, epoch_loss = engine.state.epoch, self._epoch_loss()
        engine.state.metrics["epoch_g_loss"] = epoch_loss
        if epoch_loss < self.best_loss:
            self.best_loss, self.stale_epochs = epoch_loss, 0
        else:
            self.stale_epochs += 1
        in_decay = epoch > self.decay_start
        if not in_decay and self.patience and self.stale_epochs >= self.patience:
            self.logger.info(f"epoch {epoch}: no improvement for {self.stale_epochs} epochs, starting the decay")
            self.decay_start, self.stale_epochs = epoch, 0
        elif in_decay and self.patience_decay and self.stale_epochs >= self.patience_decay:
            self.stopped, self.stopped_epoch = f"no improvement for {self.stale_epochs} epochs of decay", epoch
            self.logger.info(f"epoch {epoch}: {self.stopped}, stopping")
            engine.terminate()
        if epoch >= self.decay_start + self.n_epochs_decay:
            engine.terminate()

    def _epoch_loss(self) -> float:
        """Mean loss of the epoch over the samples of every distributed rank, so all ranks take the same decisions."""
        total = torch.stack([self._loss_sum.float(), self._loss_sum.new_tensor(self._loss_count, dtype=torch.float)])
        total = idist.all_reduce(total)  # the identity without torch.distributed
        return float(total[0]) / float(total[1])

    def state_dict(self) -> dict[str, float | int | str]:
        # -1: the decay starts after n_epochs as configured, so a resumed run may change n_epochs
        early_start = self.decay_start if self.decay_start < self.n_epochs else -1
        return {
            "early_decay_start": early_start,
            "best_loss": self.best_loss,
            "stale_epochs": self.stale_epochs,
            "stopped": self.stopped,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state_dict: Mapping[str, float | int | str]) -> None:
        early_start = int(state_dict["early_decay_start"])
        self.decay_start = early_start if early_start >= 0 else self.n_epochs
        self.best_loss = float(state_dict["best_loss"])
        self.stale_epochs = int(state_dict["stale_epochs"])
        self.stopped = str(state_dict.get("stopped", ""))  # checkpoints of earlier versions have no stop decision
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))


class TimeBudget:
    """Ends training once ``limit_s`` seconds of wall time have passed since the run started (a training budget).

    The engine terminates after the iteration that crosses the limit; ``COMPLETED`` handlers still run, so
    :class:`AtomicCheckpointer` saves the models of that iteration. Under ``torch.distributed`` rank 0's clock decides
    for every rank (a broadcast each iteration), so all ranks stop at the same iteration.

    Args:
        limit_s: seconds of training (the time of this run: a resumed run gets the budget again).
        clock: seconds of a monotonic clock.
    """

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not limit_s > 0:
            raise ValueError(f"time_limit_s must be a positive number of seconds, got {limit_s}.")
        self.limit_s = float(limit_s)
        self.clock = clock
        self._start = 0.0
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Register with ``engine``."""
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def started(self, engine: Engine) -> None:
        """Start the clock."""
        self._start = self.clock()

    def __call__(self, engine: Engine) -> None:
        over = float(self.clock() - self._start >= self.limit_s)
        if idist.get_world_size() > 1:
            over = float(idist.broadcast(torch.tensor(over), src=0))
        if over:
            self.logger.info(
                f"time budget of {self.limit_s:g} s reached at epoch {engine.state.epoch}, iteration "
                f"{engine.state.iteration}: training stops"
            )
            engine.terminate()


class AtomicCheckpointer:
    """Writes the exported models and the resume checkpoint, each atomically (temporary file, then rename).

    - ``models`` (e.g. ``{"model.pt": g_ab, "model_g_ba.pt": g_ba}``): each file is the bare ``state_dict`` of one
      network, what ``python -m monai.bundle ckpt_export network_def`` and the model zoo expect;
    - ``checkpoint`` (e.g. ``{"g_ab": ..., "g_optimizer": ..., "pool_a": ..., "schedule": ...}``) plus the state
      of the engine the handler is attached to (key ``engine_key``) goes to ``checkpoint_filename``: everything
      needed to resume. Taking the engine at run time keeps configs free of a trainer -> handler -> trainer cycle.

    Files are replaced with ``os.replace``, so an interruption leaves the previous complete file in place. Under
    ``torch.distributed`` attach it on every rank: collecting the state is collective (the image pools of all ranks,
    see :class:`bundle.trainer.ImagePool`), and only rank 0 writes and logs.

    Args:
        save_dir: output folder (created if missing).
        models: file name -> network for the bare state dicts.
        checkpoint: key -> object with ``state_dict()`` for the resume checkpoint.
        checkpoint_filename: file name of the resume checkpoint.
        save_interval: write every this many epochs (and when training completes).
        engine_key: key of the engine's own state in the resume checkpoint.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        models: Mapping[str, nn.Module],
        checkpoint: Mapping[str, Any],
        checkpoint_filename: str = "checkpoint.pt",
        save_interval: int = 1,
        engine_key: str = "trainer",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.models = dict(models)
        self.checkpoint = dict(checkpoint)
        self.engine_key = engine_key
        self.checkpoint_filename = checkpoint_filename
        self.save_interval = save_interval
        self._saved_iteration = -1
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Register with ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration == self._saved_iteration:  # COMPLETED right after a scheduled save
            return
        self._saved_iteration = engine.state.iteration
        state = {key: _unwrap(obj).state_dict() for key, obj in self.checkpoint.items()}  # every rank: collective
        state[self.engine_key] = engine.state_dict()
        if idist.get_rank() != 0:
            return
        for filename, network in self.models.items():
            atomic_save(_unwrap(network).state_dict(), self.save_dir, filename)
        atomic_save(state, self.save_dir, self.checkpoint_filename)
        self.logger.info(f"epoch {engine.state.epoch}: saved {', '.join(self.models)} and {self.checkpoint_filename}")


class BestModelSaver:
    """Keeps the best model by a validation metric: when an evaluator finishes with a better ``metric_name`` than
    ever before, writes each model's bare state dict atomically (:func:`atomic_save`).

    Its best score is part of the resume checkpoint (:meth:`state_dict`), so a resumed run does not overwrite a
    better model with a worse one.

    Not MONAI's ``CheckpointSaver(key_metric_name=...)``: its saver writes with ``atomic=False`` and, under a fixed
    ``key_metric_filename``, deletes the previous best before writing the new one, so an interruption can leave no
    or a truncated ``model_best.pt``.

    Args:
        save_dir: output folder.
        models: file name -> network, e.g. ``{"model_best.pt": g_ab}``.
        metric_name: key in the evaluator's ``state.metrics``.
        greater_is_better: direction of improvement.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        models: Mapping[str, nn.Module],
        metric_name: str,
        greater_is_better: bool = True,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.models = dict(models)
        self.metric_name = metric_name
        self.sign = 1.0 if greater_is_better else -1.0
        self.best = -float("inf")
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Register with the evaluator."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        score = self.sign * float(engine.state.metrics[self.metric_name])
        if score > self.best:
            self.best = score
            for filename, network in self.models.items():
                atomic_save(_unwrap(network).state_dict(), self.save_dir, filename)
            self.logger.info(
                f"best {self.metric_name} so far ({self.sign * score:.4f}): saved {', '.join(self.models)}"
            )

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: Mapping[str, float]) -> None:
        self.best = float(state_dict["best"])


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (``weights_only=True``) that names the file and the problem when it cannot read
    the checkpoint, instead of a bare unpickling traceback.

    The engine it is attached to is restored too, from key ``engine_key`` (see :class:`AtomicCheckpointer`).

    Args:
        load_path: the resume checkpoint.
        load_dict: key -> object with ``load_state_dict`` (networks, optimizers, pools, schedule).
        engine_key: key of the engine's state in the checkpoint.
        kwargs: further arguments of ``monai.handlers.CheckpointLoader``.
    """

    def __init__(
        self, load_path: str | os.PathLike, load_dict: dict, engine_key: str = "trainer", **kwargs: Any
    ) -> None:
        super().__init__(load_path=str(load_path), load_dict=dict(load_dict), **kwargs)
        self.engine_key = engine_key

    def __call__(self, engine: Engine) -> None:
        self.load_dict[self.engine_key] = engine
        path = Path(self.load_path)
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: checkpoint {path} does not exist.")
        try:
            super().__call__(engine)
        except Exception as error:  # torch.load / load_state_dict raise many types for a bad file
            raise RuntimeError(
                f"cannot resume from {path}: it is not a readable DicycleGAN checkpoint "
                f"({type(error).__name__}: {error}). Nothing was changed; remove the file or start without resume."
            ) from error


def _to_unit_range(image: torch.Tensor) -> torch.Tensor:
    low, high = image.min(), image.max()
    return (image - low) / (high - low).clamp_min(1e-8)


class TensorBoardImageGrid:
    """Writes, every ``interval`` epochs, one TensorBoard image per direction: the first item's source, undeformed
    output G(x), deformed output G_T(x) and cycle, side by side, each scaled to [0, 1].

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (shared with MONAI's TensorBoardStatsHandler).
        interval: epochs between images.
        tag_prefix: prefix of the image tags.
    """

    ROWS: ClassVar[dict[str, tuple[str, ...]]] = {
        "A_to_B": ("real_a", "aligned_b", "fake_b", "cycle_a"),
        "B_to_A": ("real_b", "aligned_a", "fake_a", "cycle_b"),
    }

    def __init__(self, summary_writer: Any, interval: int = 1, tag_prefix: str = "train") -> None:
        self.writer = summary_writer
        self.interval = interval
        self.tag_prefix = tag_prefix

    def attach(self, engine: Engine) -> None:
        """Register with ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        images = engine.state.output[0]["images"]
        for direction, keys in self.ROWS.items():
            tiles = [_to_unit_range(images[key][0, :1].float().cpu()) for key in keys if key in images]
            if tiles:
                grid = torch.cat(tiles, dim=-1)  # (1, H, k * W)
                self.writer.add_image(f"{self.tag_prefix}/{direction}", grid, engine.state.epoch, dataformats="CHW")
        self.writer.flush()
