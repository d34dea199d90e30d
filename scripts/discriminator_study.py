"""Can the discriminator alone tell a real CT slice from a CT-looking remap of the T1? And the phantom's scalp.

Usage (from the repository root)::

    python -m scripts.discriminator_study --output_dir study_disc --dataset_dir study_pct/data
    python -m scripts.discriminator_study --output_dir study_disc --dataset_dir study_pct/data \
        --cyclegan_run study_pct/runs/mr_ct_CycleGAN --publish_dir docs

For each resolution ("demo": the preset's voxels and training crops; "paper": 1.8 mm, 128 x 128 crops), each
discriminator (the 70 x 70 PatchGAN of ``configs/train.json``, 3 layers, and a 142 x 142 one, 4 layers) and each fake
kind, a fresh discriminator is trained alone (LSGAN, Adam as ``configs/train.json``) on one real CT crop and one fake
crop per iteration from the training subjects of ``datalist_mr_ct.json``, then judges whole axial slices of the
held-out test subjects. Fakes: (b) each subject's T1 histogram-matched to its own CT inside the head mask
(:func:`scripts.alignment_terms.monotone_remap`: bone drawn where the T1 is bright, on the scalp), its own CT outside
the mask; (c) an unpaired CycleGAN's T1 -> CT synthesis (``--cyclegan_run``). A slice is called real when its mean
logit inside the head mask exceeds 0.5 (LSGAN targets: 1 real, 0 fake); the table gives the balanced accuracy.

The second table measures the phantom's scalp (head-mask voxels outside bone) on each test subject's CT, at its native
voxels and at the demo resolution, against about 5-6 mm in adults (the phantom's nominal 4 mm fat + 2 mm skin, plus
the temporalis at the temples; ``scripts/tooling/phantom.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from bundle.data import volume_preprocessing
from bundle.datalist import load_datalist
from bundle.losses import discriminator_loss, lsgan_loss
from bundle.networks import patch_discriminator
from bundle.pairing import mask_preprocessing
from monai.networks.nets import PatchDiscriminator
from scripts.alignment_terms import axial_slices, monotone_remap, trained_synthesis
from scripts.tooling.phantom import TISSUES, phantom_file
from scripts.tooling.report import command_line, publish
from scripts.tooling.study import EXPERIMENTS, Preset, Run, evaluation_parser, log, prepare_data, select_preset

__all__ = [
    "DISCRIMINATORS",
    "FAKES",
    "Subject",
    "accuracy_table",
    "classify",
    "cyclegan_syntheses",
    "load_subjects",
    "logit_centres",
    "logits_inside",
    "main",
    "measure",
    "middle_slices",
    "receptive_field",
    "remapped_t1",
    "scalp_rows",
    "scalp_table",
    "scalp_thickness",
    "score_slices",
    "slice_scores",
    "subject_files",
    "train_discriminator",
]

SECTION = "discriminator-study"
TITLE = "## Discriminator alone: can it tell a CT from a remapped T1?"
FAKES = ("(b) remapped T1", "(c) CycleGAN")
DISCRIMINATORS = {"PatchGAN, 3 layers": 3, "PatchGAN, 4 layers": 4}  # name -> num_layers_d
DATALIST = "datalist_mr_ct.json"
KERNEL = 4  # patch_discriminator's kernel size (padding 1)


def receptive_field(num_layers_d: int, kernel_size: int = KERNEL) -> int:
    """Receptive field (pixels) of :func:`bundle.networks.patch_discriminator` with ``num_layers_d`` layers: MONAI's
    ``PatchDiscriminator`` has ``num_layers_d + 2`` convolutions of ``kernel_size`` with strides 2 (the initial
    convolution and the first ``num_layers_d - 1`` layers), then 1, 1; 3 layers give CycleGAN's 70.

    Raises:
        ValueError: if ``num_layers_d < 1``.
    """
    if num_layers_d < 1:
        raise ValueError(f"num_layers_d must be at least 1, got {num_layers_d}.")
    field = 1
    for stride in reversed([2] * num_layers_d + [1, 1]):  # from the logit back to the input
        field = stride * field + (kernel_size - stride)
    return field


def logit_centres(num_layers_d: int) -> tuple[int, float]:
    """``(stride, offset)``: logit ``j`` of :func:`bundle.networks.patch_discriminator` (kernel 4, padding 1) sees the
    input pixels centred on ``stride * j + offset`` along each axis (pixel ``i`` centred on ``i``)."""
    centre = 1.0  # the two stride-1 convolutions: output j covers j - 1 .. j + 2, centred on j + 0.5, twice
    for _ in range(num_layers_d):  # each stride-2 convolution: output c covers 2c - 1 .. 2c + 2
        centre = 2 * centre + 0.5
    return 2**num_layers_d, centre


def logits_inside(masks: torch.Tensor, num_layers_d: int, logit_shape: Sequence[int]) -> torch.Tensor:
    """The head mask on the logit grid: a logit is inside when at least half of the 2 x 2 pixels at its receptive
    field's centre (:func:`logit_centres`) are.

    Args:
        masks: (N, 1, H, W) boolean masks of the discriminator's input.
        num_layers_d: the discriminator's layers.
        logit_shape: (h, w) of its logits.

    Returns:
        (N, 1, h, w) boolean.
    """
    stride, offset = logit_centres(num_layers_d)
    m = masks.float()
    grids = []
    for axis, size in enumerate(logit_shape):
        low = torch.floor(stride * torch.arange(size, dtype=torch.float64) + offset).long()
        grids.append((low.clamp(0, masks.shape[2 + axis] - 1), (low + 1).clamp(0, masks.shape[2 + axis] - 1)))
    (r0, r1), (c0, c1) = grids
    corners = sum(m[:, :, rows][:, :, :, cols] for rows in (r0, r1) for cols in (c0, c1))
    return corners / 4 >= 0.5


def slice_scores(logits: torch.Tensor, inside: torch.Tensor) -> np.ndarray:
    """Per slice, the mean of its logits (N, 1, h, w) where ``inside`` (same shape, boolean); NaN where none is."""
    count = inside.sum(dim=(1, 2, 3)).double()
    total = torch.where(inside, logits.double(), 0.0).sum(dim=(1, 2, 3))
    return torch.where(count > 0, total / count.clamp(min=1), torch.nan).numpy()


def classify(real_scores: Sequence[float], fake_scores: Sequence[float], threshold: float = 0.5) -> dict[str, float]:
    """The decisions on real and fake samples: called real when the score exceeds ``threshold``.

    Returns:
        ``{"real called real", "fake called fake", "balanced accuracy", "n real", "n fake"}``: the rates, their mean
        and the counts.

    Raises:
        ValueError: if either set is empty.
    """
    real, fake = np.asarray(real_scores, dtype=np.float64), np.asarray(fake_scores, dtype=np.float64)
    if real.size == 0 or fake.size == 0:
        raise ValueError(f"need real and fake scores, got {real.size} real and {fake.size} fake.")
    hit, rejection = float(np.mean(real > threshold)), float(np.mean(fake <= threshold))
    return {
        "real called real": hit,
        "fake called fake": rejection,
        "balanced accuracy": 0.5 * (hit + rejection),
        "n real": real.size,
        "n fake": fake.size,
    }


def middle_slices(mask: np.ndarray, count: int | None = None) -> list[int]:
    """Axial indices through the middle half of the mask's extent: every one (``count`` None) or ``count`` of them
    (:func:`scripts.alignment_terms.axial_slices`)."""
    if count is not None:
        return axial_slices(mask, count)
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    return list(range(z[0] + (z[-1] - z[0]) // 4, z[-1] - (z[-1] - z[0]) // 4 + 1))


def remapped_t1(t1: np.ndarray, ct: np.ndarray, mask: np.ndarray, background: str = "ct") -> np.ndarray:
    """Fake (b): ``t1`` histogram-matched to ``ct`` inside the boolean ``mask`` (:func:`monotone_remap`); outside,
    the CT itself (``background="ct"``: only the head differs from a real CT) or monotone_remap's constant.

    Raises:
        ValueError: for another ``background``.
    """
    if background not in ("ct", "constant"):
        raise ValueError(f"background must be 'ct' or 'constant', got {background!r}.")
    remapped = monotone_remap(t1, ct, mask)
    if background == "ct":
        remapped[~mask] = ct[~mask]
    return remapped.astype(np.float32)


@dataclasses.dataclass
class Subject:
    """One subject on the training scale: its CT, head mask, axial head extent and fakes by name (:data:`FAKES`)."""

    name: str
    ct: np.ndarray
    mask: np.ndarray
    fakes: dict[str, np.ndarray]

    @property
    def z_extent(self) -> tuple[int, int]:
        z = np.nonzero(self.mask.any(axis=(0, 1)))[0]
        return int(z[0]), int(z[-1])


def subject_files(data_dir: Path, split: str) -> list[dict[str, str]]:
    """``{"name", "T1", "CT", "mask"}`` per subject of ``split``: ``"test"`` from the datalist's entries;
    ``"training"``: the subjects of ``training_A`` and ``training_B``, their T1, CT and head mask in the phantom's
    layout (:func:`scripts.tooling.phantom.phantom_file`).

    Raises:
        FileNotFoundError: naming a training subject's missing volume.
    """
    if split == "test":
        entries = load_datalist(data_dir, DATALIST, "test")
        return [{"name": Path(e["A"]).parent.name, "T1": e["A"], "CT": e["B"], "mask": e["mask"]} for e in entries]
    entries = load_datalist(data_dir, DATALIST, "training_A") + load_datalist(data_dir, DATALIST, "training_B")
    names = sorted({Path(entry["image"]).parent.name for entry in entries})
    files = []
    for name in names:
        paths = {kind: phantom_file(data_dir, name, kind) for kind in ("T1", "CT", "headmask")}
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the study needs every training subject's T1, CT and head mask.")
        files.append({"name": name, "T1": str(paths["T1"]), "CT": str(paths["CT"]), "mask": str(paths["headmask"])})
    return files


def _resampled(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if tuple(volume.shape) == tuple(shape):
        return volume
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def cyclegan_syntheses(
    files: Sequence[Mapping[str, str]], pixdim: Sequence[float], synthesize: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, np.ndarray]:
    """Fake (c) per subject: ``synthesize`` of its T1 preprocessed at ``pixdim`` (the CycleGAN's training voxels)."""
    mr = volume_preprocessing("image", "MR", pixdim)
    out = {}
    for f in files:
        with torch.no_grad():
            out[f["name"]] = synthesize(mr({"image": f["T1"]})["image"])[0].float().cpu().numpy()
    return out


def load_subjects(
    files: Sequence[Mapping[str, str]],
    pixdim: Sequence[float],
    syntheses: Mapping[str, np.ndarray] | None = None,
    background: str = "ct",
) -> list[Subject]:
    """Subjects preprocessed as training does (:func:`bundle.data.volume_preprocessing` at ``pixdim``, masks by
    :func:`bundle.pairing.mask_preprocessing`) with fake (b) and, given ``syntheses``, fake (c), resampled
    (trilinear) to this grid's shape where it was synthesized on another."""
    mr, ct = volume_preprocessing("image", "MR", pixdim), volume_preprocessing("image", "CT", pixdim)
    masks = mask_preprocessing("image", pixdim)
    subjects = []
    for f in files:
        t1 = mr({"image": f["T1"]})["image"][0].numpy()
        true_ct = ct({"image": f["CT"]})["image"][0].numpy().astype(np.float32)
        mask = masks({"image": f["mask"]})["image"][0].numpy() > 0
        fakes = {FAKES[0]: remapped_t1(t1, true_ct, mask, background)}
        if syntheses is not None:
            fakes[FAKES[1]] = _resampled(syntheses[f["name"]], true_ct.shape).astype(np.float32)
        subjects.append(Subject(f["name"], true_ct, mask, fakes))
    return subjects


def _random_crop(volume: np.ndarray, z_extent: tuple[int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random axial slice within ``z_extent``, edge-padded (centred) to at least ``size``, randomly cropped."""
    image = volume[..., rng.integers(z_extent[0], z_extent[1] + 1)]
    pad = [(max(0, size - n) // 2, max(0, size - n) - max(0, size - n) // 2) for n in image.shape]
    image = np.pad(image, pad, mode="edge")
    x, y = (rng.integers(0, n - size + 1) for n in image.shape)
    return image[x : x + size, y : y + size]


def train_discriminator(
    subjects: Sequence[Subject],
    fake: str,
    num_layers_d: int,
    channels: int,
    crop: int,
    iterations: int,
    seed: int = 0,
    lr: float = 2e-4,
    betas: Sequence[float] = (0.5, 0.999),
    device: torch.device | str = "cpu",
) -> tuple[PatchDiscriminator, list[float]]:
    """A fresh discriminator trained alone to tell the subjects' CTs from their ``fake``.

    Each iteration draws a real CT crop and, independently (another subject in general, as in unpaired training), a
    fake crop: a random subject, a random axial slice within its head's extent, a random ``crop`` x ``crop`` window;
    one Adam step on the LSGAN discriminator loss (:func:`bundle.losses.discriminator_loss`).

    Args:
        subjects: the training subjects, each with ``fake``.
        fake: a name of :data:`FAKES`.
        num_layers_d, channels: of :func:`bundle.networks.patch_discriminator`.
        crop: training crop size (pixels).
        iterations: optimiser steps.
        seed: of the initialisation (``torch.manual_seed``) and of the draws.
        lr, betas: Adam's.
        device: where it trains.

    Returns:
        The discriminator and its loss per iteration.

    Raises:
        ValueError: if ``crop`` is below ``3 * 2**num_layers_d`` (too small for the last normalised layer).
    """
    if crop < 3 * 2**num_layers_d:  # instance norm needs more than one value in the last normalised layer
        raise ValueError(f"crop must be at least {3 * 2**num_layers_d} for {num_layers_d} layers, got {crop}.")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    discriminator = patch_discriminator(channels=channels, num_layers_d=num_layers_d).to(device)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=tuple(betas))
    criterion = lsgan_loss()
    losses = []
    for _ in range(iterations):
        real_subject, fake_subject = subjects[rng.integers(len(subjects))], subjects[rng.integers(len(subjects))]
        real = _random_crop(real_subject.ct, real_subject.z_extent, crop, rng)
        fake_crop = _random_crop(fake_subject.fakes[fake], fake_subject.z_extent, crop, rng)
        batch = torch.from_numpy(np.stack([real, fake_crop])[:, None].astype(np.float32)).to(device)
        logits = discriminator(batch)[-1]  # instance norm: the two crops do not mix
        loss = discriminator_loss(logits[:1], logits[1:], criterion)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return discriminator, losses


def score_slices(
    discriminator: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    num_layers_d: int,
    multiple: int = 16,
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """The discriminator on whole slices (fully convolutional), each centre-padded (edge values; the mask with 0) to
    a multiple of ``multiple``.

    Args:
        discriminator: returns its features, the logits last.
        images, masks: (N, 1, H, W) slices and their boolean head masks.
        num_layers_d: its layers (where its logits look, :func:`logits_inside`).
        multiple, batch_size: padding and slices per forward pass.

    Returns:
        Per slice, the mean logit inside the head mask (:func:`slice_scores`); and every logit inside it.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    device = next(discriminator.parameters()).device
    per_slice, patches = [], []
    discriminator.eval()
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = F.pad(images[start : start + batch_size].float(), pad, mode="replicate")
            m = F.pad(masks[start : start + batch_size].float(), pad) > 0
            logits = discriminator(x.to(device))[-1].float().cpu()
            inside = logits_inside(m, num_layers_d, logits.shape[-2:])
            per_slice.append(slice_scores(logits, inside))
            patches.append(logits[inside].numpy())
    return np.concatenate(per_slice), np.concatenate(patches)


def measure(
    discriminator: torch.nn.Module, num_layers_d: int, subjects: Sequence[Subject], fake: str, count: int | None = None
) -> dict[str, Any]:
    """Slice- and patch-level decisions (:func:`classify`) on the real CTs and the ``fake`` of held-out subjects, on
    :func:`middle_slices` of each head; slices without a logit inside the mask are left out."""
    real_slices, fake_slices, real_patches, fake_patches = [], [], [], []
    for subject in subjects:
        z = middle_slices(subject.mask, count)
        masks = torch.from_numpy(np.stack([subject.mask[..., k] for k in z])[:, None])
        for volume, slices, patches in (
            (subject.ct, real_slices, real_patches),
            (subject.fakes[fake], fake_slices, fake_patches),
        ):
            images = torch.from_numpy(np.stack([volume[..., k] for k in z])[:, None])
            scores, logits = score_slices(discriminator, images, masks, num_layers_d)
            slices.append(scores[~np.isnan(scores)])
            patches.append(logits)
    slice_level = classify(np.concatenate(real_slices), np.concatenate(fake_slices))
    patch_level = classify(np.concatenate(real_patches), np.concatenate(fake_patches))
    return {**slice_level, **{f"patch {name}": value for name, value in patch_level.items()}}


def scalp_thickness(
    ct_hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float], bone_hu: float = 300.0, max_distance_mm: float = 15.0
) -> np.ndarray:
    """Scalp thickness (mm) over the cranial vault of one head, axial axis last (RAS: superior at higher indices).

    Scalp: head-mask voxels outside bone (CT above ``bone_hu``). At each outer head-surface voxel (a mask voxel with
    a face neighbour outside the hole-filled mask; the volume's faces are not a surface), the thickness is the
    Euclidean distance to the nearest bone voxel centre. The vault: surface voxels above the skull's widest axial
    slice (the largest area the bone encloses, holes filled per slice; the highest of equally wide ones) whose
    nearest bone is within ``max_distance_mm`` (the neck and face have none that near).

    Args:
        ct_hu: CT in Hounsfield units.
        mask: head mask (non-zero inside), same shape.
        spacing: voxel size (mm) per axis.
        bone_hu, max_distance_mm: the bone threshold and the vault's distance rule.

    Returns:
        The thickness at every vault surface voxel (1-D).

    Raises:
        ValueError: if the shapes differ or no bone is inside the mask.
    """
    if ct_hu.shape != mask.shape:
        raise ValueError(f"shapes differ: {ct_hu.shape} and {mask.shape}.")
    head = ndi.binary_fill_holes(mask > 0)
    bone = head & (ct_hu > bone_hu)
    if not bone.any():
        raise ValueError(f"no voxel of the head is above {bone_hu} HU.")
    surface = head & ~ndi.binary_erosion(head, border_value=1)
    distance = ndi.distance_transform_edt(~bone, sampling=[float(s) for s in spacing])
    enclosed = [int(ndi.binary_fill_holes(bone[..., k]).sum()) for k in range(bone.shape[-1])]
    widest = len(enclosed) - 1 - int(np.argmax(enclosed[::-1]))  # the highest of equally wide slices
    vault = surface & (distance <= max_distance_mm)
    vault[..., : widest + 1] = False
    return distance[vault]


def _summary(values: np.ndarray) -> dict[str, float]:
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return {"n": int(values.size), "median": float(q50), "q25": float(q25), "q75": float(q75)}


def _native(path: str) -> tuple[np.ndarray, list[float]]:
    """A volume at its own voxels, reoriented to RAS, and its voxel size (mm) from the affine."""
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj, dtype=np.float32), [float(v) for v in np.linalg.norm(image.affine[:3, :3], axis=0)]


def scalp_rows(
    files: Sequence[Mapping[str, str]],
    pixdim: Sequence[float],
    hu_window: Sequence[float] = (-1000.0, 2000.0),
    bone_hu: float = 300.0,
    max_distance_mm: float = 15.0,
) -> list[dict[str, Any]]:
    """:func:`scalp_thickness` summaries (median, quartiles, surface voxels) per test subject and pooled, at the
    native voxels and at ``pixdim`` (the training preprocessing, mapped back to HU from ``hu_window``)."""
    ct = volume_preprocessing("image", "CT", pixdim, hu_window)
    masks = mask_preprocessing("image", pixdim)
    low, high = hu_window
    demo = f"{pixdim[0]:g} mm"
    values: dict[str, list[np.ndarray]] = {"native": [], demo: []}
    rows = []
    for f in files:
        ct_hu, spacing = _native(f["CT"])
        mask, mask_spacing = _native(f["mask"])
        if not np.allclose(spacing, mask_spacing, atol=1e-3) or ct_hu.shape != mask.shape:
            raise ValueError(f"{f['CT']} and {f['mask']} are not on one grid.")
        resampled = low + (ct({"image": f["CT"]})["image"][0].numpy() + 1.0) / 2.0 * (high - low)
        resampled_mask = masks({"image": f["mask"]})["image"][0].numpy()
        for grid, volume, region, voxel in (
            ("native", ct_hu, mask, spacing),
            (demo, resampled, resampled_mask, list(pixdim)),
        ):
            thickness = scalp_thickness(volume, region, voxel, bone_hu, max_distance_mm)
            values[grid].append(thickness)
            rows.append({"subject": f["name"], "grid": grid, "voxel": voxel, **_summary(thickness)})
    for grid, parts in values.items():
        voxel = next(r["voxel"] for r in rows if r["grid"] == grid)  # the phantom's subjects share their voxels
        rows.append({"subject": "pooled", "grid": grid, "voxel": voxel, **_summary(np.concatenate(parts))})
    return rows


def _voxel(voxel: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in voxel)


def accuracy_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per resolution, discriminator and fake."""
    header = (
        "| resolution | discriminator (receptive field) | fake | balanced accuracy (slices) | real called real | "
        "fake called fake | slices (each) | balanced accuracy (patches) | real patches called real | fake patches "
        "called fake | final loss |"
    )
    lines = [header, "| --- | --- | --- |" + " ---: |" * 8]
    for r in rows:
        lines.append(
            f"| {r['resolution']} | {r['discriminator']} ({r['field px']} px = {r['field mm']:.0f} mm) | {r['fake']} | "
            f"{r['balanced accuracy']:.3f} | {r['real called real']:.3f} | {r['fake called fake']:.3f} | "
            f"{r['n real']} | {r['patch balanced accuracy']:.3f} | {r['patch real called real']:.3f} | "
            f"{r['patch fake called fake']:.3f} | {r['final loss']:.4f} |"
        )
    return "\n".join(lines)


def scalp_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: median and interquartile range of the scalp thickness per subject and grid, then pooled."""
    lines = ["| subject | grid | voxel (mm) | vault surface voxels | median (mm) | IQR (mm) |"]
    lines.append("| --- | --- |" + " ---: |" * 4)
    for r in rows:
        lines.append(
            f"| {r['subject']} | {r['grid']} | {_voxel(r['voxel'])} | {r['n']} | {r['median']:.2f} | "
            f"{r['q25']:.2f}-{r['q75']:.2f} |"
        )
    return "\n".join(lines)


def _hu_range(*tissues: str) -> str:
    values = [TISSUES[t].ct_hu for t in tissues]
    return f"{min(values):g} to {max(values):g}"


def _training_length(settings: Preset) -> int:
    epochs = int(settings.value("n_epochs")) + int(settings.value("n_epochs_decay"))
    return int(settings.value("samples_per_epoch")) * epochs


def main(
    output_dir: str = "study_discriminator",
    dataset_dir: str | None = None,
    cyclegan_run: str | None = None,
    iterations: int | None = None,
    seed: int = 0,
    publish_dir: str | None = None,
    preset: str = "cpu",
    paper_pixdim: float = 1.8,
    demo_crop: int | None = None,
    paper_crop: int = 128,
    channels: int | None = None,
    slices: int | None = None,
    fake_background: str = "ct",
    bone_hu: float = 300.0,
    vault_distance_mm: float = 15.0,
    device: str | None = None,
) -> str:
    """Train and measure every discriminator (module docstring), measure the scalp, write
    ``OUTPUT_DIR/discriminator_study.md`` and return its path.

    Args:
        output_dir: where the table goes (and the phantom, unless ``dataset_dir``).
        dataset_dir: a phantom folder (``scripts/make_demo_data.py``) with ``datalist_mr_ct.json``; None: build the
            preset's phantom in ``OUTPUT_DIR/data``.
        cyclegan_run: a CycleGAN run folder (with ``models/``) trained on T1 -> CT with ``preset``: adds fake (c).
        iterations: training iterations per discriminator (default: the preset's training length,
            ``samples_per_epoch * (n_epochs + n_epochs_decay)``).
        seed: of every discriminator's initialisation and draws.
        publish_dir: also put the section into ``PUBLISH_DIR/results.md``.
        preset: a preset of :data:`scripts.tooling.study.PRESETS`: the demo resolution (its ``pixdim``, crops of its
            ``spatial_size``), the discriminators' width (``d_channels``), the optimiser and the default length.
        paper_pixdim, paper_crop: the paper's resolution (mm) and training crop (pixels).
        demo_crop, channels: override the preset's crop and width (tests).
        slices: axial slices per test head (:func:`middle_slices`; None: every one of its middle half).
        fake_background: outside the head mask fake (b) is the CT (``"ct"``) or monotone_remap's constant.
        bone_hu, vault_distance_mm: bone threshold (HU) and vault rule of :func:`scalp_thickness`.
        device: where the discriminators run (default: CUDA when present).

    Raises:
        FileNotFoundError: if ``dataset_dir`` has no ``datalist_mr_ct.json`` or ``cyclegan_run`` no
            ``models/model.pt``.
        ValueError: if ``iterations`` is not a whole number >= 1.
    """
    arguments = dict(locals())
    start = time.perf_counter()
    settings = select_preset(preset)
    if iterations is None:
        iterations = _training_length(settings)
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a whole number >= 1, got {iterations!r}.")
    run_dir = Path(cyclegan_run).resolve() if cyclegan_run else None
    if run_dir is not None and not (run_dir / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"{run_dir / 'models' / 'model.pt'}: no trained CycleGAN in --cyclegan_run.")
    if dataset_dir and not (Path(dataset_dir) / DATALIST).is_file():
        raise FileNotFoundError(f"{Path(dataset_dir).resolve() / DATALIST}: no phantom in --dataset_dir.")
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    data_dir, _ = prepare_data(output, settings, dataset_dir, seed=0)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    width = int(channels or settings.value("d_channels"))
    demo_pixdim = settings.pixdim()
    resolutions = {
        f"demo ({demo_pixdim[0]:g} mm)": (demo_pixdim, int(demo_crop or settings.value("spatial_size")[0])),
        f"paper ({paper_pixdim:g} mm)": ([float(paper_pixdim)] * 3, int(paper_crop)),
    }
    lr, betas = float(settings.value("lr")), [float(b) for b in settings.value("betas")]
    files = {split: subject_files(data_dir, split) for split in ("training", "test")}

    syntheses = None
    if run_dir is not None:
        synthesize = trained_synthesis(
            evaluation_parser(Run(run_dir.name, EXPERIMENTS["mr_ct"], "Cycle"), settings, data_dir, run_dir)
        )
        log(f"synthesizing the T1 of {sum(map(len, files.values()))} subjects with {run_dir.name}")
        syntheses = {split: cyclegan_syntheses(f, demo_pixdim, synthesize) for split, f in files.items()}
    fakes = FAKES if syntheses is not None else FAKES[:1]

    rows = []
    for resolution, (pixdim, crop) in resolutions.items():
        subjects = {
            split: load_subjects(f, pixdim, None if syntheses is None else syntheses[split], fake_background)
            for split, f in files.items()
        }
        log(f"{resolution}: {len(subjects['training'])} training, {len(subjects['test'])} test subjects loaded")
        for name, layers in DISCRIMINATORS.items():
            for fake in fakes:
                began = time.perf_counter()
                discriminator, losses = train_discriminator(
                    subjects["training"], fake, layers, width, crop, iterations, seed, lr, betas, target
                )
                trained_s = time.perf_counter() - began
                row = measure(discriminator, layers, subjects["test"], fake, slices)
                tail = losses[-max(1, len(losses) // 10) :]
                rows.append(
                    {
                        "resolution": resolution,
                        "discriminator": name,
                        "field px": receptive_field(layers),
                        "field mm": receptive_field(layers) * pixdim[0],
                        "fake": fake,
                        **row,
                        "final loss": statistics.fmean(tail),
                        "seconds": trained_s,
                    }
                )
                log(
                    f"{resolution}, {name}, {fake}: balanced accuracy {row['balanced accuracy']:.3f} on "
                    f"{row['n real']} slices; {iterations} iterations in {trained_s:.1f} s "
                    f"({1000 * trained_s / iterations:.1f} ms each)"
                )
    scalp = scalp_rows(files["test"], demo_pixdim, settings.value("hu_window"), bone_hu, vault_distance_mm)
    log("scalp measured")

    defaults = {name: p.default for name, p in inspect.signature(main).parameters.items()}
    flags = {k: v for k, v in arguments.items() if k in ("output_dir", "dataset_dir") or v != defaults[k]}
    training_s = sum(r["seconds"] for r in rows)
    pooled = {r["grid"]: r for r in scalp if r["subject"] == "pooled"}
    native, demo = pooled.values()
    text = "\n\n".join(
        [
            TITLE,
            f"```bash\n{command_line('scripts.discriminator_study', flags)}\n```",
            f"Preset `{preset}`; {len(files['training'])} training and {len(files['test'])} test subjects of "
            f"`{DATALIST}` in `{data_dir}`. Budget: {iterations} iterations per discriminator (the preset's "
            f"training length is {_training_length(settings)}), each one real CT crop and one fake crop drawn "
            "independently (random training subject, random axial slice within its head, random crop; edge padding "
            f"where the slice is smaller), LSGAN loss, Adam lr {lr:g}, betas {tuple(betas)}, constant; width "
            f"{width}; seed {seed} for every discriminator's initialisation and draws; {len(rows)} discriminators "
            f"trained in {training_s:.0f} s on {target.type}; {time.perf_counter() - start:.0f} s in all.",
            "Fakes: (b) each subject's T1 histogram-matched to its own CT inside the head mask "
            "(`alignment_terms.monotone_remap`), outside it "
            + ("the subject's CT" if fake_background == "ct" else "monotone_remap's constant")
            + "; "
            + (
                f"(c) the T1 -> CT synthesis of `{run_dir.name}` at {demo_pixdim[0]:g} mm; at {paper_pixdim:g} mm "
                f"that {demo_pixdim[0]:g} mm synthesis is resampled (trilinear) to the {paper_pixdim:g} mm volume's "
                "shape, not synthesized there."
                if run_dir is not None
                else "(c) not measured (no `--cyclegan_run`)."
            ),
            "Decisions on the test subjects: "
            + ("every axial slice" if slices is None else f"{slices} axial slices")
            + " through the middle half of each head, whole (centre-padded to a multiple of 16), called real when "
            "its mean logit over the logits whose receptive field is centred in the head mask exceeds 0.5 (LSGAN "
            "targets 1 real, 0 fake); balanced accuracy = mean of the two rates (0.5: chance); patches: every logit "
            "inside the mask on its own. Final loss: mean discriminator loss over the last tenth of training "
            "(0.25: no better than outputting 0.5).",
            accuracy_table(rows),
            f"Scalp thickness on the test subjects' CT (`scalp_thickness`): head-mask voxels outside bone (> "
            f"{bone_hu:g} HU; phantom bone {_hu_range('bone_diploe', 'bone_cortical')} HU, scalp "
            f"{_hu_range('fat', 'muscle', 'skin')} HU); at every outer head-surface voxel "
            f"the distance to the nearest bone voxel, over the vault: axial slices above the skull's widest one, "
            f"nearest bone within {vault_distance_mm:g} mm. Native voxels, and the {demo_pixdim[0]:g} mm volumes of "
            f"training. Pooled median {native['median']:.2f} mm (IQR {native['q25']:.2f}-{native['q75']:.2f}) "
            f"native, {demo['median']:.2f} mm ({demo['q25']:.2f}-{demo['q75']:.2f}) at {demo_pixdim[0]:g} mm; "
            "adults: about 5-6 mm; the phantom's nominal scalp: 4 mm fat + 2 mm skin, plus up to 9 mm of "
            "temporalis at the temples.",
            scalp_table(scalp) + "\n",
        ]
    )
    path = output / "discriminator_study.md"
    path.write_text(text, encoding="utf-8")
    print(text)
    if publish_dir:
        publish(publish_dir, text, [], section=SECTION)
    return str(path)


if __name__ == "__main__":
    fire.Fire(main)
