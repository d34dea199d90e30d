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
    "check_model_folder",
    "find_inputs",
    "load_weights",
    "raise_for_failures",
    "read_intensity_reference",
    "report_errors_briefly",
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
        compile: run the network through ``torch.compile`` (opt-in; compiled once per network, and again for each
            new slice shape, e.g. the last, shorter batch of slices; then dynamic sizes).
    """

    def __init__(self, sw_batch_size: int = 16, amp: bool | str = False, compile: bool | str = False) -> None:
        super().__init__(roi_size=(-1, -1), sw_batch_size=sw_batch_size, spatial_dim=2, progress=False)
        self.amp = as_bool(amp, "amp")
        self.compile = as_bool(compile, "compile")
        self._compiled: tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] | None = None

    def _network(self, network: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``network``, or its compiled module (kept, so later volumes reuse its kernels) when :attr:`compile`."""
        if not self.compile:
            return network
        if self._compiled is None or self._compiled[0] is not network:
            from bundle.compilation import load_inductor

            load_inductor()
            self._compiled = (network, torch.compile(network))
        return self._compiled[1]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        """
        Args:
            inputs: a batch of volumes (N, C, X, Y, Z).
            network: the generator; its plain call is the aligned (undeformed) pass.

        Returns:
            The synthesized batch, float32.
        """
        with autocast(self.amp, inputs.device):
            return super().__call__(inputs.float(), self._network(network), *args, **kwargs).float()


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
        compile: ``torch.compile`` the aligned pass (opt-in; pays when many volumes of one shape are synthesized on a
            GPU, see the README); an error where inductor has no toolchain (:func:`bundle.compilation.compile_problem`).
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
        self.network = network
        self.preprocessing = preprocessing
        if as_bool(compile, "compile"):
            from bundle.compilation import compile_problem

            problem = compile_problem(next(network.parameters()).device)
            if problem is not None:
                raise RuntimeError(f"compile=True cannot run here: {problem}. Leave compile false (eager).")
        self.inferer = AxialSliceInferer(sw_batch_size, amp, compile)
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


def _root(error: BaseException) -> BaseException:
    """The innermost cause: MONAI's config parser wraps an expression's error in "Failed to evaluate" layers."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _brief_excepthook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    """Print an uncaught error as its reason alone; the traceback goes to the log at DEBUG level."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    root = _root(error)
    logger.debug("".join(traceback.format_exception(kind, error, trace)))
    text = str(root).strip()
    print(f"{type(root).__name__}: {text}" if text else type(root).__name__, file=sys.stderr)
    print("(run again with --debug true for the traceback)", file=sys.stderr)


def report_errors_briefly(debug: bool | str = False, command_line_only: bool = True) -> None:
    """Make an error that ends a command-line run print its one-line reason alone, without tracebacks.

    The reasons of this bundle's errors name the file and what is wrong; the tracebacks of the config parser and
    the engines around them (dozens of lines each) only hide them. With ``debug`` Python's own report is kept; the
    traceback is also logged at DEBUG level, for a log file configured to keep it (``--logging_file``).

    Args:
        debug: keep Python's traceback (``--debug true``).
        command_line_only: change nothing unless the process runs ``python -m monai.bundle`` (a script or a test
            calling ``monai.bundle.run`` keeps its own error handling).
    """
    if as_bool(debug, "debug"):
        sys.excepthook = sys.__excepthook__
        return
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if command_line_only and getattr(spec, "name", None) not in ("monai.bundle.__main__", "monai.bundle"):
        return
    sys.excepthook = _brief_excepthook


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def read_intensity_reference(path: str | os.PathLike | None, domain: str, kind: str) -> dict[str, Any] | None:
    """The intensity reference of one domain, checked: what :class:`DenormalizeIntensityd` maps outputs back with.

    Args:
        path: the JSON written by :func:`write_intensity_reference`.
        domain: the domain's key in it (``"A"`` or ``"B"``).
        kind: the domain's kind from the model's settings, ``"MR"`` or ``"CT"``.

    Returns:
        The domain's entry, or None where there is no file (MR outputs then stay z-scored).

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
        if window is not None and not (
            isinstance(window, list) and len(window) == 2 and all(map(_number, window)) and window[0] < window[1]
        ):
            raise ValueError(f"{path}: domain {domain}: 'hu_window' must be [low, high] in HU, got {window!r}.")
    elif not (_number(entry.get("mean")) and _number(entry.get("std")) and entry["std"] > 0):
        raise ValueError(
            f"{path}: domain {domain}: expected a finite 'mean' and a positive 'std', got "
            f"mean={entry.get('mean')!r}, std={entry.get('std')!r}."
        )
    return entry


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A generator's state_dict, loaded with ``weights_only=True``; any problem is one line naming the file.

    Args:
        path: a bare state_dict (what training writes as ``model.pt``), or ``{"model": state_dict}``.

    Returns:
        The state_dict.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is truncated or corrupted, holds objects ``weights_only`` loading refuses, or is not a
            state_dict of tensors.
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
        size = path.stat().st_size
        raise ValueError(
            f"model file {path} ({size} bytes) is truncated or corrupted, not a complete PyTorch checkpoint ({detail});"
            " copy it again from the training run."
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
    """Check the trained model before any input is touched: the weights load (``weights_only=True``) and fit the
    network built from ``settings.json``, and the intensity reference is readable.

    Args:
        model_file: the direction's generator weights.
        network: the generator built from the settings; the weights are loaded into it.
        reference_file: the intensity reference; a missing one is allowed (MR outputs then stay z-scored).
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
        example = (
            f"{shapes[0]} is {list(state[shapes[0]].shape)}, the network's {list(expected[shapes[0]].shape)}"
            if shapes
            else (missing or unexpected)[0]
        )
        raise ValueError(
            f"model file {model_file} does not fit the network built from settings.json (tensors: "
            f"{', '.join(parts)}; e.g. {example}): the weights and settings.json come from different trainings."
        )
    network.load_state_dict(state)
    read_intensity_reference(reference_file, target_domain, target_kind)


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
