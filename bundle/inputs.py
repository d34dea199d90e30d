"""Inference inputs: what to synthesize, where each output goes, and what could not be done (a failure of one
volume is recorded, the run goes on with the next, and :func:`raise_for_failures` lists every failure at the end)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.datalist import IMAGE_SUFFIXES, load_datalist, screen_volume, volume_stem
from bundle.outputs import DICOM_FILES_KEY, OUTPUT_KEY, remove_stale_partials
from bundle.settings import as_bool
from bundle.volumes import dicom_series
from monai.data import Dataset
from monai.engines import SupervisedEvaluator

__all__ = ["FAILURE_KEY", "SOURCE_KEY", "InferenceInputs", "TolerantDataset", "TolerantEvaluator", "find_inputs"]
__all__ += ["prepare_output_dir", "raise_for_failures"]

logger = logging.getLogger(__name__)

FAILURE_KEY = "failure"  # an item that failed to load or preprocess: its reason
SOURCE_KEY = "source"  # what the user gave, naming the input in every message


def _reason(error: BaseException) -> str:
    """The first line of the innermost error: MONAI wraps transform errors in "applying transform ..." layers."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


@dataclass
class InferenceInputs:
    """The inputs of an inference run: ``good``: entries ``{"image": path (or the slice files of a DICOM series),
    "source": what the user gave, "output": the file to write}``; ``failures``: source -> problem (screening and run);
    ``existing``: source -> its output, already there and left as it is (``skip_existing``), counted as done."""

    good: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    existing: dict[str, str] = field(default_factory=dict)

    def record(self, source: str, problem: str) -> None:
        """Set ``source`` aside with its problem (logged at once, listed again by :func:`raise_for_failures`)."""
        logger.warning(f"skipping {source}: {problem}")
        self.failures[str(source)] = problem


def prepare_output_dir(output_dir: str | os.PathLike) -> Path:
    """Check, before any work, that ``output_dir`` can be written or created (nothing is created); return it.

    Raises:
        NotADirectoryError: if it (or a parent) is a file.
        PermissionError: if it cannot be created or written to.
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output_dir {folder} is not a folder: File exists.")
    existing = folder if folder.exists() else next(p for p in Path(os.path.abspath(folder)).parents if p.exists())
    if not existing.is_dir():  # a parent of the folder to create is a file
        raise NotADirectoryError(f"output_dir {folder} cannot be created: Not a directory ({existing}).")
    try:  # a real write: permission bits alone say nothing for root or on read-only mounts
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        what = "is not writable" if existing == folder else f"cannot be created in {existing}"
        raise PermissionError(f"output_dir {folder} {what}: {error.strerror}.") from None
    return folder


def _file_entry(path: Path) -> dict[str, Any]:
    return {"image": str(path), SOURCE_KEY: str(path), "stem": volume_stem(path)}


def _series_entries(folder: Path, name: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One entry per DICOM series of ``folder`` (found by content), named after ``name``; and every file used."""
    series = dicom_series(folder)
    if len(series) == 1:  # a whole folder is read by MONAI's ITKReader as it is
        files = list(series[0].files)
        return [{"image": str(folder), SOURCE_KEY: str(folder), "stem": name, DICOM_FILES_KEY: files}], files
    # outputs named by series number; series sharing a number (or without one) by their rank among them
    counts, seen, entries = Counter(s.number for s in series), Counter(), []
    for s in series:
        seen[s.number] += 1
        tag = f"s{s.number if s.number is not None else 'x'}" + (f"-{seen[s.number]}" if counts[s.number] > 1 else "")
        src = f"{folder} [series {s.uid}{f', {s.description}' if s.description else ''}]"
        entries.append(
            {"image": list(s.files), SOURCE_KEY: src, "stem": f"{name}_{tag}", DICOM_FILES_KEY: list(s.files)}
        )
    return entries, [f for s in series for f in s.files]


