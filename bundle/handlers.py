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

__all__ = ["AtomicCheckpointer", "BestModelSaver", "PaperSchedule", "ResumeCheckpointLoader", "TensorBoardImageGrid"]
__all__ += ["TimeBudget", "atomic_save"]


def _unwrap(obj: Any) -> Any:
    """The module inside DataParallel / DistributedDataParallel wrappers, else the object itself."""
    return obj.module if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else obj


def atomic_save(state: Any, save_dir: str | os.PathLike, filename: str) -> Path:
    """``torch.save`` of ``state`` to ``save_dir/filename`` (folder created if missing) through Ignite's atomic
    ``DiskSaver`` (temporary file, then rename), with the umask's permissions; returns the path written."""
    DiskSaver(save_dir, atomic=True, create_dir=True, require_empty=False)(state, filename)
    path = Path(save_dir) / filename
    if path.exists():
        os.umask(umask := os.umask(0))  # read the umask: there is no getter
        path.chmod(0o666 & ~umask)
    return path


class PaperSchedule:
    """Learning-rate schedule and early stop of Wang et al. (2018), on top of CycleGAN's linear decay: epoch ``k``
    (from 1) of the decay runs at ``1 - k / (n_epochs_decay + 1)`` of the base rate; ``patience`` epochs without
    improvement of the mean total generator loss start it early, ``patience_decay`` such epochs in it (or its end)
    stop training. A resumed finished run ends at ``Events.STARTED`` without ``COMPLETED``; attach it after the
    checkpoint loader. Publishes ``engine.state.metrics["lr_<name>"]`` and ``["epoch_g_loss"]``.

    Args:
        optimizers: a mapping name -> optimizer (metrics ``lr_<name>``) or a sequence (``lr_0``, ``lr_1``, ...).
        n_epochs, n_epochs_decay: epochs at the base rate and of linear decay (paper: 100 each; >= 0, else ValueError).
        patience, patience_decay: the stale epochs above (paper: 10 and 20; 0 disables).
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
        self.lr_names, self.optimizers = [f"lr_{name}" for name in named], list(named.values())
        self.base_lrs = [[group["lr"] for group in opt.param_groups] for opt in self.optimizers]
        self.n_epochs, self.n_epochs_decay = n_epochs, n_epochs_decay
        self.patience, self.patience_decay, self.loss_key = patience, patience_decay, loss_key
        self.decay_start = n_epochs  # epochs completed before the decay begins
        self.best_loss, self.stale_epochs = float("inf"), 0
        self.stopped, self.stopped_epoch = "", 0  # why and when the early-stop rule ended training
        self._loss_sum, self._loss_count = None, 0  # the epoch's summed loss (a tensor) and number of iterations
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
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
        count = self._loss_sum.new_tensor(self._loss_count, dtype=torch.float)
        total = idist.all_reduce(torch.stack([self._loss_sum.float(), count]))  # over all ranks (identity if none)
        epoch, epoch_loss = engine.state.epoch, float(total[0]) / float(total[1])
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

    def state_dict(self) -> dict[str, float | int | str]:
        # -1: the decay starts after n_epochs as configured, so a resumed run may change n_epochs
        early_start = self.decay_start if self.decay_start < self.n_epochs else -1
        state = {"early_decay_start": early_start, "best_loss": self.best_loss, "stale_epochs": self.stale_epochs}
        return {**state, "stopped": self.stopped, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state_dict: Mapping[str, float | int | str]) -> None:
        early_start = int(state_dict["early_decay_start"])
        self.decay_start = early_start if early_start >= 0 else self.n_epochs
        self.best_loss, self.stale_epochs = float(state_dict["best_loss"]), int(state_dict["stale_epochs"])
        self.stopped = str(state_dict.get("stopped", ""))  # older checkpoints have no stop decision
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))


class TimeBudget:
    """Ends training (``COMPLETED`` handlers still run) after the iteration that crosses ``limit_s`` (> 0, else a
    ValueError) seconds of ``clock`` since this run started; under ``torch.distributed`` rank 0's clock decides."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not limit_s > 0:
            raise ValueError(f"time_limit_s must be a positive number of seconds, got {limit_s}.")
        self.limit_s, self.clock, self._start, self.logger = float(limit_s), clock, 0.0, logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def started(self, engine: Engine) -> None:
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
    """Writes to ``save_dir`` the bare ``state_dict`` of each network of ``models`` (file name -> network) and, as
    ``checkpoint_filename``, the ``state_dict()`` of each object of ``checkpoint`` (key -> object) plus the attached
    engine's under ``engine_key``, each with :func:`atomic_save`, every ``save_interval`` epochs and at the end.
    Under ``torch.distributed`` attach it on every rank (collecting the state is collective); rank 0 writes."""

    def __init__(
        self,
        save_dir: str | os.PathLike,
        models: Mapping[str, nn.Module],
        checkpoint: Mapping[str, Any],
        checkpoint_filename: str = "checkpoint.pt",
        save_interval: int = 1,
        engine_key: str = "trainer",
    ) -> None:
        self.save_dir, self.models, self.checkpoint = Path(save_dir), dict(models), dict(checkpoint)
        self.checkpoint_filename, self.save_interval, self.engine_key = checkpoint_filename, save_interval, engine_key
        self._saved_iteration, self.logger = -1, logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
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
    """When an evaluator finishes with a better ``state.metrics[metric_name]`` (higher if ``greater_is_better``)
    than ever before, writes each network of ``models`` (file name -> network) to ``save_dir`` with
    :func:`atomic_save`; the best score is part of the resume checkpoint."""

    def __init__(
        self,
        save_dir: str | os.PathLike,
        models: Mapping[str, nn.Module],
        metric_name: str,
        greater_is_better: bool = True,
    ) -> None:
        self.save_dir, self.models, self.metric_name = Path(save_dir), dict(models), metric_name
        self.sign, self.best = 1.0 if greater_is_better else -1.0, -float("inf")
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if self.sign * value > self.best:
            self.best = self.sign * value
            for filename, network in self.models.items():
                atomic_save(_unwrap(network).state_dict(), self.save_dir, filename)
            self.logger.info(f"best {self.metric_name} so far ({value:.4f}): saved {', '.join(self.models)}")

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: Mapping[str, float]) -> None:
        self.best = float(state_dict["best"])


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` (``weights_only=True``; ``kwargs`` go to it) of ``load_path`` into ``load_dict``
    (key -> object with ``load_state_dict``) and the attached engine (key ``engine_key``); when called it raises
    FileNotFoundError for a missing file and RuntimeError, naming file and problem, for one it cannot read."""

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


class TensorBoardImageGrid:
    """Writes to ``summary_writer`` (a ``SummaryWriter``) every ``interval`` epochs one image per direction, tagged
    ``<tag_prefix>/A_to_B`` and ``B_to_A``: the first item's source, G(x), G_T(x) and cycle, each scaled to [0, 1]."""

    ROWS: ClassVar[dict[str, tuple[str, ...]]] = {
        "A_to_B": ("real_a", "aligned_b", "fake_b", "cycle_a"),
        "B_to_A": ("real_b", "aligned_a", "fake_a", "cycle_b"),
    }

    def __init__(self, summary_writer: Any, interval: int = 1, tag_prefix: str = "train") -> None:
        self.writer, self.interval, self.tag_prefix = summary_writer, interval, tag_prefix

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        images = engine.state.output[0]["images"]
        for direction, keys in self.ROWS.items():
            tiles = [images[key][0, :1].float().cpu() for key in keys if key in images]
            tiles = [(t - t.min()) / (t.max() - t.min()).clamp_min(1e-8) for t in tiles]
            if tiles:
                grid = torch.cat(tiles, dim=-1)  # (1, H, k * W)
                self.writer.add_image(f"{self.tag_prefix}/{direction}", grid, engine.state.epoch, dataformats="CHW")
        self.writer.flush()
