"""Segment one case with a site's federated model, and draw the result over the image.

A site's model is the federation's shared arrays (``RUN/final_shared.ckpt``) plus the
part the sharing policy kept at the site (``<state_dir>/<federation>/local_state.ckpt``).
The prediction goes back to the case's own grid and affine, with the site's own label
values, as an int16 NIfTI.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from torch import nn

from uharmony_fed import MODALITIES, REGIONS
from uharmony_fed.checkpoint import load_payload
from uharmony_fed.config import parse
from uharmony_fed.data import (
    Case,
    DataConfig,
    DataError,
    SiteConfig,
    discover_cases,
    load_case_for_inference,
    load_site_config,
    site_label_to_regions,
)
from uharmony_fed.data.site import BRATS_MODALITIES, MSD_MODALITIES
from uharmony_fed.model import ModelConfig, build_model
from uharmony_fed.policy import canonical_state, get_policy, load_shared, split_keys
from uharmony_fed.train import pick_device, predict_volume

if TYPE_CHECKING:
    from uharmony_fed.universal import UniversalModel

log = logging.getLogger(__name__)

FINAL_CKPT = "final_shared.ckpt"
RUN_CONFIG = "fed.yaml"
_NII = (".nii.gz", ".nii")
#: Region colours of the overlay (RGB), drawn WT first so ET ends on top.
REGION_COLORS: dict[str, tuple[float, float, float]] = {
    "WT": (0.20, 0.80, 0.20),
    "TC": (1.00, 0.85, 0.10),
    "ET": (0.95, 0.15, 0.15),
}


@dataclass
class SiteModel:
    """A site's complete model for one federation, ready to predict.

    Attributes:
        model: the network in eval mode, on ``device``.
        federation: the federation's name (names the site's state folder).
        policy: the sharing policy the federation used.
        checkpoint: the shared-arrays file it was built from.
        data: preprocessing settings of the run (its fed.yaml), or ``None`` when the
            checkpoint has no fed.yaml beside it.
        sw_batch_size: sliding-window batch size (the run's, else the default).
        overlap: sliding-window overlap (the run's, else the default).
        device: where the model runs.
    """

    model: nn.Module
    federation: str
    policy: str
    checkpoint: Path
    data: DataConfig | None = None
    sw_batch_size: int = 2
    overlap: float = 0.25
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))


def resolve_checkpoint(model_ckpt: str | Path) -> Path:
    """The shared-arrays file of a run folder, or ``model_ckpt`` itself when it is a file.

    Raises:
        FileNotFoundError: neither the file nor ``RUN/final_shared.ckpt`` exists.
    """
    path = Path(model_ckpt)
    if path.is_dir():
        ckpt = path / FINAL_CKPT
        if not ckpt.is_file():
            msg = (f"{ckpt} not found; the run in {path} has not finished (pass a finished run "
                   f"folder or its {FINAL_CKPT})")
            raise FileNotFoundError(msg)
        return ckpt
    if not path.is_file():
        msg = f"{path} not found; pass a run folder or its {FINAL_CKPT}"
        raise FileNotFoundError(msg)
    return path


def local_state_path(site: SiteConfig, federation: str) -> Path:
    """Where ``site`` keeps its local part of ``federation``'s model."""
    return Path(site.state_dir) / federation / "local_state.ckpt"


def load_site_model(model_ckpt: str | Path, site: SiteConfig, device: str = "auto") -> SiteModel:
    """Build a site's model: the shared arrays of a run plus the site's local part.

    Args:
        model_ckpt: a finished run folder, or its ``final_shared.ckpt``. A ``fed.yaml``
            beside the file supplies the run's preprocessing and sliding-window settings.
        site: the site whose local part (restore layers, head, per policy) to load.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        The :class:`SiteModel`.

    Raises:
        FileNotFoundError: no checkpoint, or no local state while the policy keeps a
            local part (the message names the file and says how to get it).
        ValueError: the checkpoint is not a final model, or the local state does not
            fit its model and policy.
        uharmony_fed.checkpoint.CorruptFileError: a file fails its checksum.
    """
    ckpt = resolve_checkpoint(model_ckpt)
    payload = load_payload(ckpt)
    if payload.get("kind") == "uharmony_fed.universal_model":
        msg = f"{ckpt} is a universal model (uharmony-fed assemble); predict with --universal"
        raise ValueError(msg)
    absent = [k for k in ("arrays", "policy", "model", "name") if k not in payload]
    if absent:
        msg = (f"{ckpt}: not a final federated model (no {', '.join(absent)}); pass the run folder "
               f"or its {FINAL_CKPT}, not a round checkpoint")
        raise ValueError(msg)
    model_cfg = parse(ModelConfig, payload["model"], f"{ckpt}: model")
    federation, policy = str(payload["name"]), get_policy(str(payload["policy"]))
    model = build_model(model_cfg, extra_classes=len(site.extra_classes))
    load_shared(model, payload["arrays"], policy)
    _, local_keys = split_keys(model, policy)
    if local_keys:
        _load_local(model, local_keys, local_state_path(site, federation), site, federation, policy.name)
    data, sw_batch_size, overlap = _run_settings(ckpt.parent / RUN_CONFIG)
    dev = pick_device(device)
    model.to(dev).eval()
    return SiteModel(model, federation, policy.name, ckpt, data, sw_batch_size, overlap, dev)


def _load_local(model: nn.Module, keys: list[str], path: Path, site: SiteConfig, federation: str,
                policy: str) -> None:
    if not path.is_file():
        msg = (f"{path} not found: site {site.name!r} has not trained in federation {federation!r} "
               f"(policy {policy!r} keeps {len(keys)} tensors at each site). Predict at a site that "
               "took part, with its own site.yaml, or check state_dir in that site.yaml")
        raise FileNotFoundError(msg)
    local = load_payload(path).get("local", {})
    missing, extra = sorted(set(keys) - set(local)), sorted(set(local) - set(keys))
    if missing or extra:
        msg = (f"{path}: the saved local part does not fit the model of federation {federation!r} "
               f"(missing {missing[:3]}, unexpected {extra[:3]}); was it written by another run "
               "of the same name?")
        raise ValueError(msg)
    canon = canonical_state(model)
    bad = [k for k in keys if tuple(canon[k].shape) != tuple(local[k].shape)]
    if bad:
        msg = f"{path}: shape mismatch in local tensors {bad[:3]}; was it written by another run?"
        raise ValueError(msg)
    with torch.no_grad():
        for k in keys:
            canon[k].copy_(torch.as_tensor(local[k]))


def _run_settings(path: Path) -> tuple[DataConfig | None, int, float]:
    if not path.is_file():
        return None, 2, 0.25
    from uharmony_fed.fedconfig import load_config

    cfg = load_config(path)
    return cfg.data, cfg.train.sw_batch_size, cfg.train.sw_overlap


# ----------------------------------------------------------------------------- the input


def _strip_nii(name: str) -> str:
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _suffixes(site: SiteConfig) -> dict[str, str]:
    """Product modality -> BraTS-style file suffix (the site's own for a BraTS site)."""
    if site.layout == "brats" and site.modalities:
        return dict(site.modalities)
    return {m: s for m, s in BRATS_MODALITIES.items() if m in site.present}


def _with_sequences(site: SiteConfig, modalities: dict[str, str], source: Path) -> SiteConfig:
    """The site config restricted to the sequences this input has (the rest declared missing)."""
    if not modalities:
        names = ", ".join(f"*-{s}.nii.gz" for s in _suffixes(site).values())
        msg = f"no image of the site's sequences found (expected {names})"
        raise DataError(source, msg, "pass a case folder, a 4-D NIfTI or one CASE-<sequence>.nii.gz")
    lacking = [m for m in site.present if m not in modalities]
    if lacking:
        log.warning("%s: no %s; predicting with them absent (zero)", source, ", ".join(lacking))
    missing = tuple(m for m in MODALITIES if m not in modalities)
    return dataclasses.replace(site, modalities=modalities, missing=missing)


def _folder_case(folder: Path, site: SiteConfig) -> tuple[Case, SiteConfig]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_NII))

    def pick(suffix: str) -> Path | None:
        hits = [p for p in files if _strip_nii(p.name).endswith((f"-{suffix}", f"_{suffix}"))]
        own = [p for p in hits if p.name.startswith(folder.name)]
        hits = own or hits
        if len(hits) > 1:
            msg = f"several files for suffix {suffix!r}: {[p.name for p in hits]}"
            raise DataError(folder, msg, "keep one file per sequence in the case folder")
        return hits[0] if hits else None

    images = {m: p for m, s in _suffixes(site).items() if (p := pick(s)) is not None}
    sub = _with_sequences(site, {m: _suffixes(site)[m] for m in images}, folder)
    return Case(folder.name, images, pick("seg")), sub


