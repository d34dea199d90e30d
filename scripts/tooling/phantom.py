"""Multi-contrast brain phantom (PD-, T2-, T1-weighted MR and CT) built offline from the MNI152 2009a template.

All contrasts of a subject come from one anatomy (exactly co-registered); each subject has its own anatomy, pose,
bias field and noise.

Anatomy (template space, 1 mm, :func:`build_head_model`): grey and white matter are the MNI ICBM152 2009a
probability maps shipped with ``nilearn`` (Fonov et al. 2011); CSF fills the rest of the intracranial hull (the
brain closed by 6 mm) plus a 1.5 mm subarachnoid layer; skull (inner table, diploe, outer table: 6.5 mm, 4 mm over
the temporal squama), temporalis and neck muscles, 4 mm fat and 2 mm skin are shells at a signed distance from the
hull; the rest is air. Class fractions are partial-volume (they sum to 1).

Contrast: a tissue's spin-echo signal is ``S = PD (1 - exp(-TR/T1)) exp(-TE/T2)``, a voxel's the fraction-weighted
sum over its tissues; CT is the fraction-weighted sum of Hounsfield units. Values (:data:`TISSUES`,
:data:`MR_SEQUENCES`): MR parameters at 1.5 T from BrainWeb's table (Collins et al. 1998; Kwan et al. 1999;
http://mouldy.bic.mni.mcgill.ca/brainweb/tissue_mr_parameters.txt), cortical bone without signal; IXI's dual-echo
turbo spin echo (Philips 1.5 T, Guy's Hospital, brain-development.org) for PD and T2, and a spin-echo T1 (IXI's T1
is a 3-D gradient echo); CT numbers inside the ranges of Bushberg et al., The Essential Physics of Medical Imaging,
3rd ed. 2012, and Kalender, Computed Tomography, 3rd ed. 2011. Orderings: T2 CSF > GM > WM, T1 WM > GM > CSF,
PD CSF > GM > WM, CT bone > GM > WM > CSF > fat > air.

Subjects (:func:`simulate_subject`): a random pose and a smooth cubic B-spline deformation map the template into
IXI geometry (axial, 256 x 256 x 130, 0.9375 x 0.9375 x 1.2 mm, RAS); a smooth multiplicative bias field shared by
the MR contrasts, Rician MR noise at a given SNR, Gaussian CT noise. Optional scanner beds differ between MR (flat
pad under the occiput) and CT (curved head holder on a foam gap), the domain-specific difference of the paper's
Fig. 1; their materials are nominal, and they are never part of the head mask.

Dataset (:func:`write_phantom_dataset`, CLI ``scripts/make_demo_data.py``): ``phantomNNN/phantomNNN_<kind>.nii.gz``
(int16 MR and CT like IXI, uint8 masks) and three datalists (:mod:`bundle.datalist`). Not shipped in the zoo export.

Limitations: no face, orbits, sinuses or skull base; no diploic marrow signal in MR; no J-coupling brightening of
fat in turbo spin echo T2.

References:
    Fonov V et al. Unbiased average age-appropriate atlases for pediatric studies. NeuroImage 54(1):313-327, 2011.
    Collins DL et al. Design and construction of a realistic digital brain phantom. IEEE TMI 17(3):463-468, 1998.
    Kwan RK-S, Evans AC, Pike GB. MRI simulation-based evaluation of image-processing and classification
    methods. IEEE TMI 18(11):1085-1097, 1999.
    Gudbjartsson H, Patz S. The Rician distribution of noisy MRI data. MRM 34(6):910-914, 1995.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
from bundle.transforms import INJECTIVITY_FACTOR, BSplineField, DomainDistortion, resample_volume
from scripts.tooling.datasets import split_subjects, write_datalist

__all__ = [
    "BED_MATERIALS",
    "CT_HU_RANGE",
    "IXI_FOV_CENTRE_MM",
    "IXI_SHAPE",
    "IXI_SPACING_MM",
    "MR_SCALE",
    "MR_SEQUENCES",
    "TISSUES",
    "TISSUE_LABELS",
    "HeadModel",
    "SpinEchoSequence",
    "TissueProperties",
    "build_head_model",
    "ixi_geometry",
    "load_mni152_probabilities",
    "phantom_file",
    "save_nifti",
    "simulate_subject",
    "spin_echo_signal",
    "write_phantom_dataset",
]


@dataclass(frozen=True)
class TissueProperties:
    """MR parameters at 1.5 T (PD relative to water, T1 and T2 in ms) and CT number (HU) of one tissue."""

    pd: float
    t1_ms: float
    t2_ms: float
    ct_hu: float


@dataclass(frozen=True)
class SpinEchoSequence:
    """Spin-echo timing: repetition time and echo time (ms)."""

    tr_ms: float
    te_ms: float


# BrainWeb 1.5 T (PD, T1, T2) and textbook CT numbers: sources in the module docstring.
TISSUES: dict[str, TissueProperties] = {
    "wm": TissueProperties(pd=0.77, t1_ms=500.0, t2_ms=70.0, ct_hu=28.0),
    "gm": TissueProperties(pd=0.86, t1_ms=833.0, t2_ms=83.0, ct_hu=40.0),
    "csf": TissueProperties(pd=1.00, t1_ms=2569.0, t2_ms=329.0, ct_hu=8.0),
    "fat": TissueProperties(pd=1.00, t1_ms=350.0, t2_ms=70.0, ct_hu=-100.0),
    "muscle": TissueProperties(pd=1.00, t1_ms=900.0, t2_ms=47.0, ct_hu=50.0),
    "skin": TissueProperties(pd=1.00, t1_ms=900.0, t2_ms=47.0, ct_hu=40.0),
    "bone_cortical": TissueProperties(pd=0.0, t1_ms=1.0, t2_ms=1.0, ct_hu=1400.0),
    "bone_diploe": TissueProperties(pd=0.0, t1_ms=1.0, t2_ms=1.0, ct_hu=700.0),
    "air": TissueProperties(pd=0.0, t1_ms=1.0, t2_ms=1.0, ct_hu=-1000.0),
}

# Nominal materials of the scanner-bed structures (not tissue measurements): a gel positioning pad visible on
# MR, and a carbon-fibre head holder on CT (the MR pad is invisible on CT and the CT holder on MR).
BED_MATERIALS: dict[str, TissueProperties] = {
    "mr_pad": TissueProperties(pd=0.7, t1_ms=600.0, t2_ms=40.0, ct_hu=-1000.0),
    "ct_holder": TissueProperties(pd=0.0, t1_ms=1.0, t2_ms=1.0, ct_hu=250.0),
}

TISSUE_LABELS = ("air", "csf", "gm", "wm", "fat", "muscle", "skin", "bone_cortical", "bone_diploe")

MR_SEQUENCES: dict[str, SpinEchoSequence] = {
    "PD": SpinEchoSequence(tr_ms=8178.0, te_ms=8.0),
    "T2": SpinEchoSequence(tr_ms=8178.0, te_ms=100.0),
    "T1": SpinEchoSequence(tr_ms=500.0, te_ms=10.0),
}

MR_SCALE = 1000.0  # signal of fully relaxed water, in stored units (int16 like IXI)
CT_HU_RANGE = (-1024.0, 3071.0)  # 12-bit CT range

IXI_SHAPE = (256, 256, 130)
IXI_SPACING_MM = (0.9375, 0.9375, 1.2)
IXI_FOV_CENTRE_MM = (0.0, -22.0, 20.0)  # MNI mm: centres the head like IXI's axial PD/T2 field of view

_PAD_VOXELS = ((12, 12), (8, 8), (30, 0))  # template padding (mm): room for the scalp; neck below the template
_CSF_LAYER_MM = 1.5
_TABLE_MM = 1.6
_PHANTOM_VERSION = 1  # bump when the simulation changes, so stale demo data is rebuilt
_HEAD_REACH_MM = 32.0  # beyond this distance from the intracranial hull there is only air
_ANATOMY_SPACING_MM = 40.0  # control-point spacing of the between-subject deformation
_BRAIN_CENTRE_MM = (0.0, -18.0, 15.0)  # MNI mm: centre of the pose changes (rotation, head size)


def spin_echo_signal(
    pd: np.ndarray | float, t1_ms: np.ndarray | float, t2_ms: np.ndarray | float, sequence: SpinEchoSequence
) -> np.ndarray:
    """Spin-echo signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` (fully relaxed water = 1), broadcast over the inputs.

    Args:
        pd: proton density relative to water.
        t1_ms: T1 (ms), positive.
        t2_ms: T2 (ms), positive.
        sequence: TR and TE.
    """
    t1_ms, t2_ms = np.asarray(t1_ms, dtype=np.float64), np.asarray(t2_ms, dtype=np.float64)
    return pd * (1.0 - np.exp(-sequence.tr_ms / t1_ms)) * np.exp(-sequence.te_ms / t2_ms)


def ixi_geometry(downsample: int = 1) -> tuple[tuple[int, int, int], np.ndarray]:
    """IXI-like PD/T2 geometry: axial 256 x 256 x 130 voxels of 0.9375 x 0.9375 x 1.2 mm, RAS, head-centred.

    Args:
        downsample: integer factor for a coarser grid over the same field of view (tests use 4 or 8).

    Returns:
        ``(shape, affine)``: spatial shape and 4 x 4 voxel-to-world (RAS mm) affine.
    """
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}.")
    shape = tuple(max(2, round(n / downsample)) for n in IXI_SHAPE)
    spacing = [n * s / m for n, s, m in zip(IXI_SHAPE, IXI_SPACING_MM, shape, strict=True)]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(IXI_FOV_CENTRE_MM) - np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return shape, affine  # type: ignore[return-value]


def load_mni152_probabilities() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Load the MNI152 2009a T1 template and its grey/white-matter probability maps shipped with nilearn (no download).

    Returns:
        ``({"t1": ..., "gm": ..., "wm": ...}, affine)``: float32 arrays in [0, 1] (197 x 233 x 189, 1 mm, RAS)
        and their affine.

    Raises:
        ImportError: if nilearn is not installed, naming the install command.
    """
    try:
        from nilearn import datasets
    except ImportError as error:
        raise ImportError(
            "The brain phantom is built from the MNI152 2009a template shipped with nilearn, which is not "
            "installed: run `pip install nilearn` (or `pip install -r requirements.txt`)."
        ) from error
    images = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
    }
    arrays = {name: np.asarray(image.get_fdata(dtype=np.float32)) for name, image in images.items()}
    return arrays, np.asarray(images["t1"].affine, dtype=np.float64)


@dataclass
class HeadModel:
    """Noise-free template-space head: per-contrast signal maps and tissue-class fractions.

    Attributes:
        maps: float32 tensor ``(len(MAP_NAMES), X, Y, Z)``: MR signals (water = 1), CT (HU), brain and head
            fractions, in the order of ``MAP_NAMES``.
        affine: 4 x 4 voxel-to-world (MNI mm) affine of ``maps``.
        fractions: optional float32 tensor ``(len(TISSUE_LABELS), X, Y, Z)`` of tissue fractions in the order of
            ``TISSUE_LABELS`` (kept only when requested: ground truth for tests and segmentation).
    """

    MAP_NAMES = ("PD", "T2", "T1", "CT", "brain", "head")

    maps: torch.Tensor
    affine: np.ndarray
    fractions: torch.Tensor | None = None


def _ramp(x: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy of a boundary at signed distance ``x`` (mm, positive inside): 1 mm linear ramp."""
    return np.minimum(np.maximum(x + np.float32(0.5), np.float32(0.0)), np.float32(1.0))


def _smoothstep(x: np.ndarray, edge0: float, edge1: float) -> np.ndarray:
    """C1 step from 0 (x <= edge0) to 1 (x >= edge1)."""
    t = np.minimum(np.maximum((x - np.float32(edge0)) / np.float32(edge1 - edge0), np.float32(0.0)), np.float32(1.0))
    return t * t * (3.0 - 2.0 * t)


def _pad_template(array: np.ndarray) -> np.ndarray:
    """Pad a template array by ``_PAD_VOXELS``: air around the head, the brainstem continued below it."""
    lateral = np.pad(array, (*_PAD_VOXELS[:2], (0, 0)), mode="constant")
    return np.pad(lateral, ((0, 0), (0, 0), _PAD_VOXELS[2]), mode="edge")


def _signed_distance_to_hull(envelope: np.ndarray, closing_mm: float = 6.0) -> np.ndarray:
    """Signed distance (mm, positive outside) to the intracranial hull, the brain envelope closed by a ball; computed
    on a 2 mm grid (the hull is smooth at that scale) and interpolated back to 1 mm."""
    shape = envelope.shape
    even = [n + n % 2 for n in shape]
    padded = np.zeros(even, dtype=np.float32)
    padded[: shape[0], : shape[1], : shape[2]] = envelope
    coarse = padded.reshape(even[0] // 2, 2, even[1] // 2, 2, even[2] // 2, 2).mean(axis=(1, 3, 5)) >= 0.5
    dilated = ndi.distance_transform_edt(~coarse, sampling=2.0) <= closing_mm
    hull = ndi.distance_transform_edt(dilated, sampling=2.0) > closing_mm
    hull = ndi.gaussian_filter(hull.astype(np.float32), 1.0) >= 0.5  # smooth the 2 mm staircase
    signed = ndi.distance_transform_edt(~hull, sampling=2.0) - ndi.distance_transform_edt(hull, sampling=2.0)
    # voxel-centre distances are 1 mm off the surface on a 2 mm grid: re-centre the zero level between them
    signed = np.where(hull, signed + 1.0, signed - 1.0).astype(np.float32)
    fine = torch.nn.functional.interpolate(
        torch.from_numpy(signed)[None, None], scale_factor=2.0, mode="trilinear", align_corners=False
    )
    return fine[0, 0, : shape[0], : shape[1], : shape[2]].numpy()


def build_head_model(
    probabilities: Mapping[str, np.ndarray] | None = None,
    affine: np.ndarray | None = None,
    keep_fractions: bool = False,
) -> HeadModel:
    """Build the template-space head: tissue fractions, then every contrast from the tissue parameters.

    Args:
        probabilities: ``{"t1", "gm", "wm"}`` template arrays; default: :func:`load_mni152_probabilities`.
        affine: their affine (required with ``probabilities``).
        keep_fractions: keep the tissue fractions in the model (0.4 GB more memory), for
            ``simulate_subject(..., return_fractions=True)``.
    """
    if probabilities is None:
        probabilities, affine = load_mni152_probabilities()
    if affine is None:
        raise ValueError("affine is required with probabilities.")
    gm = _pad_template(probabilities["gm"])
    wm = _pad_template(probabilities["wm"])
    envelope = _pad_template(probabilities["t1"] > 0)  # the template is skull-stripped: non-zero = brain
    affine = np.asarray(affine, dtype=np.float64).copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([p[0] for p in _PAD_VOXELS], dtype=np.float64)
    shape = envelope.shape
    distance = _signed_distance_to_hull(envelope)

    # every class fraction is computed on the voxels that are not pure air (1-D arrays, a third of the grid)
    region = np.flatnonzero(distance.ravel() < _HEAD_REACH_MM)
    d = distance.ravel()[region]
    gm, wm = gm.ravel()[region], wm.ravel()[region]
    x, y, z = (
        np.float32(affine[k, k]) * i.astype(np.float32) + np.float32(affine[k, 3])
        for k, i in enumerate(np.unravel_index(region, shape))
    )

    # intracranial tissues: GM and WM never exceed the intracranial space, CSF fills the rest of it
    inside_hull = _ramp(-d)
    scale = np.minimum(np.float32(1.0), inside_hull / np.maximum(gm + wm, np.float32(1e-6)))
    fractions: dict[str, np.ndarray] = {"gm": gm * scale, "wm": wm * scale}
    fractions["csf"] = np.maximum(inside_hull - fractions["gm"] - fractions["wm"], np.float32(0.0))

    # extracranial shells; thin temporal squama under the temporalis, neck muscles below the occiput
    temporal = _smoothstep(np.abs(x), 40.0, 60.0) * np.exp(-(((z - 5.0) / 22.0) ** 2) - ((y + 10.0) / 35.0) ** 2)
    neck = _smoothstep(-z, 20.0, 50.0) * _smoothstep(-y, 50.0, 80.0)
    thickness_mm = {
        "csf": _CSF_LAYER_MM,
        "table_inner": _TABLE_MM,
        "bone_diploe": 6.5 - 2.5 * temporal - 2 * _TABLE_MM,
        "table_outer": _TABLE_MM,
        "muscle": 9.0 * temporal + 14.0 * neck,
        "fat": 4.0,
        "skin": 2.0,
    }
    inner = np.zeros_like(d)
    layers = {}
    for name, thickness in thickness_mm.items():
        outer = inner + np.float32(thickness)
        layers[name] = _ramp(d - inner) - _ramp(d - outer)
        inner = outer
    fractions["csf"] += layers.pop("csf")
    fractions["bone_cortical"] = layers.pop("table_inner") + layers.pop("table_outer")
    fractions.update(layers)
    fractions["air"] = np.maximum(np.float32(1.0) - sum(fractions.values()), np.float32(0.0))

    values = np.zeros((len(HeadModel.MAP_NAMES), region.size), dtype=np.float32)
    for tissue, fraction in fractions.items():
        properties = TISSUES[tissue]
        for channel, contrast in enumerate(("PD", "T2", "T1")):
            signal = spin_echo_signal(properties.pd, properties.t1_ms, properties.t2_ms, MR_SEQUENCES[contrast])
            if signal > 0:
                values[channel] += np.float32(signal) * fraction
        values[3] += np.float32(properties.ct_hu) * fraction
    values[5] = 1.0 - fractions["air"]
    maps = np.zeros((len(HeadModel.MAP_NAMES), *shape), dtype=np.float32)
    maps[3] = TISSUES["air"].ct_hu
    for channel in (0, 1, 2, 3, 5):
        maps[channel].reshape(-1)[region] = values[channel]
    maps[4] = ndi.gaussian_filter(envelope.astype(np.float32), 0.5)  # skull-stripped brain, partial volume

    full_fractions = None
    if keep_fractions:
        full_fractions = torch.zeros((len(TISSUE_LABELS), *shape), dtype=torch.float32)
        full_fractions[TISSUE_LABELS.index("air")] = 1.0
        for label, tissue in enumerate(TISSUE_LABELS):
            full_fractions[label].view(-1)[torch.from_numpy(region)] = torch.from_numpy(fractions[tissue])
    return HeadModel(torch.from_numpy(maps), affine, full_fractions)


def _rotation(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation about x (pitch), y (roll) and z (yaw), applied in that order."""
    a, b, c = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bed_fractions(
    head: np.ndarray, world_xy: tuple[np.ndarray, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume fractions of the MR pad (a flat 10 mm slab under the occiput) and of the CT head holder (a 4 mm
    cradle of radius 95 mm below a 3-8 mm foam gap, shifted sideways) in one axial plane, extruded along z, outside
    the head. The head is supine: posterior is -y."""
    x, y = world_xy[0][:, None], world_xy[1][None, :]
    rows = np.flatnonzero((head >= 0.5).any(axis=(0, 2)))
    back = float(world_xy[1][rows.min()]) if rows.size else float(world_xy[1][0])  # occiput, lowest point
    mr_top = back + rng.uniform(0.5, 2.0)  # the pad yields slightly under the head
    mr_pad = _ramp(np.minimum(mr_top - y, y - (mr_top - 10.0))) * _ramp(110.0 - np.abs(x))
    radius, thickness = 95.0, 4.0
    centre_x = rng.uniform(-6.0, 6.0)
    centre_y = back - rng.uniform(3.0, 8.0) + radius
    r = np.sqrt((x - centre_x) ** 2 + (y - centre_y) ** 2)
    lower_arc = _ramp((centre_y - y) - radius * np.cos(np.deg2rad(65.0)))
    ct_holder = _ramp(np.minimum(r - radius, radius + thickness - r)) * lower_arc
    outside_head = 1.0 - head
    return mr_pad[..., None] * outside_head, ct_holder[..., None] * outside_head


def simulate_subject(
    model: HeadModel,
    seed: int | Sequence[int],
    shape: Sequence[int] | None = None,
    affine: np.ndarray | None = None,
    snr: float = 30.0,
    bias_field: float = 0.2,
    ct_noise_hu: float = 8.0,
    anatomy_mm: float = 4.0,
    scanner_bed: bool = True,
    return_fractions: bool = False,
) -> dict[str, np.ndarray]:
    """Simulate one subject: PD, T2, T1 (MR), CT and brain/head masks on one grid, exactly co-registered.

    Args:
        model: the template-space :class:`HeadModel`.
        seed: seed (or seed sequence, e.g. ``(dataset_seed, subject_index)``) of this subject.
        shape: output spatial shape; default IXI's (with ``affine``).
        affine: output voxel-to-world affine (axis-aligned); default :func:`ixi_geometry`.
        snr: MR signal-to-noise ratio: mean brain signal over the noise standard deviation of each of the real
            and imaginary channels (Rician magnitude noise).
        bias_field: peak-to-peak amplitude of the smooth multiplicative bias field (0.2 = +-10 %, BrainWeb's
            "20 % INU"); 0 disables it.
        ct_noise_hu: standard deviation of the CT noise (HU).
        anatomy_mm: bound on each component of the subject's non-linear anatomical deformation (mm), on top of
            a random pose (rotation up to 6 degrees, head size +-7 %, shift +-4 mm); below 16 mm.
        scanner_bed: add the MR positioning pad and the CT head holder.
        return_fractions: also return the tissue fractions (needs ``build_head_model(keep_fractions=True)``).

    Returns:
        ``{"PD", "T2", "T1"}``: float32 MR magnitudes (water = ``MR_SCALE``); ``"CT"``: float32 HU;
        ``"brain_mask"``, ``"head_mask"``: uint8 masks (beds excluded); with ``return_fractions``,
        ``"tissue_fractions"``: float32 ``(len(TISSUE_LABELS), *shape)``.

    Raises:
        ValueError: for a rotated output affine, out-of-range parameters, or fractions requested from a model
            without them.
    """
    if shape is None or affine is None:
        shape, affine = ixi_geometry()
    shape = tuple(int(n) for n in shape)
    affine = np.asarray(affine, dtype=np.float64)
    if np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))):
        raise ValueError("simulate_subject needs an axis-aligned output affine (no rotation or shear).")
    if snr <= 0 or ct_noise_hu < 0 or bias_field < 0:
        raise ValueError(f"snr must be > 0 (got {snr}), ct_noise_hu and bias_field >= 0.")
    if return_fractions and model.fractions is None:
        raise ValueError("return_fractions needs a head model built with build_head_model(keep_fractions=True).")
    if not 0 <= anatomy_mm < INJECTIVITY_FACTOR * _ANATOMY_SPACING_MM:
        raise ValueError(
            f"anatomy_mm={anatomy_mm} must be in [0, {INJECTIVITY_FACTOR * _ANATOMY_SPACING_MM:.1f}) for an "
            f"invertible deformation ({_ANATOMY_SPACING_MM:g} mm control-point spacing)."
        )
    # one random stream per component, so that switching one off (beds, bias) leaves the others unchanged
    pose_rng, anatomy_rng, bed_rng, bias_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    world = [(affine[d, d] * np.arange(shape[d]) + affine[d, 3]).astype(np.float32) for d in range(3)]

    # pose: head pitch/roll/yaw, size and position in the scanner, about the centre of the brain
    centre = np.asarray(_BRAIN_CENTRE_MM)
    rotation = _rotation(np.deg2rad(pose_rng.uniform([-6.0, -3.0, -3.0], [6.0, 3.0, 3.0])))
    scaling = np.diag(pose_rng.uniform(0.93, 1.07) * pose_rng.uniform(0.97, 1.03, size=3))
    translation = pose_rng.uniform(-4.0, 4.0, size=3)
    to_template = scaling @ rotation  # template point = centre + M (x + u(x) - centre - t)
    anatomy = BSplineField(anatomy_rng.uniform(-anatomy_mm, anatomy_mm, size=(3, 9, 9, 9)), _ANATOMY_SPACING_MM)
    grid_mm = [w - np.float32(c) for w, c in zip(world, IXI_FOV_CENTRE_MM, strict=True)]
    displacement = anatomy.on_grid(grid_mm)

    # template voxel coordinates: v = L (x + u(x)) + o, the pose and the template affine folded into L and o
    template_inverse = np.linalg.inv(model.affine)
    linear = template_inverse[:3, :3] @ to_template
    offset = template_inverse[:3, :3] @ (centre - to_template @ (centre + translation)) + template_inverse[:3, 3]
    coords = np.matmul(linear.astype(np.float32), displacement.reshape(3, -1)).reshape(3, *shape)
    del displacement
    for e in range(3):
        coords[e] += sum(
            (np.float32(linear[e, d]) * world[d]).reshape([-1 if k == d else 1 for k in range(3)]) for d in range(3)
        ) + np.float32(offset[e])
    sampled = resample_volume(model.maps, coords).numpy()
    fractions = resample_volume(model.fractions, coords).numpy() if return_fractions else None
    del coords
    volumes = {name: sampled[i] for i, name in enumerate(HeadModel.MAP_NAMES)}
    brain, head = volumes["brain"], volumes["head"]
    if scanner_bed:
        mr_pad, ct_holder = _bed_fractions(head, (world[0], world[1]), bed_rng)

    gain = np.full((1, 1, 1), MR_SCALE, dtype=np.float32)  # receive gain x bias field
    if bias_field > 0:
        log_amplitude = np.log1p(0.5 * bias_field)
        field = BSplineField(bias_rng.uniform(-log_amplitude, log_amplitude, size=(1, 5, 5, 5)), 80.0)
        gain = np.exp(field.on_grid(grid_mm)[0]) * np.float32(MR_SCALE)
    brain_mask = brain >= 0.5
    out: dict[str, np.ndarray] = {}
    noise = np.empty(shape, dtype=np.float32)  # one buffer for every noise draw: large arrays are costly to fault in

    def draw(sd: np.float32) -> np.ndarray:
        return np.multiply(noise_rng.standard_normal(dtype=np.float32, out=noise), sd, out=noise)

    for contrast in ("PD", "T2", "T1"):
        pad = BED_MATERIALS["mr_pad"]
        signal = volumes[contrast]  # modified in place: the sampled maps are this function's own
        if scanner_bed:
            signal += np.float32(spin_echo_signal(pad.pd, pad.t1_ms, pad.t2_ms, MR_SEQUENCES[contrast])) * mr_pad
        signal *= gain
        sigma = np.float32(signal[brain_mask].mean() / snr) if brain_mask.any() else np.float32(MR_SCALE / snr)
        # Rician magnitude: |S + n_re + i n_im| with Gaussian n of sd sigma in each channel
        signal += draw(sigma)
        signal *= signal
        signal += np.square(draw(sigma), out=noise)
        out[contrast] = np.sqrt(signal, out=signal)
    ct = volumes["CT"]
    if scanner_bed:
        ct += (np.float32(BED_MATERIALS["ct_holder"].ct_hu) - ct) * ct_holder
    ct += draw(np.float32(ct_noise_hu))
    out["CT"] = np.clip(ct, *CT_HU_RANGE, out=ct)
    out["brain_mask"] = brain_mask.astype(np.uint8)
    out["head_mask"] = (head >= 0.5).astype(np.uint8)
    if fractions is not None:
        out["tissue_fractions"] = fractions
    return out


_STORED_DTYPES = {"PD": np.int16, "T2": np.int16, "T1": np.int16, "CT": np.int16}
_WORKER: dict[str, object] = {}  # per-process state of write_phantom_dataset's workers


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype: np.dtype | type) -> Path:
    """Save ``array`` as NIfTI-1 (``.nii.gz``) with ``affine`` (RAS mm) as scanner-coded qform/sform and mm units, in
    ``dtype`` (integers rounded and clipped); returns the path."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(dtype)
        rounded = np.rint(array)
        array = np.clip(rounded, info.min, info.max, out=rounded)
    image = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def phantom_file(output_dir: str | os.PathLike, subject: str, kind: str) -> Path:
    """Path of one phantom volume, ``output_dir/<subject>/<subject>_<kind>.nii.gz``; ``kind`` is ``PD``, ``T2``,
    ``T1``, ``CT``, ``brainmask``, ``headmask`` or a distorted kind such as ``T2_distorted``."""
    return Path(output_dir) / subject / f"{subject}_{kind}.nii.gz"


def _retain_freed_memory() -> None:
    """Let glibc keep freed large arrays for reuse instead of returning them to the OS (worker processes only;
    a no-op without glibc): re-faulting pages costs more than the arithmetic on virtual machines."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve arrays up to 1 GB from the heap
    libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: do not give freed heap memory back below 2 GB


def _init_worker(model: HeadModel, distortion: Any, config: dict[str, Any], threads: int, pool: bool) -> None:
    """Worker initialiser: the model is inherited (fork) or pickled once per worker (spawn)."""
    if pool:
        _retain_freed_memory()
    torch.set_num_threads(threads)
    _WORKER.update(model=model, distortion=distortion, config=config)


def _write_subject(index: int, subject: str, paired: bool) -> tuple[str, float]:
    """Simulate one subject and write its volumes (and the distorted ones), in a worker."""
    start = time.perf_counter()
    model, distortion, config = _WORKER["model"], _WORKER["distortion"], _WORKER["config"]
    shape, affine = ixi_geometry(config["downsample"])
    options = {key: config[key] for key in ("snr", "bias_field", "ct_noise_hu", "anatomy_mm", "scanner_bed")}
    volumes = simulate_subject(model, (config["seed"], index), shape, affine, **options)
    out = config["output_dir"]
    for kind, dtype in _STORED_DTYPES.items():
        save_nifti(volumes[kind], affine, phantom_file(out, subject, kind), dtype)
    save_nifti(volumes["brain_mask"], affine, phantom_file(out, subject, "brainmask"), np.uint8)
    save_nifti(volumes["head_mask"], affine, phantom_file(out, subject, "headmask"), np.uint8)
    # the deformed-T2 experiment: every T2 is distorted; pairs also need PD and the mask distorted alike
    to_distort = ["T2", "PD"] if paired else ["T2"]
    stack = np.stack([volumes[kind] for kind in to_distort])
    distorted = distortion(np.rint(stack, out=stack), affine=affine)  # what is on disk, as IXI would be
    for kind, image in zip(to_distort, distorted, strict=True):
        save_nifti(image, affine, phantom_file(out, subject, f"{kind}_distorted"), _STORED_DTYPES[kind])
    if paired:
        mask = distortion(volumes["brain_mask"][None], affine=affine, mode="nearest")[0]
        save_nifti(mask, affine, phantom_file(out, subject, "brainmask_distorted"), np.uint8)
    return subject, time.perf_counter() - start


def _phantom_datalists(output_dir: Path, split: dict[str, list[str]], config: dict[str, Any]) -> list[Path]:
    """Write the three demo datalists (PD<->T2, PD<->distorted T2, T1<->CT)."""

    def file(subject: str, kind: str) -> str:
        return str(phantom_file(output_dir, subject, kind))

    def shuffled(kind: str, stream: int) -> list[dict[str, str]]:
        rng = np.random.default_rng(np.random.SeedSequence(config["seed"]).spawn(6)[stream])
        return [{"image": file(split["training"][i], kind)} for i in rng.permutation(len(split["training"]))]

    def pairs(a: str, b: str, mask: str, **aligned: str) -> dict[str, list[dict[str, str]]]:
        return {
            key: [
                {"A": file(s, a), "B": file(s, b), "mask": file(s, mask)}
                | {name: file(s, kind) for name, kind in aligned.items()}
                | {"subject": s}
                for s in split[key]
            ]
            for key in ("validation", "test")
        }

    source = {"dataset": "MNI152 brain phantom", "parameters": "phantom_parameters.json"}
    distortion = {
        "domain": "B",
        "max_displacement_mm": config["distortion_mm"],
        "control_spacing_mm": config["distortion_spacing_mm"],
        "seed": config["distortion_seed"],
    }
    provenance = {"source": source, "distortion": distortion}
    deformed_truths = {"gt_A2B": "T2", "gt_B2A": "PD_distorted", "mask_B": "brainmask_distorted"}
    # file, kinds of (A, B, mask), further ground truths of the pairs, provenance; the training lists of datalist i
    # are shuffled with streams 2i and 2i + 1
    specs = (
        ("datalist.json", ("PD", "T2", "brainmask"), {}, {"source": source}),
        ("datalist_deformed_t2.json", ("PD", "T2_distorted", "brainmask"), deformed_truths, provenance),
        ("datalist_mr_ct.json", ("T1", "CT", "headmask"), {}, {"source": source}),
    )
    return [
        write_datalist(
            output_dir / name,
            output_dir,
            {"A": a, "B": b.removesuffix("_distorted")},
            shuffled(a, 2 * index),
            shuffled(b, 2 * index + 1),
            **pairs(a, b, mask, **truths),
            extra=extra,
            overwrite=True,
        )
        for index, (name, (a, b, mask), truths, extra) in enumerate(specs)
    ]


def write_phantom_dataset(
    output_dir: str | os.PathLike = "demo_data",
    subjects: int = 12,
    seed: int = 0,
    n_validation: int = 2,
    n_test: int = 2,
    downsample: int = 1,
    snr: float = 30.0,
    bias_field: float = 0.2,
    ct_noise_hu: float = 8.0,
    anatomy_mm: float = 4.0,
    scanner_bed: bool = True,
    distortion_mm: float = 8.0,
    distortion_spacing_mm: float = 40.0,
    distortion_seed: int = 0,
    workers: int | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = print,
    model: HeadModel | None = None,
) -> dict[str, Any]:
    """Build the phantom dataset: every subject's volumes, the distorted ones, and three datalists.

    Per subject ``phantomNNN/``: ``PD``, ``T2``, ``T1``, ``CT``, ``brainmask``, ``headmask``, ``T2_distorted``, and
    for validation and test subjects ``PD_distorted`` and ``brainmask_distorted``. Datalists: ``datalist.json``
    (PD <-> T2, brain masks); ``datalist_deformed_t2.json`` (PD <-> T2 distorted by
    :class:`~bundle.transforms.DomainDistortion`; ground truth of PD -> T2 the undistorted T2, of T2 -> PD the PD
    distorted alike); ``datalist_mr_ct.json`` (T1 <-> CT, differing scanner beds, head masks).

    Args:
        output_dir: the dataset folder (created).
        subjects: number of subjects.
        seed: seed of the anatomy, noise, split and shuffles.
        n_validation: paired validation subjects.
        n_test: paired test subjects; the others are training subjects.
        downsample: coarser grid over the same field of view (1 = IXI's 256 x 256 x 130).
        snr: MR signal-to-noise ratio (see :func:`simulate_subject`).
        bias_field: peak-to-peak MR bias field amplitude.
        ct_noise_hu: CT noise standard deviation (HU).
        anatomy_mm: bound on each component of the non-linear anatomical deformation between subjects (mm).
        scanner_bed: add the MR pad and the CT head holder.
        distortion_mm: largest displacement of the domain-specific distortion of T2 (mm).
        distortion_spacing_mm: control-point spacing of that distortion (mm).
        distortion_seed: seed of that distortion.
        workers: processes (default: up to 2, one per CPU core); 1 runs in this process.
        force: rebuild even if ``output_dir`` already holds a dataset with the same parameters.
        progress: called with progress lines (None: silent).
        model: a head model already built by :func:`build_head_model` (default: build it).

    Returns:
        ``{"output_dir", "datalists", "subjects", "split", "skipped"}``.

    Raises:
        ValueError: if no training subject is left after the validation and test subjects.
    """
    say = progress or (lambda _line: None)
    output_dir = Path(output_dir).resolve()
    if subjects < n_validation + n_test + 1:
        raise ValueError(f"subjects={subjects} leaves no training subject after {n_validation} + {n_test} pairs.")
    config = {
        "output_dir": str(output_dir),
        "subjects": subjects,
        "seed": seed,
        "n_validation": n_validation,
        "n_test": n_test,
        "downsample": downsample,
        "snr": snr,
        "bias_field": bias_field,
        "ct_noise_hu": ct_noise_hu,
        "anatomy_mm": anatomy_mm,
        "scanner_bed": scanner_bed,
        "distortion_mm": distortion_mm,
        "distortion_spacing_mm": distortion_spacing_mm,
        "distortion_seed": distortion_seed,
    }
    names = [f"phantom{i + 1:03d}" for i in range(subjects)]
    split = split_subjects(names, None, n_test, n_validation, seed)
    datalists = [output_dir / n for n in ("datalist.json", "datalist_deformed_t2.json", "datalist_mr_ct.json")]
    result = {"output_dir": output_dir, "datalists": datalists, "subjects": names, "split": split}
    record = output_dir / "phantom_parameters.json"
    parameters = {"generator": "scripts.tooling.phantom.write_phantom_dataset", "version": _PHANTOM_VERSION, **config}
    del parameters["output_dir"]
    if not force and record.is_file() and json.loads(record.read_text(encoding="utf-8")) == parameters:
        expected = [phantom_file(output_dir, s, k) for s in names for k in ("PD", "T2", "T1", "CT", "T2_distorted")]
        if all(p.is_file() for p in expected + datalists):
            say(f"{output_dir} already holds this phantom dataset (same parameters); use --force to rebuild")
            return {**result, "skipped": True}

    shape, _ = ixi_geometry(downsample)
    say(f"building the MNI152 head model (nilearn template, 1 mm) for {subjects} subjects of shape {shape}")
    start = time.perf_counter()
    model = build_head_model() if model is None else model
    distortion = DomainDistortion(distortion_mm, distortion_spacing_mm, seed=distortion_seed)
    say(f"head model ready in {time.perf_counter() - start:.1f} s")
    output_dir.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)  # only a finished build is recorded
    paired = set(split["validation"]) | set(split["test"])
    jobs = [(i, name, name in paired) for i, name in enumerate(names)]
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, workers)

    def report(results: Iterable[tuple[str, float]]) -> None:
        for done, (subject, seconds) in enumerate(results, 1):
            say(f"[{done:3d}/{subjects}] {subject} written ({seconds:.1f} s)")

    if workers == 1:
        _init_worker(model, distortion, config, torch.get_num_threads(), pool=False)
        report(_write_subject(*job) for job in jobs)
    else:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(model, distortion, config, 1, True)
        ) as pool:
            report(future.result() for future in as_completed([pool.submit(_write_subject, *job) for job in jobs]))
    result["datalists"] = _phantom_datalists(output_dir, split, config)
    record.write_text(json.dumps(parameters, indent=2) + "\n", encoding="utf-8")
    say(f"datalists: {', '.join(p.name for p in result['datalists'])}")
    return {**result, "skipped": False}
