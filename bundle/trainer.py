"""The DicycleGAN training engine: one Ignite iteration updates both generators, then both discriminators."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from bundle.compilation import compile_options, load_inductor
from bundle.dicyclegan import DicycleGANLoss, DiscriminatorObjective, GeneratorObjective
from bundle.settings import autocast
from monai.engines import Trainer
from monai.engines.workflow import Workflow
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

__all__ = ["DicycleGANTrainer", "ImagePool", "prepare_paired_batch", "prepare_unpaired_batch"]


def _world_size() -> int:
    """Ranks of the initialised ``torch.distributed`` process group, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ImagePool:
    """History of generated images shown to a discriminator (Shrivastava et al. 2017; CycleGAN's ``ImagePool``).

    Until the pool holds ``pool_size`` images every query returns its input and stores it. After that, each image
    is, with probability 1/2, swapped for a random stored one (which is returned) or returned as it is. The pool's
    random choices use their own seeded generator, and :meth:`state_dict` stores both the images and that generator,
    so a resumed run draws exactly what an uninterrupted one would.

    Under ``torch.distributed`` each rank has its own pool (its own fakes and draws). :meth:`state_dict` is then a
    collective call that gathers the pools of all ranks (``{"ranks": [state of rank 0, ...]}``), and
    :meth:`load_state_dict` restores each rank's own pool, so a resumed multi-process run equals an uninterrupted
    one. Every rank must call :meth:`state_dict` (see :class:`bundle.handlers.AtomicCheckpointer`).

    Args:
        pool_size: number of stored images; 0 disables the pool.
        seed: seed of the pool's random generator.
    """

    def __init__(self, pool_size: int = 50, seed: int = 0) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}.")
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: generated images of shape (N, C, H, W).

        Returns:
            N images for the discriminator, each either the new one or an older one from the pool.
        """
        if self.pool_size == 0:
            return images.detach()
        chosen = []
        images = images.detach().as_subclass(torch.Tensor)  # stored images go into checkpoints: no metadata
        for image in images.split(1):
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                chosen.append(image)
            elif torch.rand((), generator=self.generator) < 0.5:
                index = int(torch.randint(len(self.images), (), generator=self.generator))
                chosen.append(self.images[index].to(image.device))  # restored images may sit on another device
                self.images[index] = image.clone()
            else:
                chosen.append(image)
        return torch.cat(chosen)

    def _own_state(self) -> dict[str, torch.Tensor]:
        return {
            "images": torch.cat(self.images) if self.images else torch.empty(0),
            "generator": self.generator.get_state(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Stored images and the random generator's state; under ``torch.distributed`` those of every rank
        (a collective call)."""
        if _world_size() == 1:
            return self._own_state()
        # gathered as CPU tensors: a pickled CUDA tensor would be unpickled on the sender's device
        own = {key: value.cpu() for key, value in self._own_state().items()}
        states: list[Any] = [None] * _world_size()
        dist.all_gather_object(states, own)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; from a multi-process checkpoint, this rank's own pool."""
        if "ranks" in state_dict:
            states, rank, world_size = state_dict["ranks"], idist.get_rank(), _world_size()
            if len(states) != world_size:
                logging.getLogger(__name__).warning(
                    f"the image pools were saved by {len(states)} ranks and this run has {world_size}: "
                    f"rank {rank} continues with the pool of rank {rank % len(states)}"
                )
            state_dict = states[rank % len(states)]
        images = state_dict["images"]
        self.images = list(images.split(1)) if images.numel() else []
        # map_location may have moved the state to a GPU; the generator's state is a CPU byte tensor
        self.generator.set_state(state_dict["generator"].cpu())


