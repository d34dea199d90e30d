"""Inference: :class:`Synthesis` (shared by inference, validation, evaluation, demo and benchmarks) gives volumes on
the input's grid, in HU or the MR training set's foreground scale (:class:`DenormalizeIntensityd`)."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from bundle.inputs import InferenceInputs, find_inputs, raise_for_failures
from bundle.settings import as_bool, autocast, write_json
from monai.config import KeysCollection
from monai.inferers import SliceInferer
from monai.transforms import Compose, Invertd, MapTransform
from torch import nn

__all__ = ["AxialSliceInferer", "DenormalizeIntensityd", "InferenceInputs", "Synthesis", "check_model_folder"]
__all__ += ["find_inputs", "load_weights", "raise_for_failures", "read_intensity_reference", "report_errors_briefly"]
__all__ += ["write_intensity_reference"]

logger = logging.getLogger(__name__)


class AxialSliceInferer(SliceInferer):
    """MONAI's ``SliceInferer`` over the axial slices (last spatial axis, RAS) under :func:`bundle.settings.autocast`
    (bfloat16 on the input's device, CPU included; give MONAI's engines ``amp=False``).

    Args:
        sw_batch_size: axial slices per forward pass.
        amp: bfloat16 autocast.
        compile: ``torch.compile`` the network (opt-in; once per network, again for each new slice shape).
    """

    def __init__(self, sw_batch_size: int = 16, amp: bool | str = False, compile: bool | str = False) -> None:
        super().__init__(roi_size=(-1, -1), sw_batch_size=sw_batch_size, spatial_dim=2, progress=False)
        self.amp, self.compile = as_bool(amp, "amp"), as_bool(compile, "compile")
        self._compiled: tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None = None

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """Synthesize a batch of volumes (N, C, X, Y, Z) with ``network``'s plain (aligned) call; returns float32."""
        if self.compile and (self._compiled is None or self._compiled[0] is not network):
            from bundle.compilation import load_inductor

            load_inductor()
            self._compiled = (network, torch.compile(network))  # kept for later volumes
        network = self._compiled[1] if self.compile and self._compiled is not None else network
        with autocast(self.amp, inputs.device):
            return super().__call__(inputs.float(), network, *args, **kwargs).float()


class Synthesis:
    """Preprocess, slice-wise aligned pass, back to the input's grid and units: ``preprocessing``, ``inferer`` and
    ``postprocessing`` for MONAI's engines, or run directly by :meth:`synthesize` and the call.

    Args:
        network: the direction's generator (weights loaded).
        preprocessing: the source domain's :func:`bundle.data.volume_preprocessing` with key ``"image"``.
        target_kind: ``"MR"`` or ``"CT"``, for :class:`DenormalizeIntensityd`.
        reference_file: the intensity reference written at training time.
        target_domain: the target's key in it (``"A"`` or ``"B"``).
        hu_window: the CT window of the preprocessing.
        sw_batch_size: axial slices per forward pass.
        amp: bfloat16 autocast (:func:`bundle.settings.autocast`).
        compile: ``torch.compile`` the aligned pass (opt-in); RuntimeError where inductor has no toolchain.
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
        compile: bool | str = False,
    ) -> None:
        self.network, self.preprocessing = network, preprocessing
        if as_bool(compile, "compile"):
            from bundle.compilation import compile_problem

            problem = compile_problem(next(network.parameters()).device)
            if problem is not None:
                raise RuntimeError(f"compile=True cannot run here: {problem}. Leave compile false (eager).")
        self.inferer = AxialSliceInferer(sw_batch_size, amp, compile)
        invert = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)
        denormalize = DenormalizeIntensityd("pred", target_kind, reference_file, target_domain, hu_window)
        self.postprocessing = Compose([invert, denormalize])

    @torch.no_grad()
    def synthesize(self, image: torch.Tensor) -> torch.Tensor:
        """Aligned pass over a preprocessed (C, X, Y, Z) or (N, C, X, Y, Z): float32, the network's scale and device."""
        batched = image.ndim == 5
        x = torch.as_tensor(image).to(next(self.network.parameters()).device)
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
    """Record (atomically, rank 0 only) and return each domain's intensity scale, for :class:`DenormalizeIntensityd`,
    e.g. ``{"A": {"kind": "MR", "mean": 412.0, "std": 130.5, "volumes": 8}, "B": {"kind": "CT", "hu_window": ...}}``:
    MR the median over the volumes of :class:`~bundle.data.ForegroundZScored`'s foreground mean and std; CT the window.

    Args:
        path: the JSON file (usually ``models/intensity_reference.json``).
        domains: ``{"A": (kind, preprocessed volumes), "B": (kind, volumes)}``.
        hu_window: the CT window of the preprocessing.

    Raises:
        ValueError: if a domain has no volumes.
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
    write_json(Path(path), reference)
    return reference


def _brief_excepthook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    """Print an uncaught error's innermost cause alone; the traceback goes to the log at DEBUG level."""
    if issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, error, trace)
    root = error
    while root.__cause__ is not None:  # MONAI's config parser wraps errors in "Failed to evaluate" layers
        root = root.__cause__
    logger.debug("".join(traceback.format_exception(kind, error, trace)))
    text = str(root).strip()
    print(f"{type(root).__name__}: {text}" if text else type(root).__name__, file=sys.stderr)
    print("(run again with --debug true for the traceback)", file=sys.stderr)


