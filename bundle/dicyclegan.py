"""The DicycleGAN step (Wang et al. 2018): which generator passes run, and which losses they feed.

Read beside :mod:`bundle.networks` (the offset convolution and the generator's two passes) and
:mod:`bundle.losses` (the tensor-in criteria):

- :class:`DicycleGANLoss` runs the passes of one step and sums the generator objective of eq. (4);
- :class:`GeneratorObjective` and :class:`DiscriminatorObjective` are the generator and discriminator steps as
  modules (the units :class:`bundle.trainer.DicycleGANTrainer` wraps in ``DistributedDataParallel`` and compiles);
- :class:`Generator` is the contract a generator meets.

The CycleGAN baseline is the same code: generators built with ``deformable=False`` and
``lambda_align = lambda_dicyc = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from bundle.losses import (
    ALIGNMENT_MEASURES,
    discriminator_loss,
    local_normalized_mutual_information,
    lsgan_loss,
    normalized_mutual_information,
)
from bundle.mind import mind_distance
from torch import nn

__all__ = [
    "DicycleGANGeneratorOutput",
    "DicycleGANLoss",
    "DiscriminatorObjective",
    "Generator",
    "GeneratorObjective",
    "check_generator",
    "discriminator_logits",
]


@runtime_checkable
class Generator(Protocol):
    """The passes the step asks of a generator; :class:`bundle.networks.DicycleGenerator` has them in both modes.

    ``g(x)`` is the undeformed pass G(x) and ``g(x, deform=True)`` the deformed pass G_T(x); ``forward_both(x)``
    returns ``(G_T(x), G(x))`` and, when ``deformable`` is False, one tensor twice (a single pass);
    ``forward_mixed(x, n)`` runs the deformed pass on the first ``n`` items of ``x`` and the undeformed one on the rest.
    """

    deformable: bool

    def __call__(self, x: torch.Tensor, deform: bool = False) -> torch.Tensor: ...

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward_mixed(self, x: torch.Tensor, num_deformed: int) -> torch.Tensor: ...


def check_generator(g: nn.Module, name: str) -> None:
    """Raise a ``TypeError`` naming ``name`` when ``g`` lacks a pass of :class:`Generator`."""
    if not isinstance(g, Generator):
        raise TypeError(
            f"{name} ({type(g).__name__}) must provide the passes of bundle.dicyclegan.Generator: a `deformable` "
            "attribute, g(x, deform=...), forward_both(x) and forward_mixed(x, n); bundle.networks.DicycleGenerator "
            "does, with deformable=False for CycleGAN."
        )


def discriminator_logits(d: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Discriminator logits; MONAI's ``PatchDiscriminator`` returns its intermediate features with the logits last."""
    out = d(x)
    return out[-1] if isinstance(out, (list, tuple)) else out