def prepare_unpaired_batch(
    batchdata: dict[str, torch.Tensor], device: str | torch.device, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move an unpaired batch ``{"A": slices of domain A, "B": slices of domain B}`` to ``device``.

    Args:
        batchdata: the data loader's batch.
        device: target device.
        non_blocking: asynchronous host-to-device copy.
        kwargs: further arguments of ``Tensor.to``.

    Returns:
        ``(real_a, real_b)``.
    """
    if not isinstance(batchdata, dict) or "A" not in batchdata or "B" not in batchdata:
        keys = sorted(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
        raise ValueError(f"an unpaired training batch must be a dict with keys 'A' and 'B', got {keys}.")
    return (
        torch.as_tensor(batchdata["A"]).to(device, non_blocking=non_blocking, **kwargs),
        torch.as_tensor(batchdata["B"]).to(device, non_blocking=non_blocking, **kwargs),
    )


def prepare_paired_batch(
    batchdata: dict[str, torch.Tensor], device: str | torch.device, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move a batch of :class:`bundle.data.PairedSliceDataset` ``{"A": x_A, "B": x_B, "B_paired": y_B}`` to ``device``.

    ``y_B`` is the target of the same subject and slice as ``x_A`` (misaligned pairs); ``x_B`` is unpaired.

    Args:
        batchdata: the data loader's batch.
        device: target device.
        non_blocking: asynchronous host-to-device copy.
        kwargs: further arguments of ``Tensor.to``.

    Returns:
        ``(real_a, real_b, paired_b)``.
    """
    if not isinstance(batchdata, dict) or "B_paired" not in batchdata:
        keys = sorted(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
        raise ValueError(f"a paired training batch must be a dict with keys 'A', 'B' and 'B_paired', got {keys}.")
    real_a, real_b = prepare_unpaired_batch(batchdata, device, non_blocking, **kwargs)
    return real_a, real_b, torch.as_tensor(batchdata["B_paired"]).to(device, non_blocking=non_blocking, **kwargs)


def _set_requires_grad(networks: Sequence[nn.Module], requires_grad: bool) -> None:
    for network in networks:
        for parameter in network.parameters():
            parameter.requires_grad_(requires_grad)


class DicycleGANTrainer(Trainer):
    """Trains DicycleGAN (Wang et al. 2018) or, with non-deformable generators and the alignment and deformed-cycle
    weights at 0, CycleGAN (Zhu et al. 2017), as an Ignite engine that MONAI handlers attach to.

    Each iteration takes an unpaired batch ``{"A": x_A, "B": x_B}`` and

    1. updates G_AB and G_BA on the objective of eq. (4) (``loss_function``), discriminators frozen;
    2. updates D_A and D_B on LSGAN losses of real images against deformed fakes drawn from an image pool each.

    Which passes run and which fakes the discriminators see is :mod:`bundle.dicyclegan` (the loss function's
    :meth:`~bundle.dicyclegan.DicycleGANLoss.discriminator_fakes` go through the image pools). With
    ``prepare_batch=``:func:`prepare_paired_batch` (misaligned pairs) the batch's ``B_paired`` reaches the loss
    function as ``paired_b`` and is logged as the image ``paired_b``.

    ``engine.state.output`` is ``[{"loss": total, "losses": {name: scalar}, "images": {name: (N, C, H, W)}}]``, a
    list of one dict for the whole batch: MONAI's layout of a step's output (a list of dicts, as after decollation),
    so MONAI handlers read it with ``from_engine(keys, first=True)``, e.g. ``train_loss`` of ``--tracking mlflow``.
    ``losses`` holds the generator terms (``gan_ab, gan_ba, align, cyc, dicyc, nmi_a, nmi_b, total``) plus ``d_a``
    and ``d_b``, ``images`` the images ``real_a, fake_b, aligned_b, cycle_a`` and the same for B. A non-finite loss
    stops training with :class:`FloatingPointError` before any weight is updated, so the weights and the last
    checkpoint stay intact.

    Under ``torch.distributed`` (e.g. ``torchrun``, a process group of several ranks) the generator step runs through
    :class:`GeneratorObjective` and the discriminator step through :class:`DiscriminatorObjective`, each wrapped by
    ``torch.nn.parallel.DistributedDataParallel`` when :meth:`run` starts: DDP broadcasts rank 0's weights and
    averages the gradients over the ranks, so N ranks with batch n train like one process with batch N x n. The
    finite check is agreed by all ranks (an all-reduce of a flag before any backward): a NaN on one rank stops every
    rank with the same :class:`FloatingPointError` instead of leaving the others waiting in DDP's all-reduce.

    Args:
        device: device of the networks and the data.
        max_epochs: number of epochs.
        train_data_loader: loader of unpaired batches ``{"A": ..., "B": ...}``.
        g_ab: generator A -> B.
        g_ba: generator B -> A.
        d_a: discriminator of domain A.
        d_b: discriminator of domain B.
        g_optimizer: optimizer of both generators' parameters.
        d_optimizer: optimizer of both discriminators' parameters.
        loss_function: the generator objective; :class:`~bundle.dicyclegan.DicycleGANLoss` with the paper's weights
            by default.
        pool_a: image pool of D_A's fakes (default: ``ImagePool(50, seed=0)``, the paper's and CycleGAN's size).
        pool_b: image pool of D_B's fakes (default: ``ImagePool(50, seed=1)``).
        epoch_length: iterations per epoch (default: the loader's length).
        non_blocking: asynchronous host-to-device copies.
        amp: bfloat16 autocast of the forward passes (no loss scaling needed).
        prepare_batch: turns a batch into ``(real_a, real_b)`` on the device.
        iteration_update: replaces :meth:`_iteration` if given.
        train_handlers: MONAI / Ignite handlers to attach.
        to_kwargs: further arguments of ``Tensor.to`` for the batch.
        distributed: wrap the steps in ``DistributedDataParallel``; ``None`` (default): when :meth:`run` finds an
            initialised ``torch.distributed`` process group of more than one rank.
        ddp_kwargs: further arguments of ``DistributedDataParallel`` (``device_ids`` defaults to the CUDA device).
        compile: ``torch.compile`` the generator and discriminator objectives (opt-in, beyond the paper; the eager
            step is the default). They are compiled at the first iteration, around DDP when it is used; the first
            iterations then take the compile time. See :func:`compile_options`.
        cuda_graphs: on CUDA, compile with ``mode="reduce-overhead"`` (CUDA graphs; implies ``compile``); a
            ``ValueError`` on other devices.
        compile_backend: ``torch.compile`` backend of ``compile`` (``"inductor"``; ``"aot_eager"`` to debug).

    Example::

        trainer = DicycleGANTrainer("cpu", 200, loader, g_ab, g_ba, d_a, d_b, g_opt, d_opt)
        trainer.run()
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        g_ab: nn.Module,
        g_ba: nn.Module,
        d_a: nn.Module,
        d_b: nn.Module,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        loss_function: DicycleGANLoss | None = None,
        pool_a: ImagePool | None = None,
        pool_b: ImagePool | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        amp: bool = False,
        prepare_batch: Callable = prepare_unpaired_batch,
        iteration_update: Callable | None = None,
        train_handlers: Sequence | None = None,
        to_kwargs: dict | None = None,
        distributed: bool | None = None,
        ddp_kwargs: dict | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            handlers=train_handlers,
            amp=amp,
            decollate=False,
            to_kwargs=to_kwargs,
        )
        self.g_ab, self.g_ba, self.d_a, self.d_b = g_ab, g_ba, d_a, d_b
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.loss_function = DicycleGANLoss() if loss_function is None else loss_function
        self.pool_a = ImagePool(50, seed=0) if pool_a is None else pool_a
        self.pool_b = ImagePool(50, seed=1) if pool_b is None else pool_b
        self.generator_objective: nn.Module = GeneratorObjective(g_ab, g_ba, d_a, d_b, self.loss_function)
        self.discriminator_objective: nn.Module = DiscriminatorObjective(d_a, d_b)
        self.distributed = distributed
        self.ddp_kwargs = dict(ddp_kwargs or {})
        # checked here, so a contradicting setting fails before any data is loaded
        self.compile_options = compile_options(device, compile, cuda_graphs, compile_backend)
        self.cuda_graphs = cuda_graphs
        self._compiled = False

    def _wrap_distributed(self) -> None:
        """Wrap both steps in DDP once, when a process group of several ranks exists (or ``distributed=True``)."""
        if isinstance(self.generator_objective, nn.parallel.DistributedDataParallel):
            return
        if not (self.distributed if self.distributed is not None else _world_size() > 1):
            return
        if not dist.is_initialized():
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group.")
        if self._compiled:  # compiled by an iteration before run(): compile around DDP instead, as torch advises
            self.generator_objective = self.generator_objective._orig_mod
            self.discriminator_objective = self.discriminator_objective._orig_mod
            self._compiled = False
        device = torch.device(self.state.device)
        kwargs = {"device_ids": [device.index] if device.type == "cuda" else None, **self.ddp_kwargs}
        _set_requires_grad((self.d_a, self.d_b), True)  # DDP registers only parameters that require gradients
        self.generator_objective = nn.parallel.DistributedDataParallel(self.generator_objective, **kwargs)
        self.discriminator_objective = nn.parallel.DistributedDataParallel(self.discriminator_objective, **kwargs)

    def run(self) -> None:  # type: ignore[override]
        """Run training; calling it again continues from the current state (bfloat16 AMP needs no GradScaler)."""
        self.scaler = None
        self._wrap_distributed()
        Workflow.run(self)

    def _compile(self) -> None:
        """Compile both objectives once (:attr:`compile_options`), after any DDP wrapping: dynamo then splits the
        graph at DDP's gradient buckets so the all-reduce still overlaps the backward pass."""
        if self.compile_options is None or self._compiled:
            return
        load_inductor()
        self.generator_objective = torch.compile(self.generator_objective, **self.compile_options)
        self.discriminator_objective = torch.compile(self.discriminator_objective, **self.compile_options)
        self._compiled = True

    def _autocast(self) -> torch.autocast:
        return autocast(self.amp, self.state.device)

    def _check_finite(self, loss: torch.Tensor, what: str, terms: dict[str, torch.Tensor]) -> None:
        """Raise :class:`FloatingPointError` on every rank when the loss of any rank is not finite.

        One scalar synchronisation per step (an all-reduce under ``torch.distributed``) buys the guarantee that no
        update is made with a NaN/Inf loss and that all ranks stop together: a rank that stopped alone would leave
        the others waiting in the gradient all-reduce of ``backward``.
        """
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        all_finite = idist.all_reduce(finite.clone(), op="MIN") if _world_size() > 1 else finite
        if bool(all_finite):
            return
        where = f"epoch {self.state.epoch}, iteration {self.state.iteration}"
        if bool(finite):
            where += f" on rank(s) other than {idist.get_rank()}"
        else:
            where += f" ({', '.join(f'{name}={float(value):.4g}' for name, value in terms.items())})"
            if _world_size() > 1:
                where += f" on rank {idist.get_rank()}"
        raise FloatingPointError(
            f"non-finite {what} loss at {where}; training stopped before this update on every rank, so the weights "
            "and the last saved checkpoint are intact. Check the input intensities, lower the learning rate or "
            "disable AMP."
        )

    def _iteration(self, engine: DicycleGANTrainer, batchdata: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """One DicycleGAN step: generators on eq. (4), then discriminators on pooled deformed fakes.

        Args:
            engine: this trainer.
            batchdata: unpaired batch ``{"A": x_A, "B": x_B}``.

        Returns:
            ``[{"loss": ..., "losses": {...}, "images": {...}}]``, see the class docstring.
        """
        engine._compile()
        if engine.cuda_graphs:
            # a new step: the graphs may now overwrite the outputs of the previous replay
            torch.compiler.cudagraph_mark_step_begin()
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        real_a, real_b = batch[:2]
        paired_b = batch[2] if len(batch) > 2 else None  # misaligned-pairs mode (prepare_paired_batch)
        discriminators = (engine.d_a, engine.d_b)

        _set_requires_grad(discriminators, False)  # the generator step needs no discriminator gradients
        engine.g_optimizer.zero_grad(set_to_none=True)
        with engine._autocast():
            if paired_b is None:
                generated = engine.generator_objective(real_a, real_b)
            else:
                generated = engine.generator_objective(real_a, real_b, paired_b)
        engine._check_finite(generated.total, "generator", generated.terms)
        generated.total.backward()
        engine.g_optimizer.step()

        _set_requires_grad(discriminators, True)
        engine.d_optimizer.zero_grad(set_to_none=True)
        fake_a, fake_b = engine.loss_function.discriminator_fakes(generated)
        fake_b = engine.pool_b.query(fake_b)
        fake_a = engine.pool_a.query(fake_a)
        with engine._autocast():
            loss_d_a, loss_d_b = engine.discriminator_objective(real_a, real_b, fake_a, fake_b)
        d_total = loss_d_a + loss_d_b
        engine._check_finite(d_total, "discriminator", {"d_a": loss_d_a, "d_b": loss_d_b})
        d_total.backward()
        engine.d_optimizer.step()

        losses = dict(generated.terms)
        losses["d_a"], losses["d_b"] = loss_d_a.detach(), loss_d_b.detach()
        images = {
            "real_a": real_a,
            "aligned_b": generated.aligned_b,
            "fake_b": generated.fake_b,
            "cycle_a": generated.cycle_a,
            "real_b": real_b,
            "aligned_a": generated.aligned_a,
            "fake_a": generated.fake_a,
            "cycle_b": generated.cycle_b,
            "paired_b": paired_b,
        }
        if engine.cuda_graphs:
            # outputs of a CUDA graph live in its memory pool and are overwritten by the next replay: handlers may
            # keep them (e.g. the last images of an epoch), so they get copies
            losses = {k: v.clone() for k, v in losses.items()}
            images = {k: None if v is None else v.clone() for k, v in images.items()}
        # "loss" (the generator objective) is what MONAI's default tracking handlers read, as
        # from_engine(["loss"], first=True)(output), which needs a list of dicts (a bare dict gives a 1-tuple)
        return [
            {"loss": losses["total"], "losses": losses, "images": {k: v for k, v in images.items() if v is not None}}
        ]
