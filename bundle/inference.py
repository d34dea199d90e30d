"""Inference: volumes in, synthesized volumes out, in the geometry and the intensity units of the target domain.

- :class:`Synthesis` is the one synthesis path (preprocess, the aligned pass of a generator, its plain ``forward(x)``,
  over the axial slices with :class:`AxialSliceInferer`, back to the input's grid and units) that inference,
  validation, evaluation, the demo and the benchmarks share;
- :func:`write_intensity_reference` records, at training time, each domain's intensity scale, and
  :class:`DenormalizeIntensityd` maps synthesized intensities back to the target's units with it (HU for CT, the
  training set's typical foreground mean and standard deviation for MR);
- :func:`find_inputs` screens a folder, a file or a datalist, and :func:`raise_for_failures` reports the inputs
  that could not be processed once the good ones are done (both in :mod:`bundle.inputs`, with the per-volume
  failure recording of the workflow).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.inputs import InferenceInputs, find_inputs, raise_for_failures
from bundle.settings import as_bool, autocast
from monai.config import KeysCollection
from monai.inferers import SliceInferer
from monai.transforms import Compose, Invertd, MapTransform
from torch import nn

__all__ = [
    "AxialSliceInferer",
    "DenormalizeIntensityd",
    "InferenceInputs",
    "Synthesis",
    "find_inputs",
    "raise_for_failures",
    "write_intensity_reference",
]

logger = logging.getLogger(__name__)


class AxialSliceInferer(SliceInferer):
    """MONAI's ``SliceInferer`` over the axial slices (last spatial axis, RAS) under the one precision setting.

    MONAI's engines apply ``amp`` as float16 CUDA autocast only; this inferer applies :func:`bundle.settings.autocast`
    (bfloat16 on the input's device, CPU included) wherever it runs, so inference, validation, evaluation, the demo
    and the benchmarks synthesize in one precision. Give the engines ``amp=False``.

    Args:
        sw_batch_size: axial slices per forward pass.
        amp: bfloat16 autocast.
    """

    def __init__(self, sw_batch_size: int = 16, amp: bool | str = False) -> None:
        super().__init__(roi_size=(-1, -1), sw_batch_size=sw_batch_size, spatial_dim=2, progress=False)
        self.amp = as_bool(amp, "amp")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """
        Args:
            inputs: a batch of volumes (N, C, X, Y, Z).
            network: the generator; its plain call is the aligned (undeformed) pass.

        Returns:
            The synthesized batch, float32.
        """
        with autocast(self.amp, inputs.device):
            return super().__call__(inputs.float(), network, *args, **kwargs).float()


class Synthesis:
    """The one synthesis path: preprocess, slice-wise aligned pass, back to the input's grid and units.

    ``preprocessing``, ``inferer`` and ``postprocessing`` are the pieces MONAI's engines take (inference and
    validation use them inside a ``SupervisedEvaluator``); :meth:`synthesize` and the call run them directly
    (evaluation, the demo, the benchmarks).

    Args:
        network: the direction's generator (weights loaded).
        preprocessing: the source domain's :func:`bundle.data.volume_preprocessing` with key ``"image"``.
        target_kind: ``"MR"`` or ``"CT"``, for :class:`DenormalizeIntensityd`.
        reference_file: the intensity reference written at training time.
        target_domain: the target's key in it (``"A"`` or ``"B"``).
        hu_window: the CT window of the preprocessing.
        sw_batch_size: axial slices per forward pass.
        amp: bfloat16 autocast (:func:`bundle.settings.autocast`).
    """

    def __init__(
        self,
        network: nn.Module,
        preprocessing: Compose,
        target_kind: str = "MR",
        reference_file: str | os.PathLike | None = None,
        target_domain: str = "B",
        hu_window: Sequence[float] = (-1000.0, 2000.0),
        sw_batch_size: int = 16,
        amp: bool | str = False,
    ) -> None:
        self.network = network
        self.preprocessing = preprocessing
        self.inferer = AxialSliceInferer(sw_batch_size, amp)
        self.postprocessing = Compose(
            [
                Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
                DenormalizeIntensityd("pred", target_kind, reference_file, target_domain, hu_window),
            ]
        )

    @torch.no_grad()
    def synthesize(self, image: torch.Tensor) -> torch.Tensor:
        """The aligned pass over a preprocessed volume (C, X, Y, Z) or batch (N, C, X, Y, Z), on the network's scale.

        Returns:
            A float32 tensor of the input's shape, on the network's device.
        """
        batched = image.ndim == 5
        device = next(self.network.parameters()).device
        x = torch.as_tensor(image).to(device)
        was_training = self.network.training
        self.network.eval()
        try:
            out = self.inferer(x if batched else x[None], self.network)
        finally:
            self.network.train(was_training)
        return out if batched else out[0]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Synthesize ``data["image"]`` (a file) into ``"pred"``, on the input's grid and in the target's units."""
        d = self.preprocessing(dict(data))
        d["pred"] = self.synthesize(d["image"]).cpu()
        return self.postprocessing(d)