def report_errors_briefly(debug: bool | str = False, command_line_only: bool = True) -> None:
    """Make an error that ends a command-line run print its one-line reason alone (the traceback is logged at DEBUG).

    Args:
        debug: keep Python's traceback (``--debug true``).
        command_line_only: change nothing unless the process runs ``python -m monai.bundle``.
    """
    if as_bool(debug, "debug"):
        sys.excepthook = sys.__excepthook__
        return
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if not command_line_only or getattr(spec, "name", None) in ("monai.bundle.__main__", "monai.bundle"):
        sys.excepthook = _brief_excepthook


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def read_intensity_reference(path: str | os.PathLike | None, domain: str, kind: str) -> dict[str, Any] | None:
    """The checked intensity reference of one domain, or None where there is no file (MR outputs then stay z-scored).

    Args:
        path: the JSON written by :func:`write_intensity_reference`.
        domain: the domain's key in it (``"A"`` or ``"B"``).
        kind: the domain's kind from the model's settings, ``"MR"`` or ``"CT"``.

    Raises:
        ValueError: in one line naming the file, if it is not valid JSON, has no entry for ``domain``, or the entry
            contradicts ``kind`` or lacks a finite ``mean`` and positive ``std`` (MR) or a ``hu_window`` (CT).
    """
    if path is None or not Path(path).is_file():
        return None
    try:
        reference = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not a readable intensity reference ({type(error).__name__}: {error}).") from None
    entry = reference.get(domain) if isinstance(reference, dict) else None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: no intensity reference for domain {domain} (expected an object under {domain!r}).")
    if entry.get("kind", kind) != kind:
        raise ValueError(
            f"{path}: domain {domain} is {entry.get('kind')!r} there but {kind!r} in the model's settings."
        )
    if kind == "CT":
        window = entry.get("hu_window")
        valid = isinstance(window, list) and len(window) == 2 and all(map(_number, window)) and window[0] < window[1]
        if window is not None and not valid:
            raise ValueError(f"{path}: domain {domain}: 'hu_window' must be [low, high] in HU, got {window!r}.")
    elif not (_number(entry.get("mean")) and _number(entry.get("std")) and entry["std"] > 0):
        raise ValueError(
            f"{path}: domain {domain}: expected a finite 'mean' and a positive 'std', got "
            f"mean={entry.get('mean')!r}, std={entry.get('std')!r}."
        )
    return entry


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A generator's state_dict, loaded with ``weights_only=True``.

    Args:
        path: a bare state_dict (training's ``model.pt``), or ``{"model": state_dict}``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: in one line naming the file, if it is truncated or corrupted, holds objects ``weights_only``
            loading refuses, or is not a state_dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (train first, or set ckpt_dir to a trained model).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text would advise weights_only=False, i.e. running the file's code
        raise ValueError(
            f"model file {path} holds Python objects other than tensors and plain containers and is refused (it is "
            "loaded with weights_only=True, which never runs code from the file); save the generator's bare "
            "state_dict: torch.save(generator.state_dict(), path)."
        ) from None
    except Exception as error:  # zip reader, EOF, unpickler: every one means a damaged file
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = f"{type(error).__name__}{': ' + text.split('. ')[0] if text else ''}"
        raise ValueError(
            f"model file {path} ({path.stat().st_size} bytes) is truncated or corrupted, not a complete PyTorch "
            f"checkpoint ({detail}); copy it again from the training run."
        ) from None
    if isinstance(state, dict) and set(state) == {"model"} and isinstance(state["model"], dict):
        state = state["model"]  # as MONAI's CheckpointLoader accepts it
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"model file {path} is not a state_dict of tensors (got {type(state).__name__}).")
    return state


def check_model_folder(
    model_file: str | os.PathLike,
    network: nn.Module,
    reference_file: str | os.PathLike | None = None,
    target_domain: str = "B",
    target_kind: str = "MR",
) -> None:
    """Before any input is touched: load the weights into the network and check the intensity reference.

    Args:
        model_file: the direction's generator weights.
        network: the generator built from the settings; the weights are loaded into it.
        reference_file: the intensity reference; may be missing (MR outputs then stay z-scored).
        target_domain: the target's key in the reference.
        target_kind: the target's kind in the settings.

    Raises:
        FileNotFoundError, ValueError: in one line naming the file and what is wrong.
    """
    state = load_weights(model_file)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        counts = ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
        parts = [f"{len(keys)} {what}" for keys, what in counts if keys]
        k = (shapes or missing or unexpected)[0]
        example = f"{k} is {list(state[k].shape)}, the network's {list(expected[k].shape)}" if shapes else k
        raise ValueError(
            f"model file {model_file} does not fit the network built from settings.json (tensors: "
            f"{', '.join(parts)}; e.g. {example}): the weights and settings.json come from different trainings."
        )
    network.load_state_dict(state)
    read_intensity_reference(reference_file, target_domain, target_kind)


class DenormalizeIntensityd(MapTransform):
    """Map synthesized intensities from the network's scale to the target domain's units: CT [-1, 1] to the HU
    window; MR ``z * std + mean`` (:func:`write_intensity_reference`), or z-scored with a warning without that file.

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
        reference = read_intensity_reference(self.reference_file, self.domain, self.kind) or {}
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