def find_inputs(
    input_dir: str | os.PathLike | None = None,
    input_file: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    datalist_key: str = "test",
    datalist_field: str = "A",
    output_dir: str | os.PathLike | None = None,
    output_postfix: str = "",
    output_ext: str = ".nii.gz",
    overwrite: bool | str = False,
    skip_existing: bool | str = False,
    pixdim: Sequence[float] | None = None,
) -> InferenceInputs:
    """Collect and screen the volumes to synthesize and plan their outputs (:class:`InferenceInputs`); unusable ones
    are set aside. Outputs: ``<output_dir>/<input name>_<output_postfix><output_ext>`` (a series of a folder holding
    several: ``<folder>_s<series number>_...``); an input of this run is never replaced.

    Args:
        input_dir: folder of image files and DICOM series (by content), in it and its sub-folders but ``output_dir``.
        input_file: one volume or one DICOM series folder.
        datalist, dataset_dir: datalist JSON and the folder its paths are relative to (default: the JSON's folder).
        datalist_key, datalist_field: the list, and the path of each entry (``image`` where an entry has none).
        output_dir: where the outputs go; without it no output is planned (screening only).
        output_postfix, output_ext: appended to each input's name (e.g. the target contrast ``"T2"``), extension.
        overwrite, skip_existing: replace existing outputs (never inputs), or keep them and count their inputs as done.
        pixdim: the voxel size the model was trained at (mm); inputs with voxels much thicker get a warning.

    Raises:
        ValueError: if not exactly one source is given, both ``overwrite`` and ``skip_existing``, the source holds
            no volume at all, or ``output_dir`` is ``input_dir``.
        FileNotFoundError: if the folder, the file or the datalist does not exist.
    """
    sources = (("input_dir", input_dir), ("input_file", input_file), ("datalist", datalist))
    given = [name for name, value in sources if value]
    if len(given) != 1:
        raise ValueError(f"give exactly one of input_dir, input_file, datalist (got {given or 'none'}).")
    overwrite, skip_existing = as_bool(overwrite, "overwrite"), as_bool(skip_existing, "skip_existing")
    if overwrite and skip_existing:
        raise ValueError("--overwrite true replaces existing outputs, --skip_existing true keeps them: give one.")
    out = Path(output_dir).resolve() if output_dir else None
    entries, unknown = [], []
    if input_dir:
        folder = Path(input_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"input_dir {folder} does not exist or is not a folder.")
        if out is not None and out == folder.resolve():
            raise ValueError(
                f"output_dir {output_dir} is input_dir: the outputs would mix with the inputs and a later run would "
                "take them as inputs; choose another output_dir (a sub-folder of input_dir is fine)."
            )
        # DICOM series among the folder's own files (the folder may itself be a series folder)
        entries, used = _series_entries(folder, folder.resolve().name)
        used_set = {os.path.abspath(p) for p in used}
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or os.path.abspath(path) in used_set:
                continue
            if path.is_dir():
                if out is not None and out == path.resolve():
                    logger.info(f"not scanning {path}: it is output_dir")
                    continue
                found = _series_entries(path, path.name)[0]
                if not found:
                    logger.warning(f"ignoring folder {path}: no DICOM series in it")
                entries += found
            elif path.name.lower().endswith((".img", ".img.gz")):
                if not path.with_name(volume_stem(path) + ".hdr").exists():
                    unknown.append(str(path))  # Analyze/NIfTI image without its header
            elif path.name.lower().endswith(IMAGE_SUFFIXES):
                entries.append(_file_entry(path))
            else:
                unknown.append(str(path))
    elif input_file:
        path = Path(input_file)
        entries = _series_entries(path, path.resolve().name)[0] if path.is_dir() else [_file_entry(path)]
        unknown = [str(path)] if not entries else []
    else:
        root = Path(dataset_dir) if dataset_dir else Path(datalist).resolve().parent
        for e in load_datalist(root, datalist, datalist_key):
            entries.append(_file_entry(Path(e[datalist_field] if datalist_field in e else e["image"])))
    if not entries and not unknown:
        raise ValueError(f"no volume found in {given[0]} {input_dir or input_file or datalist}.")
    inputs = InferenceInputs()
    for path in unknown:
        inputs.record(path, "not an image volume (unknown file type, and not a DICOM series)")
    images = [p for e in entries for p in ([e["image"]] if isinstance(e["image"], str) else e["image"])]
    inputs_here = {Path(p).resolve() for p in images}
    planned: dict[Path, str] = {}
    for entry in entries:
        source, stem = entry[SOURCE_KEY], entry.pop("stem")
        problem, affine = screen_volume(entry["image"])
        if problem is None and pixdim is not None and affine is not None:
            _warn_if_thick(source, affine, pixdim)
        if problem is None and out is not None:
            target = out / f"{stem}{'_' + output_postfix if output_postfix else ''}{output_ext}"
            if target.resolve() in inputs_here or any(target.resolve() in p.parents for p in inputs_here):
                problem = f"its output {target} is an input of this run; choose another output_dir"
            elif target in planned:
                problem = f"its output {target} would also be the output of {planned[target]}; rename one of them"
            else:
                remove_stale_partials(target)  # left by an interrupted run writing this very output
                if target.exists() and not (overwrite or skip_existing):
                    problem = f"output {target} exists and is not replaced; pass --overwrite true to replace it"
                else:
                    planned[target] = source
                    if target.exists() and skip_existing:
                        logger.info(f"{source}: output {target} exists, left as it is (--skip_existing true)")
                        inputs.existing[str(source)] = str(target)
                        continue
                    entry[OUTPUT_KEY] = str(target)
        if problem:
            inputs.record(source, problem)
        else:
            inputs.good.append(entry)
    return inputs


