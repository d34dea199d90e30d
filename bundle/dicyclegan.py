"""The DicycleGAN step (Wang et al. 2018): the generator objective of eq. (4) and both steps as modules."""

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

__all__ = ["DicycleGANGeneratorOutput", "DicycleGANLoss", "DiscriminatorObjective", "Generator", "GeneratorObjective"]
__all__ += ["check_generator", "discriminator_logits"]


@runtime_checkable
class Generator(Protocol):
    """The passes the step asks of a generator: ``g(x)`` is G(x), ``g(x, deform=True)`` G_T(x), ``forward_both(x)``
    ``(G_T(x), G(x))`` (one tensor twice when not ``deformable``), ``forward_mixed(x, n)`` deforms ``x[:n]`` only."""

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
    """Result of :class:`DicycleGANLoss`; every tensor but ``total`` is detached.

    Attributes:
        total: the objective of eq. (4), a scalar with gradient.
        terms: scalars ``gan_ab, gan_ba, align, cyc, dicyc, nmi_a, nmi_b, total`` (``nmi_a = NMI(x_A, G_AB(x_A))``).
        fake_b: deformed G_T^AB(x_A) (for D_B and its image pool); likewise ``fake_a``.
        aligned_b: undeformed G^AB(x_A); likewise ``aligned_a``.
        cycle_a: undeformed cycle G^BA(G^AB(x_A)), None when skipped (``lambda_cyc == 0``); likewise ``cycle_b``.
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
    """Generator objective of DicycleGAN (Wang et al. 2018, eq. 4),
    ``total = gan_ab + gan_ba + lambda_align * align + lambda_cyc * cyc + lambda_dicyc * dicyc``:
    ``gan_ab = mean (D_B(G_T^AB(x_A)) - 1)^2`` (``gan_ba`` likewise); ``align = 2 - NMI(x_A, G^AB(x_A)) -
    NMI(x_B, G^BA(x_B))`` (eq. 1); ``cyc = |G^BA(G^AB(x_A)) - x_A|_1 + |G^AB(G^BA(x_B)) - x_B|_1`` (eq. 2) and
    ``dicyc`` the same with the deformed passes G_T (eq. 3), L1 as mean absolute error.

    Passes with weight 0, or that repeat another, are not run: a cycle with weight 0 is reported as 0 (with two
    non-deformable generators ``dicyc == cyc``, both reported); ``align``, ``nmi_a``, ``nmi_b`` always are. The
    GAN terms also give the discriminators gradients: zero them before their step.

    Beyond the paper (off by default; enabled, they add ``gan_aligned`` / ``paired`` to ``terms``):
    ``gan_aligned = mean (D_B(G^AB(x_A)) - 1)^2 + mean (D_A(G^BA(x_B)) - 1)^2`` (then :meth:`discriminator_fakes`
    adds the undeformed fakes); ``paired = |G_T^AB(x_A) - y_B|_1`` for a target ``y_B`` of the subject of ``x_A``
    that need not overlay it; with ``alignment="mind"``/``"mind_ssc"``, ``nmi_a = 1 - mind_distance(x_A, G^AB(x_A))``.

    Args:
        lambda_cyc: weight of the undeformed cycle loss (paper: 10). Any negative weight is a ValueError.
        lambda_dicyc: weight of the deformation-invariant cycle loss (paper: 10; CycleGAN: 0).
        lambda_align: weight of the NMI alignment loss (paper: 0.9; CycleGAN: 0).
        nmi_bins: number of histogram bins of the NMI.
        nmi_sigma_ratio: Parzen window width of the NMI, in bin widths.
        lambda_gan_aligned: weight of ``gan_aligned`` (paper: 0).
        alignment: ``"nmi"`` (paper), ``"local_nmi"`` (:func:`local_normalized_mutual_information`), ``"mind"``
            or ``"mind_ssc"`` (:func:`bundle.mind.mind_distance`); another is a ValueError.
        alignment_patch_size: patch size of the local NMI.
        alignment_patch_stride: step between local NMI patches (default: the patch size).
        lambda_paired: weight of ``paired`` (paper: 0; needs ``paired_b`` in :meth:`forward`).
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
        weights = dict(lambda_cyc=lambda_cyc, lambda_dicyc=lambda_dicyc, lambda_align=lambda_align)
        weights.update(lambda_gan_aligned=lambda_gan_aligned, lambda_paired=lambda_paired)
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
            setattr(self, name, float(value))
        if alignment not in ALIGNMENT_MEASURES:
            raise ValueError(f"alignment must be one of {ALIGNMENT_MEASURES}, got {alignment!r}.")
        self.nmi_bins, self.nmi_sigma_ratio = nmi_bins, nmi_sigma_ratio
        self.alignment, self.alignment_patch_size = alignment, alignment_patch_size
        self.alignment_patch_stride = alignment_patch_stride
        self.adversarial_loss = lsgan_loss()

    @property
    def discriminate_aligned(self) -> bool:
        """Whether the discriminators should also be trained on the undeformed fakes (``lambda_gan_aligned > 0``)."""
        return self.lambda_gan_aligned != 0

    def discriminator_fakes(self, generated: DicycleGANGeneratorOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fake_a, fake_b)`` the discriminators learn to reject (before the image pools): the deformed outputs of
        ``generated`` (paper), followed in the batch by the undeformed ones when :attr:`discriminate_aligned`."""
        if not self.discriminate_aligned:
            return generated.fake_a, generated.fake_b
        return torch.cat((generated.fake_a, generated.aligned_a)), torch.cat((generated.fake_b, generated.aligned_b))

    def _cycles(
        self, g: Generator, fake: torch.Tensor, aligned: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Undeformed cycle g(aligned) and deformed cycle g_T(fake), each only when needed."""
        need_cyc, need_dicyc = self.lambda_cyc != 0, self.lambda_dicyc != 0
        if fake is aligned and not g.deformable:  # both cycles are the same pass (CycleGAN mode)
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
        """The :class:`DicycleGANGeneratorOutput` of one step.

        Args:
            real_a, real_b: images x_A (N, C_A, H, W) of domain A and, unpaired, x_B (M, C_B, H, W) of domain B.
            g_ab, g_ba: generators A -> B and B -> A.
            d_a, d_b: discriminators of domains A and B (logits, or a list of features with the logits last).
            paired_b: targets y_B (N, C_B, H, W) of the subjects and slices of ``real_a``, not necessarily aligned;
                needed (else a ValueError) when ``lambda_paired > 0``, ignored otherwise.
        """
        if self.lambda_paired != 0 and paired_b is None:
            raise ValueError("lambda_paired > 0 needs paired_b: the paired targets of real_a (training_pairs).")
        fake_b, aligned_b = g_ab.forward_both(real_a)
        fake_a, aligned_a = g_ba.forward_both(real_b)

        def gan(d: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return self.adversarial_loss(discriminator_logits(d, x), target_is_real=True, for_discriminator=False)

        gan_ab, gan_ba = gan(d_b, fake_b), gan(d_a, fake_a)
        total = gan_ab + gan_ba
        variant_terms: dict[str, torch.Tensor] = {}
        if self.lambda_gan_aligned != 0:
            gan_aligned = gan(d_b, aligned_b) + gan(d_a, aligned_a)
            total = total + self.lambda_gan_aligned * gan_aligned
            variant_terms["gan_aligned"] = gan_aligned
        if self.lambda_paired != 0:
            paired = F.l1_loss(fake_b, paired_b)
            total = total + self.lambda_paired * paired
            variant_terms["paired"] = paired
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.lambda_align != 0):
            nmi_a, nmi_b = self._nmi(real_a, aligned_b), self._nmi(real_b, aligned_a)
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
        terms = dict(gan_ab=gan_ab, gan_ba=gan_ba, align=align, cyc=cyc, dicyc=dicyc, nmi_a=nmi_a, nmi_b=nmi_b)
        terms = {k: v.detach() for k, v in {**terms, **variant_terms, "total": total}.items()}
        images = dict(fake_a=fake_a, fake_b=fake_b, aligned_a=aligned_a, aligned_b=aligned_b, cycle_a=cycle_a)
        images = {k: None if v is None else v.detach() for k, v in {**images, "cycle_b": cycle_b}.items()}
        return DicycleGANGeneratorOutput(total=total, terms=terms, **images)


