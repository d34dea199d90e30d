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

    Until it holds ``pool_size`` images a query returns and stores its input; then each image is, with probability
    1/2, swapped for a random stored one (returned), drawn by the pool's own seeded generator. Under
    ``torch.distributed`` each rank has its own pool and :meth:`state_dict` is collective.

    Args:
        pool_size: number of stored images (>= 0, else a ValueError); 0 disables the pool.
        seed: seed of the pool's random generator.
    """

    def __init__(self, pool_size: int = 50, seed: int = 0) -> None:
        if pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {pool_size}.")
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """N images for the discriminator from generated ``images`` (N, C, H, W): each the new one or an older one."""
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

    def state_dict(self) -> dict[str, Any]:
        """Stored images and the random generator's state; under ``torch.distributed`` those of every rank."""
        images = torch.cat(self.images) if self.images else torch.empty(0)
        own = {"images": images, "generator": self.generator.get_state()}
        if _world_size() == 1:
            return own
        # gathered as CPU tensors: a pickled CUDA tensor would be unpickled on the sender's device
        own = {key: value.cpu() for key, value in own.items()}
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
    """``(real_a, real_b)``: an unpaired batch ``{"A": slices of domain A, "B": slices of domain B}`` (else a
    ValueError) moved to ``device``; ``non_blocking`` and ``kwargs`` go to ``Tensor.to``."""
    if not isinstance(batchdata, dict) or "A" not in batchdata or "B" not in batchdata:
        keys = sorted(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
        raise ValueError(f"an unpaired training batch must be a dict with keys 'A' and 'B', got {keys}.")
    return tuple(torch.as_tensor(batchdata[k]).to(device, non_blocking=non_blocking, **kwargs) for k in "AB")


def prepare_paired_batch(
    batchdata: dict[str, torch.Tensor], device: str | torch.device, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(real_a, real_b, paired_b)``: a batch of :class:`bundle.data.PairedSliceDataset` ``{"A": x_A, "B": x_B,
    "B_paired": y_B}`` (``y_B`` of the subject and slice of ``x_A``; else a ValueError) moved to ``device``, as
    :func:`prepare_unpaired_batch`."""
    if not isinstance(batchdata, dict) or "B_paired" not in batchdata:
        keys = sorted(batchdata) if isinstance(batchdata, dict) else type(batchdata).__name__
        raise ValueError(f"a paired training batch must be a dict with keys 'A', 'B' and 'B_paired', got {keys}.")
    real_a, real_b = prepare_unpaired_batch(batchdata, device, non_blocking, **kwargs)
    return real_a, real_b, torch.as_tensor(batchdata["B_paired"]).to(device, non_blocking=non_blocking, **kwargs)


def _set_requires_grad(networks: Sequence[nn.Module], requires_grad: bool) -> None:
    for parameter in (p for network in networks for p in network.parameters()):
        parameter.requires_grad_(requires_grad)


class DicycleGANTrainer(Trainer):
    """Trains DicycleGAN (Wang et al. 2018), or CycleGAN, as an Ignite engine: each iteration updates G_AB and G_BA
    on eq. (4) (discriminators frozen), then D_A and D_B on real images against the pooled fakes. The output is
    ``[{"loss": total, "losses": {name: scalar}, "images": {name: (N, C, H, W)}}]``: the generator terms, ``d_a``,
    ``d_b``; ``real_a, aligned_b, fake_b, cycle_a``, the same for B, ``paired_b``. A non-finite loss on any rank
    raises :class:`FloatingPointError` on every rank before the update; under ``torch.distributed`` both steps are
    wrapped in ``DistributedDataParallel`` when :meth:`run` starts.

    Args:
        device: device of the networks and the data.
        max_epochs: number of epochs.
        train_data_loader: loader of batches for ``prepare_batch``.
        g_ab, g_ba: generators A -> B and B -> A.
        d_a, d_b: discriminators of domains A and B.
        g_optimizer, d_optimizer: optimizers of both generators' and of both discriminators' parameters.
        loss_function: the generator objective (default: :class:`~bundle.dicyclegan.DicycleGANLoss()`).
        pool_a, pool_b: image pools of D_A's and D_B's fakes (default: ``ImagePool(50, seed=0)``, ``seed=1``).
        epoch_length: iterations per epoch (default: the loader's length).
        non_blocking: asynchronous host-to-device copies.
        amp: bfloat16 autocast of the forward passes (no loss scaling needed).
        prepare_batch: turns a batch into ``(real_a, real_b)`` (or ``(real_a, real_b, paired_b)``) on the device.
        iteration_update: replaces :meth:`_iteration` if given.
        train_handlers: MONAI / Ignite handlers to attach.
        to_kwargs: further arguments of ``Tensor.to`` for the batch.
        distributed: use DDP; ``None``: when :meth:`run` finds a process group of more than one rank.
        ddp_kwargs: further arguments of ``DistributedDataParallel`` (``device_ids`` defaults to the CUDA device).
        compile: ``torch.compile`` both objectives at the first iteration (see :func:`compile_options`).
        cuda_graphs: on CUDA, compile with ``mode="reduce-overhead"`` (implies ``compile``).
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` to debug).
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
        loop = dict(device=device, max_epochs=max_epochs, data_loader=train_data_loader, epoch_length=epoch_length)
        step = dict(non_blocking=non_blocking, prepare_batch=prepare_batch, iteration_update=iteration_update, amp=amp)
        super().__init__(**loop, **step, handlers=train_handlers, decollate=False, to_kwargs=to_kwargs)
        self.g_ab, self.g_ba, self.d_a, self.d_b = g_ab, g_ba, d_a, d_b
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        self.loss_function = DicycleGANLoss() if loss_function is None else loss_function
        self.pool_a = ImagePool(50, seed=0) if pool_a is None else pool_a
        self.pool_b = ImagePool(50, seed=1) if pool_b is None else pool_b
        self.generator_objective: nn.Module = GeneratorObjective(g_ab, g_ba, d_a, d_b, self.loss_function)
        self.discriminator_objective: nn.Module = DiscriminatorObjective(d_a, d_b)
        self.distributed, self.ddp_kwargs = distributed, dict(ddp_kwargs or {})
        # checked here, so a contradicting setting fails before any data is loaded
        self.compile_options = compile_options(device, compile, cuda_graphs, compile_backend)
        self.cuda_graphs, self._compiled = cuda_graphs, False

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
        """Compile both objectives once, after any DDP wrapping (dynamo splits the graph at DDP's buckets)."""
        if self.compile_options is None or self._compiled:
            return
        load_inductor()
        self.generator_objective = torch.compile(self.generator_objective, **self.compile_options)
        self.discriminator_objective = torch.compile(self.discriminator_objective, **self.compile_options)
        self._compiled = True

    def _autocast(self) -> torch.autocast:
        return autocast(self.amp, self.state.device)

    def _check_finite(self, loss: torch.Tensor, what: str, terms: dict[str, torch.Tensor]) -> None:
        """Raise :class:`FloatingPointError` on every rank when the loss of any rank is not finite (one scalar
        synchronisation per step: a rank stopping alone would leave the others waiting in DDP's all-reduce)."""
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
        """One step of ``engine`` on ``batchdata``: generators on eq. (4), then discriminators on pooled fakes;
        returns ``[{"loss": ..., "losses": {...}, "images": {...}}]`` (see the class docstring)."""
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
            generated = engine.generator_objective(real_a, real_b, *([] if paired_b is None else [paired_b]))
        engine._check_finite(generated.total, "generator", generated.terms)
        generated.total.backward()
        engine.g_optimizer.step()
        _set_requires_grad(discriminators, True)
        engine.d_optimizer.zero_grad(set_to_none=True)
        fake_a, fake_b = engine.loss_function.discriminator_fakes(generated)
        fake_b, fake_a = engine.pool_b.query(fake_b), engine.pool_a.query(fake_a)
        with engine._autocast():
            loss_d_a, loss_d_b = engine.discriminator_objective(real_a, real_b, fake_a, fake_b)
        d_total = loss_d_a + loss_d_b
        engine._check_finite(d_total, "discriminator", {"d_a": loss_d_a, "d_b": loss_d_b})
        d_total.backward()
        engine.d_optimizer.step()
        losses = {**generated.terms, "d_a": loss_d_a.detach(), "d_b": loss_d_b.detach()}
        g = generated
        images = dict(real_a=real_a, aligned_b=g.aligned_b, fake_b=g.fake_b, cycle_a=g.cycle_a, real_b=real_b)
        images.update(aligned_a=g.aligned_a, fake_a=g.fake_a, cycle_b=g.cycle_b, paired_b=paired_b)
        images = {k: v for k, v in images.items() if v is not None}
        if engine.cuda_graphs:
            # a CUDA graph's outputs are overwritten by the next replay, and handlers may keep them: copies
            losses = {k: v.clone() for k, v in losses.items()}
            images = {k: v.clone() for k, v in images.items()}
        # "loss" is what MONAI's tracking handlers read, as from_engine(["loss"], first=True): a list of dicts
        return [{"loss": losses["total"], "losses": losses, "images": images}]