def write_intensity_reference(
    path: str | os.PathLike,
    domains: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]],
    hu_window: Sequence[float] = (-1000.0, 2000.0),
) -> dict[str, dict[str, Any]]:
    """Record each domain's intensity scale next to the models, for :class:`DenormalizeIntensityd`.

    MR: the median over the domain's training volumes of the foreground mean and standard deviation that
    :class:`~bundle.data.ForegroundZScored` recorded. CT: the HU window. Written atomically (rank 0 only).

    Args:
        path: the JSON file (usually ``models/intensity_reference.json``).
        domains: ``{"A": (kind, preprocessed volumes), "B": (kind, volumes)}``.
        hu_window: the CT window of the preprocessing.

    Returns:
        The reference, e.g. ``{"A": {"kind": "MR", "mean": 412.0, "std": 130.5}, "B": {"kind": "CT", ...}}``.
    """
    reference: dict[str, dict[str, Any]] = {}
    for domain, (kind, volumes) in domains.items():
        if len(volumes) == 0:
            raise ValueError(f"the training list of domain {domain} is empty: nothing to train on.")
        if kind == "CT":
            reference[domain] = {"kind": "CT", "hu_window": [float(v) for v in hu_window]}
            continue
        stats = [(v["image"].meta["zscore_mean"], v["image"].meta["zscore_std"]) for v in volumes]
        mean, std = np.median(np.asarray(stats, dtype=float), axis=0)
        reference[domain] = {"kind": "MR", "mean": float(mean), "std": float(std), "volumes": len(stats)}
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    if rank0 or torch.distributed.get_rank() == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(reference, indent=2), encoding="utf-8")
        os.replace(temporary, path)
    return reference


class DenormalizeIntensityd(MapTransform):
    """Map synthesized intensities from the network's scale to the target domain's units.

    CT: [-1, 1] back to the HU window (so the output is in HU). MR: ``z * std + mean`` with the target domain's
    reference from :func:`write_intensity_reference`; without a reference file MR outputs stay z-scored and a
    warning names the missing file.

    Args:
        keys: keys of the synthesized images.
        kind: the target domain's kind, ``"MR"`` or ``"CT"``.
        reference_file: the JSON written by :func:`write_intensity_reference`.
        domain: the target domain's key in that file (``"A"`` or ``"B"``).
        hu_window: CT window used when the file has none.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        kind: str,
        reference_file: str | os.PathLike | None = None,
        domain: str = "B",
        hu_window: Sequence[float] = (-1000.0, 2000.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.kind, self.reference_file, self.domain, self.hu_window = kind, reference_file, domain, hu_window

    @functools.cached_property
    def _scale_shift(self) -> tuple[float, float]:
        # read on first use: training builds this transform before it writes the reference
        reference = {}
        if self.reference_file is not None and Path(self.reference_file).is_file():
            reference = json.loads(Path(self.reference_file).read_text(encoding="utf-8")).get(self.domain, {})
        if self.kind == "CT":
            low, high = reference.get("hu_window", self.hu_window)
            return (high - low) / 2.0, (high + low) / 2.0
        if "mean" in reference:
            return reference["std"], reference["mean"]
        logger.warning(
            f"no MR intensity reference for domain {self.domain} in {self.reference_file}: outputs stay z-scored."
        )
        return 1.0, 0.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            scale, shift = self._scale_shift
            d[key] = d[key] * scale + shift
        return d