class GeneratorObjective(nn.Module):
    """All generator passes of one step and the generator objective, as one module for ``DistributedDataParallel``;
    the discriminators are not submodules (frozen in this step, DDP would wait for their gradients). A TypeError
    for a generator without the passes of :class:`Generator`.

    Args:
        g_ab, g_ba: generators A -> B and B -> A.
        d_a, d_b: discriminators of domains A and B.
        loss_function: the generator objective, called as ``loss_function(real_a, real_b, g_ab, g_ba, d_a, d_b)``.
    """

    def __init__(
        self, g_ab: nn.Module, g_ba: nn.Module, d_a: nn.Module, d_b: nn.Module, loss_function: DicycleGANLoss
    ) -> None:
        super().__init__()
        check_generator(g_ab, "g_ab")
        check_generator(g_ba, "g_ba")
        self.g_ab, self.g_ba, self.loss_function = g_ab, g_ba, loss_function
        self.discriminators = (d_a, d_b)  # a tuple: not registered as submodules

    def forward(
        self, real_a: torch.Tensor, real_b: torch.Tensor, paired_b: torch.Tensor | None = None
    ) -> DicycleGANGeneratorOutput:
        """The loss function's output for images ``real_a`` (N, C, H, W) and ``real_b`` (M, C, H, W); ``paired_b``
        (paired, not necessarily aligned targets of ``real_a``) is passed on only when given."""
        kwargs = {} if paired_b is None else {"paired_b": paired_b}
        return self.loss_function(real_a, real_b, self.g_ab, self.g_ba, *self.discriminators, **kwargs)


class DiscriminatorObjective(nn.Module):
    """The LSGAN losses of both discriminators ``d_a`` and ``d_b``, as one module for ``DistributedDataParallel``."""

    def __init__(self, d_a: nn.Module, d_b: nn.Module) -> None:
        super().__init__()
        self.d_a, self.d_b = d_a, d_b

    def forward(
        self, real_a: torch.Tensor, real_b: torch.Tensor, fake_a: torch.Tensor, fake_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scalars ``(loss_d_a, loss_d_b)``; the fakes are detached here (no gradient reaches the generators)."""
        return (
            discriminator_loss(discriminator_logits(self.d_a, real_a), discriminator_logits(self.d_a, fake_a.detach())),
            discriminator_loss(discriminator_logits(self.d_b, real_b), discriminator_logits(self.d_b, fake_b.detach())),
        )