@dataclass
class DicycleGANGeneratorOutput:
    """Result of :class:`DicycleGANLoss`.

    Attributes:
        total: the objective of eq. (4), a scalar with gradient.
        terms: detached scalars ``gan_ab, gan_ba, align, cyc, dicyc, nmi_a, nmi_b, total`` for logging;
            ``nmi_a = NMI(x_A, G_AB(x_A))``, ``nmi_b = NMI(x_B, G_BA(x_B))`` (batch means).
        fake_b: deformed G_T^AB(x_A) (for D_B and its image pool), detached; likewise ``fake_a``.
        aligned_b: undeformed G^AB(x_A), detached; likewise ``aligned_a``.
        cycle_a: undeformed cycle G^BA(G^AB(x_A)), detached, or None when skipped (``lambda_cyc == 0``, see
            :class:`DicycleGANLoss`); likewise ``cycle_b``.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    fake_a: torch.Tensor | None = None
    fake_b: torch.Tensor | None = None
    aligned_a: torch.Tensor | None = None
    aligned_b: torch.Tensor | None = None
    cycle_a: torch.Tensor | None = None
    cycle_b: torch.Tensor | None = None


class DicycleGANLoss(nn.Module):
    """Generator objective of DicycleGAN (Wang et al. 2018, eq. 4)::

        total = gan_ab + gan_ba + lambda_align * align + lambda_cyc * cyc + lambda_dicyc * dicyc

    - ``gan_ab = mean (D_B(G_T^AB(x_A)) - 1)^2`` (LSGAN on the deformed output), ``gan_ba`` likewise;
    - ``align = 2 - NMI(x_A, G^AB(x_A)) - NMI(x_B, G^BA(x_B))`` on the undeformed outputs (eq. 1);
    - ``cyc = |G^BA(G^AB(x_A)) - x_A|_1 + |G^AB(G^BA(x_B)) - x_B|_1``, undeformed passes, mean absolute error (eq. 2);
    - ``dicyc = |G_T^BA(G_T^AB(x_A)) - x_A|_1 + |G_T^AB(G_T^BA(x_B)) - x_B|_1``, deformed passes (eq. 3).

    Generators meet :class:`Generator` (as :class:`bundle.networks.DicycleGenerator` does). The CycleGAN baseline
    is ``deformable=False`` generators with ``lambda_align = lambda_dicyc = 0``.

    No work with weight 0, or that repeats another pass, is done: a non-deformable generator runs once per input
    (its deformed and undeformed outputs are one tensor); the first translation of a deformable generator uses
    ``forward_both``; the deformed cycle is skipped when ``lambda_dicyc == 0`` and the undeformed cycle when
    ``lambda_cyc == 0``. What is then reported in ``terms``:

    - ``align``, ``nmi_a``, ``nmi_b`` are always the true values; with ``lambda_align == 0`` they are computed
      under ``torch.no_grad()`` (cheap next to a generator pass) so both modes log the same alignment monitor;
    - ``cyc`` and ``dicyc``: when both generators are non-deformable the two cycles are one pass, so both are
      reported whatever their weights (in CycleGAN mode ``dicyc == cyc``); otherwise a cycle with weight 0 is not
      computed and reported as 0, and ``cycle_a``/``cycle_b`` are None when that is the undeformed cycle.

    Gradients also reach the discriminators' parameters through the GAN terms; freeze them or zero their gradients
    before the discriminator step, as CycleGAN does.

    Opt-in terms beyond the paper (in the pseudo-CT study the undeformed pass, the one inference serves,
    kept the source's contrast); with their defaults the objective, its terms and its value are exactly the paper's:

    - ``lambda_gan_aligned * gan_aligned``, ``gan_aligned = mean (D_B(G^AB(x_A)) - 1)^2 + mean (D_A(G^BA(x_B)) - 1)^2``:
      the discriminators also judge the undeformed outputs, and :meth:`discriminator_fakes` then gives them the
      undeformed fakes beside the deformed ones (otherwise D would never learn to reject them);
    - ``alignment="local_nmi"``: ``align`` (and ``nmi_a``, ``nmi_b``) use
      :func:`local_normalized_mutual_information` over ``alignment_patch_size`` patches instead of global NMI;
    - ``alignment="mind"`` or ``"mind_ssc"``: ``nmi_a``, ``nmi_b`` are ``1 - d`` with ``d`` the
      :func:`bundle.mind.mind_distance` of source and undeformed output (Yang et al. 2018's structural term),
      so ``align = d_A + d_B``;
    - ``lambda_paired * paired``, ``paired = |G_T^AB(x_A) - y_B|_1`` (mean absolute error) for a target ``y_B`` of
      the same subject as ``x_A`` that need not overlay it (misaligned pairs, ``forward(..., paired_b=y_B)``): the
      deformed pass may absorb the misregistration while the undeformed pass stays aligned with ``x_A``.

    The terms of an enabled variant are added to ``terms`` (``gan_aligned``, ``paired``); with the defaults
    ``terms`` has exactly the paper's keys.

    Args:
        lambda_cyc: weight of the undeformed cycle loss (paper: 10).
        lambda_dicyc: weight of the deformation-invariant cycle loss (paper: 10; CycleGAN: 0).
        lambda_align: weight of the NMI alignment loss (paper: 0.9; CycleGAN: 0).
        nmi_bins: number of histogram bins of the NMI.
        nmi_sigma_ratio: Parzen window width of the NMI, in bin widths.
        lambda_gan_aligned: weight of the LSGAN term on the undeformed outputs (paper: 0; beyond the paper).
        alignment: ``"nmi"`` (paper, eq. 1), or beyond the paper ``"local_nmi"``, ``"mind"``, ``"mind_ssc"``.
        alignment_patch_size: patch size of the local NMI.
        alignment_patch_stride: step between local NMI patches (default: the patch size, non-overlapping).
        lambda_paired: weight of the L1 term between the deformed output and a paired target (paper: 0; beyond the
            paper; needs ``paired_b`` in :meth:`forward`).

    Example::

        loss_fn = DicycleGANLoss()
        out = loss_fn(real_a, real_b, g_ab, g_ba, d_a, d_b)
        out.total.backward()
        fake_a, fake_b = loss_fn.discriminator_fakes(out)  # what the discriminators then learn to reject
    """

    def __init__(
        self,
        lambda_cyc: float = 10.0,
        lambda_dicyc: float = 10.0,
        lambda_align: float = 0.9,
        nmi_bins: int = 32,
        nmi_sigma_ratio: float = 0.5,
        lambda_gan_aligned: float = 0.0,
        alignment: str = "nmi",
        alignment_patch_size: int = 16,
        alignment_patch_stride: int | None = None,
        lambda_paired: float = 0.0,
    ) -> None:
        super().__init__()
        weights = {
            "lambda_cyc": lambda_cyc,
            "lambda_dicyc": lambda_dicyc,
            "lambda_align": lambda_align,
            "lambda_gan_aligned": lambda_gan_aligned,
            "lambda_paired": lambda_paired,
        }
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        if alignment not in ALIGNMENT_MEASURES:
            raise ValueError(f"alignment must be one of {ALIGNMENT_MEASURES}, got {alignment!r}.")
        self.lambda_cyc = float(lambda_cyc)
        self.lambda_dicyc = float(lambda_dicyc)
        self.lambda_align = float(lambda_align)
        self.nmi_bins = nmi_bins
        self.nmi_sigma_ratio = nmi_sigma_ratio
        self.lambda_gan_aligned = float(lambda_gan_aligned)
        self.alignment = alignment
        self.alignment_patch_size = alignment_patch_size
        self.alignment_patch_stride = alignment_patch_stride
        self.lambda_paired = float(lambda_paired)
        self.adversarial_loss = lsgan_loss()

    @property
    def discriminate_aligned(self) -> bool:
        """Whether the discriminators should also be trained on the undeformed fakes (``lambda_gan_aligned > 0``)."""
        return self.lambda_gan_aligned != 0

    def discriminator_fakes(self, generated: DicycleGANGeneratorOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The fakes of domains A and B that the discriminators learn to reject in this step (before the image pools).

        Args:
            generated: this objective's output for the step.

        Returns:
            ``(fake_a, fake_b)``: the deformed outputs (paper) and, when :attr:`discriminate_aligned`, the undeformed
            outputs after them in the batch.
        """
        if not self.discriminate_aligned:
            return generated.fake_a, generated.fake_b
        return torch.cat((generated.fake_a, generated.aligned_a)), torch.cat((generated.fake_b, generated.aligned_b))

    def _cycles(
        self, g: Generator, fake: torch.Tensor, aligned: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Undeformed cycle g(aligned) and deformed cycle g_T(fake), each only when needed."""
        need_cyc, need_dicyc = self.lambda_cyc != 0, self.lambda_dicyc != 0
        if fake is aligned and not g.deformable:
            # both cycles are the same pass (CycleGAN mode)
            out = g(aligned) if need_cyc or need_dicyc else None
            return out, out
        if fake is aligned and need_cyc and need_dicyc:
            dicycle, cycle = g.forward_both(aligned)
            return cycle, dicycle
        if need_cyc and need_dicyc:
            # both second-stage passes in one batch: deformed on the deformed fake, undeformed on the aligned one
            n = fake.shape[0]
            out = g.forward_mixed(torch.cat((fake, aligned), dim=0), n)
            return out[n:], out[:n]
        cycle = g(aligned, deform=False) if need_cyc else None
        dicycle = g(fake, deform=True) if need_dicyc else None
        return cycle, dicycle

    def _nmi(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.alignment in ("mind", "mind_ssc"):
            return 1.0 - mind_distance(x, y, self.alignment).mean()
        if self.alignment == "local_nmi":
            return local_normalized_mutual_information(
                x, y, self.alignment_patch_size, self.alignment_patch_stride, self.nmi_bins, self.nmi_sigma_ratio
            ).mean()
        return normalized_mutual_information(x, y, self.nmi_bins, self.nmi_sigma_ratio).mean()

    def forward(
        self,
        real_a: torch.Tensor,
        real_b: torch.Tensor,
        g_ab: Generator,
        g_ba: Generator,
        d_a: nn.Module,
        d_b: nn.Module,
        paired_b: torch.Tensor | None = None,
    ) -> DicycleGANGeneratorOutput:
        """
        Args:
            real_a: images x_A of domain A, shape (N, C_A, H, W).
            real_b: images x_B of domain B (unpaired with ``real_a``), shape (M, C_B, H, W).
            g_ab: generator A -> B.
            g_ba: generator B -> A.
            d_a: discriminator of domain A (logits, or a list of features with the logits last).
            d_b: discriminator of domain B.
            paired_b: targets y_B of the subjects of ``real_a`` (same slice, not necessarily aligned), shape
                (N, C_B, H, W); needed when ``lambda_paired > 0``, ignored otherwise.

        Returns:
            :class:`DicycleGANGeneratorOutput` with the objective, its detached terms and the detached images.
        """
        if self.lambda_paired != 0 and paired_b is None:
            raise ValueError("lambda_paired > 0 needs paired_b: the paired targets of real_a (training_pairs).")
        fake_b, aligned_b = g_ab.forward_both(real_a)
        fake_a, aligned_a = g_ba.forward_both(real_b)

        gan_ab = self.adversarial_loss(discriminator_logits(d_b, fake_b), target_is_real=True, for_discriminator=False)
        gan_ba = self.adversarial_loss(discriminator_logits(d_a, fake_a), target_is_real=True, for_discriminator=False)
        total = gan_ab + gan_ba
        variant_terms: dict[str, torch.Tensor] = {}
        if self.lambda_gan_aligned != 0:
            gan_aligned = self.adversarial_loss(
                discriminator_logits(d_b, aligned_b), target_is_real=True, for_discriminator=False
            ) + self.adversarial_loss(
                discriminator_logits(d_a, aligned_a), target_is_real=True, for_discriminator=False
            )
            total = total + self.lambda_gan_aligned * gan_aligned
            variant_terms["gan_aligned"] = gan_aligned
        if self.lambda_paired != 0:
            paired = F.l1_loss(fake_b, paired_b)
            total = total + self.lambda_paired * paired
            variant_terms["paired"] = paired

        with torch.set_grad_enabled(torch.is_grad_enabled() and self.lambda_align != 0):
            nmi_a = self._nmi(real_a, aligned_b)
            nmi_b = self._nmi(real_b, aligned_a)
            align = 2.0 - nmi_a - nmi_b
        if self.lambda_align != 0:
            total = total + self.lambda_align * align

        cycle_a, dicycle_a = self._cycles(g_ba, fake_b, aligned_b)
        cycle_b, dicycle_b = self._cycles(g_ab, fake_a, aligned_a)
        zero = total.new_zeros(())
        cyc = F.l1_loss(cycle_a, real_a) + F.l1_loss(cycle_b, real_b) if cycle_a is not None else zero
        dicyc = F.l1_loss(dicycle_a, real_a) + F.l1_loss(dicycle_b, real_b) if dicycle_a is not None else zero
        if self.lambda_cyc != 0:
            total = total + self.lambda_cyc * cyc
        if self.lambda_dicyc != 0:
            total = total + self.lambda_dicyc * dicyc

        terms = {
            "gan_ab": gan_ab,
            "gan_ba": gan_ba,
            "align": align,
            "cyc": cyc,
            "dicyc": dicyc,
            "nmi_a": nmi_a,
            "nmi_b": nmi_b,
            **variant_terms,
            "total": total,
        }

        def detach(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.detach()

        return DicycleGANGeneratorOutput(
            total=total,
            terms={k: v.detach() for k, v in terms.items()},
            fake_a=fake_a.detach(),
            fake_b=fake_b.detach(),
            aligned_a=aligned_a.detach(),
            aligned_b=aligned_b.detach(),
            cycle_a=detach(cycle_a),
            cycle_b=detach(cycle_b),
        )


class GeneratorObjective(nn.Module):
    """All generator passes of one step and the generator objective, as one module: the unit that
    ``DistributedDataParallel`` wraps, so that the gradients of both generators are averaged over the ranks during
    ``backward`` (one bucketed all-reduce, not one per parameter).

    The discriminators score the deformed fakes but are not submodules: they are frozen in this step, and DDP
    would otherwise wait for (and synchronise) gradients they never receive.

    Args:
        g_ab: generator A -> B.
        g_ba: generator B -> A.
        d_a: discriminator of domain A.
        d_b: discriminator of domain B.
        loss_function: the generator objective, called as ``loss_function(real_a, real_b, g_ab, g_ba, d_a, d_b)``.

    Raises:
        TypeError: a generator without the passes of :class:`Generator`.

    Example::

        objective = GeneratorObjective(g_ab, g_ba, d_a, d_b, DicycleGANLoss())
        out = objective(real_a, real_b)
        out.total.backward()
    """

    def __init__(
        self, g_ab: nn.Module, g_ba: nn.Module, d_a: nn.Module, d_b: nn.Module, loss_function: DicycleGANLoss
    ) -> None:
        super().__init__()
        check_generator(g_ab, "g_ab")
        check_generator(g_ba, "g_ba")
        self.g_ab, self.g_ba = g_ab, g_ba
        self.loss_function = loss_function
        self.discriminators = (d_a, d_b)  # a tuple: not registered as submodules

    def forward(
        self, real_a: torch.Tensor, real_b: torch.Tensor, paired_b: torch.Tensor | None = None
    ) -> DicycleGANGeneratorOutput:
        """
        Args:
            real_a: images of domain A, (N, C, H, W).
            real_b: images of domain B, (M, C, H, W).
            paired_b: paired (not necessarily aligned) targets of ``real_a`` for the misaligned-pairs term, passed
                to the loss function only when given.

        Returns:
            The loss function's output: the objective, its terms and the generated images.
        """
        d_a, d_b = self.discriminators
        if paired_b is None:
            return self.loss_function(real_a, real_b, self.g_ab, self.g_ba, d_a, d_b)
        return self.loss_function(real_a, real_b, self.g_ab, self.g_ba, d_a, d_b, paired_b=paired_b)


class DiscriminatorObjective(nn.Module):
    """The LSGAN losses of both discriminators, as one module for ``DistributedDataParallel``.

    Args:
        d_a: discriminator of domain A.
        d_b: discriminator of domain B.

    Example::

        loss_d_a, loss_d_b = DiscriminatorObjective(d_a, d_b)(real_a, real_b, fake_a, fake_b)
    """

    def __init__(self, d_a: nn.Module, d_b: nn.Module) -> None:
        super().__init__()
        self.d_a, self.d_b = d_a, d_b

    def forward(
        self, real_a: torch.Tensor, real_b: torch.Tensor, fake_a: torch.Tensor, fake_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            real_a: real images of domain A.
            real_b: real images of domain B.
            fake_a: synthesized images of domain A (detached here: no gradient reaches the generators).
            fake_b: synthesized images of domain B.

        Returns:
            ``(loss_d_a, loss_d_b)``, scalars.
        """
        return (
            discriminator_loss(discriminator_logits(self.d_a, real_a), discriminator_logits(self.d_a, fake_a.detach())),
            discriminator_loss(discriminator_logits(self.d_b, real_b), discriminator_logits(self.d_b, fake_b.detach())),
        )