def _warn_if_thick(source: str, affine: np.ndarray, pixdim: Sequence[float]) -> None:
    """Warn where an input's voxels are more than twice as thick as the trained spacing along some axis."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    trained = float(max(pixdim))
    if spacing.max() > 2.0 * trained:
        logger.warning(
            f"{source}: voxels of {' x '.join(f'{v:.3g}' for v in spacing)} mm, up to {spacing.max() / trained:.1f} "
            f"times thicker than the trained spacing of {' x '.join(f'{float(v):.3g}' for v in pixdim)} mm: the "
            "synthesis is resampled between distant slices and may be blurred or show stair steps."
        )


def raise_for_failures(inputs: InferenceInputs) -> None:
    """After the good inputs are done: raise one error listing every input of ``inputs`` that failed.

    Raises:
        RuntimeError: if any input failed (so the command exits non-zero).
    """
    total = len({e[SOURCE_KEY] for e in inputs.good} | set(inputs.failures) | set(inputs.existing))
    written = total - len(inputs.failures) - len(inputs.existing)
    kept = f", {len(inputs.existing)} already there" if inputs.existing else ""
    if inputs.failures:
        lines = "\n".join(f"  {path}: {problem}" for path, problem in inputs.failures.items())
        failed = len(inputs.failures)
        message = f"{failed} of {total} inputs could not be synthesized ({written} written{kept}):\n{lines}"
        logger.error(message)  # printed plainly, above the traceback of the bundle runner
        raise RuntimeError(message)
    logger.info(f"all {total} inputs have an output ({written} written{kept})")


class TolerantDataset(Dataset):
    """MONAI ``Dataset`` of :func:`find_inputs` entries whose items that fail to load or preprocess become
    ``{"source": ..., "failure": reason}`` (recorded by :class:`TolerantEvaluator`; works in worker processes)."""

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:  # any failure of one volume is that volume's, not the batch's
            entry = self.data[index]
            return {SOURCE_KEY: str(entry.get(SOURCE_KEY, entry.get("image"))), FAILURE_KEY: _reason(error)}


class TolerantEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` (one volume per batch) that records a failure of a volume in ``inputs`` against its
    ``"source"`` and goes on: preprocessing (:class:`TolerantDataset`), network pass, postprocessing (invert, save).

    Args:
        inputs, args, postprocessing, kwargs: the :class:`InferenceInputs` of the run; see ``SupervisedEvaluator``.
    """

    def __init__(self, *args: Any, inputs: InferenceInputs, postprocessing: Callable | None = None, **kwargs: Any):
        self.inputs, self._postprocessing = inputs, postprocessing
        super().__init__(*args, postprocessing=None if postprocessing is None else self._postprocess, **kwargs)

    def _postprocess(self, data: Mapping[Hashable, Any]) -> Any:
        """Apply the postprocessing; on an error, record it against the item's source and return the item unchanged."""
        try:
            return self._postprocessing(data)
        except Exception as error:
            self.inputs.record(str(data.get(SOURCE_KEY, "?")), f"inverting or saving failed: {_reason(error)}")
            return dict(data)

    def _iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict:
        sources = batchdata.get(SOURCE_KEY, ["?"])
        source = str(sources[0] if isinstance(sources, (list, tuple)) else sources)
        if FAILURE_KEY in batchdata:
            reasons = batchdata[FAILURE_KEY]
            self.inputs.record(source, f"preprocessing failed: {reasons[0] if isinstance(reasons, list) else reasons}")
            return {}  # decollates to no item: nothing to postprocess
        try:
            return super()._iteration(engine, batchdata)
        except Exception as error:
            if isinstance(error, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            self.inputs.record(source, f"synthesis failed: {_reason(error)}")
            engine.state.output = {}
            return {}