def _file_case(path: Path, site: SiteConfig) -> tuple[Case, SiteConfig]:
    try:
        shape = tuple(int(s) for s in nib.load(path).shape)
    except Exception as exc:  # nibabel raises many types for a bad header
        reason = f"not a readable NIfTI file ({type(exc).__name__}: {exc})"
        raise DataError(path, reason, "export the image again as NIfTI (.nii.gz)") from exc
    stem = _strip_nii(path.name)
    if len(shape) == 4 and shape[3] > 1:
        given = dict(site.modalities) if site.modalities else {}
        if given and all(v.isdigit() for v in given.values()):
            channels = {m: int(v) for m, v in given.items()}
        else:  # a site whose mapping names files: Decathlon Task01 channel order
            channels = {m: int(v) for m, v in MSD_MODALITIES.items() if m in site.present}
        channels = {m: c for m, c in channels.items() if c < shape[3]}
        sub = _with_sequences(site, {m: str(c) for m, c in channels.items()}, path)
        return Case(stem, {m: path for m in channels}, None, channels), sub
    hits = [m for m, s in _suffixes(site).items() if stem.endswith((f"-{s}", f"_{s}"))]
    if not hits and len(site.present) == 1:
        hits = list(site.present)
    if len(hits) != 1:
        names = "|".join(_suffixes(site).values())
        reason = f"a 3-D image whose name does not say which sequence it is (expected CASE-<{names}>.nii.gz)"
        raise DataError(path, reason, "rename it, or pass the whole case folder or a 4-D NIfTI")
    m = hits[0]
    suffix = _suffixes(site).get(m, m)
    cid = stem[: -len(suffix) - 1] if stem.endswith((f"-{suffix}", f"_{suffix}")) else stem
    return Case(cid, {m: path}), _with_sequences(site, {m: suffix}, path)


def case_from_input(path: str | Path, site: SiteConfig) -> tuple[Case, SiteConfig]:
    """The case to predict, and the site config restricted to the sequences it has.

    Accepted inputs:

    * a BraTS case folder: ``CASE/CASE-<seq>.nii.gz`` (``_`` and ``.nii`` too), with
      ``<seq>`` the site's suffixes for a BraTS site, else ``t1n``, ``t1c``, ``t2w``,
      ``t2f``; a ``CASE-seg.nii.gz`` there becomes the case's label;
    * a 4-D NIfTI, one sequence per channel: the channel indices of the site's mapping
      (Decathlon or 4-D datalist sites), else the Decathlon Task01 order (FLAIR, T1w,
      T1gd, T2w);
    * a 3-D NIfTI of one sequence named ``...-<seq>.nii.gz`` (any name when the site
      has a single sequence);
    * the id of a case in the site's own data (as ``check-data`` lists it).

    Sequences the site has but the input lacks are predicted as absent (zero), with a
    warning.

    Raises:
        FileNotFoundError: the path does not exist and is no case id of the site.
        DataError: the input cannot be read as a case.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_case(path, site)
    if path.is_file():
        return _file_case(path, site)
    try:
        cases = {c.case_id: c for c in discover_cases(site)}
    except DataError:
        cases = {}
    if str(path) in cases:
        return cases[str(path)], site
    msg = f"{path}: no such file or folder, and no case of that id in site {site.name!r} ({site.data_dir})"
    raise FileNotFoundError(msg)


# ----------------------------------------------------------------------------- predicting


def predict_case(
    model_ckpt: str | Path | SiteModel,
    site_cfg: SiteConfig | str | Path,
    case: Case,
    data_cfg: DataConfig | None = None,
    *,
    threshold: float = 0.5,
    device: str = "auto",
) -> nib.Nifti1Image:
    """Segment one case with a site's federated model.

    Args:
        model_ckpt: a finished run folder, its ``final_shared.ckpt``, or a model already
            loaded with :func:`load_site_model` (for many cases).
        site_cfg: the site's config (or its site.yaml); its local state and label
            convention are used.
        case: the case (its label is ignored); see :func:`case_from_input`.
        data_cfg: preprocessing; default the run's (fed.yaml beside the checkpoint),
            else :class:`DataConfig`'s defaults.
        threshold: region membership threshold on the probabilities.
        device: ``auto``, ``cpu`` or ``cuda`` (when loading the model here).

    Returns:
        An int16 NIfTI on the case's own grid and affine with the site's label values.

    Raises:
        DataError: the case is not usable.
        FileNotFoundError, ValueError: see :func:`load_site_model`.
    """
    site = site_cfg if isinstance(site_cfg, SiteConfig) else load_site_config(site_cfg)
    sm = model_ckpt if isinstance(model_ckpt, SiteModel) else load_site_model(model_ckpt, site, device)
    cfg = data_cfg or sm.data or DataConfig()
    inf = load_case_for_inference(case, site, cfg)
    probs = predict_volume(sm.model, inf.image.unsqueeze(0), cfg.roi_size, device=sm.device,
                           sw_batch_size=sm.sw_batch_size, overlap=sm.overlap)
    return inf.prediction_to_nifti(probs[0].cpu(), site, threshold)


# ----------------------------------------------------------------------------- overlay


def display_image(case: Case, site: SiteConfig) -> nib.Nifti1Image:
    """The 3-D sequence to draw under a prediction: FLAIR when present, else the first."""
    order = ["t2f", *(m for m in MODALITIES if m != "t2f")]
    m = next(m for m in order if m in case.images and m in site.present)
    img = nib.load(case.images[m])
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if m in case.channels:
        data = data[..., case.channels[m]]
    elif data.ndim == 4:
        data = data[..., 0]
    return nib.Nifti1Image(data, img.affine)


def _ras(img: nib.Nifti1Image) -> np.ndarray:
    data = np.asanyarray(nib.as_closest_canonical(img).dataobj)
    return data[..., 0] if data.ndim == 4 else data


def _pick_slices(masks: Sequence[np.ndarray], image: np.ndarray, n: int) -> list[int]:
    depth = image.shape[2]
    z = [np.flatnonzero(m.reshape(-1, depth).any(0)) for m in masks if m is not None and m.any()]
    idx = np.concatenate(z) if z else np.flatnonzero(image.reshape(-1, depth).any(0))
    lo, hi = (int(idx.min()), int(idx.max())) if idx.size else (0, depth - 1)
    if not z:  # no lesion: the middle of the brain
        lo, hi = lo + (hi - lo) // 4, hi - (hi - lo) // 4
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]} or {depth // 2})


def save_overlay(
    path: str | Path,
    image: nib.Nifti1Image,
    prediction: nib.Nifti1Image,
    site: SiteConfig,
    label: nib.Nifti1Image | None = None,
    slices: int = 4,
    title: str = "",
) -> Path:
    """Write a PNG of a few axial slices: the image, the prediction, the ground truth.

    Predicted regions are filled (WT green, TC yellow, ET red); the ground truth, when
    given, is drawn as solid outlines in the same colours. Only the regions the site
    annotates are drawn. Slices are spread over the lesion (predicted or true), else
    over the middle of the brain. Slices are shown in neurological convention
    (anterior up, the patient's right on the panel's right).

    Args:
        path: the PNG to write (parents created).
        image: a 3-D sequence on the case's grid (see :func:`display_image`).
        prediction: the site-label prediction from :func:`predict_case`.
        site: the site whose label convention the prediction and label use.
        label: the site-label ground truth on the same grid, or ``None``.
        slices: number of axial slices.
        title: a heading for the figure.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    vol = _ras(image).astype(np.float32)
    pred = site_label_to_regions(np.rint(_ras(prediction)).astype(np.int64), site)[0]
    truth = site_label_to_regions(np.rint(_ras(label)).astype(np.int64), site)[0] if label is not None else None
    shown = [r for r in ("WT", "TC", "ET") if r in site.annotated]
    ri = {r: REGIONS.index(r) for r in REGIONS}
    zs = _pick_slices([pred[ri[r]] for r in shown] + ([truth[ri[r]] for r in shown] if truth is not None else []),
                      vol, max(slices, 1))
    nz = vol[vol != 0]
    vmin, vmax = (np.percentile(nz, [1, 99]) if nz.size else (0.0, 1.0))
    fig, axes = plt.subplots(1, len(zs), figsize=(3.2 * len(zs), 3.6), squeeze=False)
    for ax, z in zip(axes[0], zs):
        ax.imshow(vol[:, :, z].T, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, interpolation="nearest")
        # Each voxel takes the colour of the innermost region it is in (ET inside TC inside WT).
        rgba = np.zeros((vol.shape[1], vol.shape[0], 4), dtype=np.float32)
        for r in shown:
            rgba[pred[ri[r], :, :, z].T > 0] = (*REGION_COLORS[r], 0.5)
        ax.imshow(rgba, origin="lower", interpolation="nearest")
        for r in shown:
            if truth is not None and truth[ri[r], :, :, z].any():
                ax.contour(truth[ri[r], :, :, z].T, levels=[0.5], colors=[REGION_COLORS[r]], linewidths=1.2)
        ax.set_title(f"z = {z}", fontsize=9)
        ax.axis("off")
    handles = [Patch(color=REGION_COLORS[r], label=f"{r} predicted (fill)") for r in shown]
    if truth is not None:
        handles.append(Patch(facecolor="none", edgecolor="black", label="ground truth (outline)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- one call


@dataclass
class PredictResult:
    """What :func:`predict_to_files` wrote."""

    case_id: str
    output: Path
    overlay: Path | None
    label_counts: dict[int, int]
    federation: str
    policy: str
    #: Site -> gate weight, for a universal model's prediction; ``None`` for a site model.
    gate: dict[str, float] | None = None


def predict_to_files(
    model_ckpt: str | Path,
    site_config: str | Path,
    input_path: str | Path,
    output: str | Path,
    *,
    overlay: str | Path | None = None,
    label: str | Path | None = None,
    threshold: float = 0.5,
    device: str = "auto",
) -> PredictResult:
    """``uharmony-fed predict``: read a case, segment it, write the NIfTI (and overlay).

    Args:
        model_ckpt: a finished run folder or its ``final_shared.ckpt``.
        site_config: the site's site.yaml.
        input_path: the case (see :func:`case_from_input`).
        output: the segmentation NIfTI to write (parents created).
        overlay: a PNG to draw, or ``None``.
        label: ground truth for the overlay (default: the case's own label, if any).
        threshold: region membership threshold.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        The :class:`PredictResult`.
    """
    site = load_site_config(site_config)
    sm = load_site_model(model_ckpt, site, device)
    case, sub = case_from_input(input_path, site)
    seg = predict_case(sm, sub, case, threshold=threshold)
    title = f"{case.case_id}: site {site.name}, federation {sm.federation} ({sm.policy})"
    output, drawn, counts = _write_outputs(seg, case, sub, site, output, overlay, label, title)
    return PredictResult(case.case_id, output, drawn, counts, sm.federation, sm.policy)


def _write_outputs(seg: nib.Nifti1Image, case: Case, sub: SiteConfig, site: SiteConfig, output: str | Path,
                   overlay: str | Path | None, label: str | Path | None,
                   title: str) -> tuple[Path, Path | None, dict[int, int]]:
    """Save the segmentation (and the overlay, with ground truth if any); count voxels per label."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    nib.save(seg, output)
    values, counts = np.unique(np.asarray(seg.dataobj), return_counts=True)
    drawn = None
    if overlay is not None:
        truth_path = Path(label) if label is not None else case.label
        truth = None
        if truth_path is not None:
            if not Path(truth_path).is_file():
                raise FileNotFoundError(f"{truth_path} not found; pass an existing --label file")
            truth = nib.load(truth_path)
            if truth.shape[:3] != seg.shape:
                reason = f"label shape {truth.shape} differs from the case's {seg.shape}"
                raise DataError(truth_path, reason, "pass the segmentation of this case")
        drawn = save_overlay(overlay, display_image(case, sub), seg, site, truth, title=title)
    return output, drawn, {int(v): int(c) for v, c in zip(values, counts)}


# ----------------------------------------------------------------------------- universal


def predict_case_universal(
    model: str | Path | UniversalModel,
    site_cfg: SiteConfig | str | Path,
    case: Case,
    data_cfg: DataConfig | None = None,
    *,
    threshold: float = 0.5,
    device: str = "auto",
) -> tuple[nib.Nifti1Image, dict[str, float]]:
    """Segment one case with a universal model: no site id, the gate picks the restoration.

    The gate is computed once on the whole preprocessed volume, then the sliding window
    runs with those weights. ``site_cfg`` only maps the input's sequences and the label
    values to write; its name is never read.

    Args:
        model: a file written by ``uharmony-fed assemble``, or a loaded
            :class:`~uharmony_fed.universal.UniversalModel`.
        site_cfg: the config (or site.yaml) describing the input and its label values.
        case: the case; see :func:`case_from_input`.
        data_cfg: preprocessing; default the federation's (stored in the file).
        threshold: region membership threshold.
        device: ``auto``, ``cpu`` or ``cuda`` (when loading the model here).

    Returns:
        The int16 NIfTI on the case's grid and affine, and the gate weight of each site.
    """
    from uharmony_fed.universal import GatedPredictor, UniversalModel

    site = site_cfg if isinstance(site_cfg, SiteConfig) else load_site_config(site_cfg)
    um = model if isinstance(model, UniversalModel) else UniversalModel.load(model, pick_device(device))
    dev = um.gate_means.device
    cfg = data_cfg or um.data or DataConfig()
    inf = load_case_for_inference(case, site, cfg)
    image = inf.image.as_tensor().unsqueeze(0).float()
    with torch.no_grad():
        gate = um.gate(image.to(dev))[0]
    probs = predict_volume(GatedPredictor(um, gate), image, cfg.roi_size, device=dev,
                           sw_batch_size=um.sw_batch_size, overlap=um.overlap)
    img = inf.prediction_to_nifti(probs[0].cpu(), site, threshold)
    return img, {name: float(w) for name, w in zip(um.site_names, gate.cpu().tolist())}


def predict_universal_to_files(
    model: str | Path,
    site_config: str | Path,
    input_path: str | Path,
    output: str | Path,
    *,
    overlay: str | Path | None = None,
    label: str | Path | None = None,
    threshold: float = 0.5,
    device: str = "auto",
) -> PredictResult:
    """``uharmony-fed predict --universal``: like :func:`predict_to_files` with a universal model.

    Args:
        model: the universal-model file (``uharmony-fed assemble``).
        site_config: a site.yaml for the input's sequence mapping and label values (any
            site, also one that never trained; its name and state are not used).
        input_path, output, overlay, label, threshold, device: as :func:`predict_to_files`.

    Returns:
        The :class:`PredictResult`, with ``gate`` set and ``policy`` ``"universal"``.
    """
    from uharmony_fed.universal import UniversalModel

    site = load_site_config(site_config)
    um = UniversalModel.load(model, pick_device(device))
    case, sub = case_from_input(input_path, site)
    seg, gate = predict_case_universal(um, sub, case, threshold=threshold)
    best = max(gate, key=gate.__getitem__)
    title = f"{case.case_id}: universal model of {um.federation} (gate: {best} {gate[best]:.2f})"
    output, drawn, counts = _write_outputs(seg, case, sub, site, output, overlay, label, title)
    return PredictResult(case.case_id, output, drawn, counts, um.federation, "universal", gate)


__all__ = [
    "PredictResult",
    "SiteModel",
    "case_from_input",
    "display_image",
    "load_site_model",
    "local_state_path",
    "predict_case",
    "predict_case_universal",
    "predict_to_files",
    "predict_universal_to_files",
    "resolve_checkpoint",
    "save_overlay",
]
