"""Generate the demo federation: synthetic lesion MRI on real MNI152 anatomy, one folder per hospital."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from scipy import ndimage

from uharmony_fed import MODALITIES

#: Files of the MNI152 2009c (sym, 09a) template shipped inside nilearn (no download).
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Relative signal per sequence for CSF, GM, WM, necrotic core, oedema, enhancing rim.
_TISSUES = ("csf", "gm", "wm", "netc", "snfh", "et")
_CONTRAST = {
    "t1n": (0.25, 0.60, 0.90, 0.30, 0.50, 0.55),
    "t1c": (0.25, 0.62, 0.90, 0.30, 0.52, 1.35),
    "t2w": (1.00, 0.60, 0.42, 1.10, 0.90, 0.75),
    "t2f": (0.15, 0.65, 0.50, 0.55, 1.15, 0.90),
}
# Product compartments (BraTS 2023 values) -> each convention's label value.
NETC, SNFH, ET = 1, 2, 3
#: Resection cavity (BraTS 2024 post-treatment label 4): only the joining hospital has it.
RC = 4
_LABELS = {
    "brats": {NETC: 1, SNFH: 2, ET: 3, RC: 4},
    "msd": {NETC: 2, SNFH: 1, ET: 3},
    "wt": {NETC: 1, SNFH: 1, ET: 1},
}


@dataclass(frozen=True)
class Scanner:
    """A simulated scanner and protocol.

    Attributes:
        voxel: voxel size as multiples of the demo's base spacing (anisotropy).
        orientation: ``"RAS"``, ``"LPS"`` or ``"LAS"`` (axis directions on disk).
        gamma: contrast curve exponent applied to the normalized signal.
        scale: intensity scale of the stored values.
        bias: amplitude of the smooth multiplicative bias field.
        noise: noise standard deviation relative to white matter.
        rician: Rician (magnitude) noise instead of Gaussian.
        dtype: on-disk data type.
    """

    voxel: tuple[float, float, float]
    orientation: str
    gamma: float
    scale: float
    bias: float
    noise: float
    rician: bool
    dtype: str


@dataclass(frozen=True)
class Variant:
    """One kind of hospital: scanner, lesion population, layout and label convention."""

    scanner: Scanner
    population: str  # glioma | metastasis | meningioma
    layout: str  # brats | msd | datalist
    labels: str  # brats | msd | wt
    missing: tuple[str, ...] = ()
    cavity: bool = False  # post-operative: a resection cavity (label 4, class RC) beside the tumour


VARIANTS: tuple[Variant, ...] = (
    Variant(Scanner((1.0, 1.0, 1.0), "RAS", 1.0, 900.0, 0.15, 0.02, True, "int16"), "glioma", "brats", "brats"),
    Variant(Scanner((0.9, 0.9, 1.3), "LPS", 0.75, 250.0, 0.30, 0.04, False, "float32"), "metastasis", "msd", "msd", ("t1n",)),
    Variant(Scanner((1.1, 1.1, 1.0), "LAS", 1.35, 3000.0, 0.22, 0.03, True, "uint16"), "meningioma", "datalist", "wt"),
)

#: The hospital that joins later (``make_demo(..., joiner=True)`, `uharmony-fed make-demo --joiner``): a scanner unlike the
#: others (RPI, coarse slices, Gaussian noise, a flat contrast curve), only FLAIR and
#: post-contrast T1, and post-operative cases with a class nobody else annotates: the
#: resection cavity (``extra_classes: {RC: [4]}``).
JOINER_NAME = "hospitalNew"
JOINER = Variant(Scanner((1.2, 1.2, 1.6), "RPI", 0.85, 1200.0, 0.25, 0.05, False, "int16"), "glioma", "brats",
                 "brats", ("t1n", "t2w"), cavity=True)

# Decathlon Task01 channel names; a site lacking a sequence stores fewer channels.
_MSD_NAMES = {"t2f": "FLAIR", "t1n": "T1w", "t1c": "T1gd", "t2w": "T2w"}
_MSD_ORDER = ("t2f", "t1n", "t1c", "t2w")
# Datalist keys of the datalist hospital.
_DATALIST_KEYS = {"t1n": "T1", "t1c": "T1CE", "t2w": "T2", "t2f": "FLAIR"}


def template_dir() -> Path:
    """The folder inside the installed nilearn package that holds the MNI152 files."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _template() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tissue probability maps (csf, gm, wm) at 2 mm and their affine; read once."""
    maps = {}
    for key, name in TEMPLATE_FILES.items():
        img = nib.load(template_dir() / name)
        data = np.asarray(img.dataobj, dtype=np.float32)
        # 2x2x2 block means: a cheap anti-aliased 2 mm copy to resample from.
        s = [d // 2 * 2 for d in data.shape]
        data = data[: s[0], : s[1], : s[2]].reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean((1, 3, 5))
        maps[key] = data
        affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] += img.affine[:3, :3] @ np.full(3, 0.5)
    brain = np.clip(maps["t1"] / 20.0, 0.0, 1.0)
    gm, wm = maps["gm"] / 255.0, maps["wm"] / 255.0
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return {"csf": csf, "gm": gm, "wm": wm, "brain": brain}, affine


def _grid(scanner: Scanner, spacing_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The site's voxel grid: affine and shape covering the brain with a margin."""
    maps, t_aff = _template()
    idx = np.argwhere(maps["brain"] > 0.5)
    lo = t_aff[:3, :3] @ idx.min(0) + t_aff[:3, 3] - 10.0
    hi = t_aff[:3, :3] @ idx.max(0) + t_aff[:3, 3] + 10.0
    vox = np.asarray(scanner.voxel) * spacing_mm
    shape = tuple(int(math.ceil(e)) for e in (hi - lo) / vox)
    affine = np.eye(4)
    for i, (code, pos) in enumerate(zip(scanner.orientation, "RAS")):
        flip = code != pos
        affine[i, i] = -vox[i] if flip else vox[i]
        affine[i, 3] = lo[i] + (shape[i] - 1) * vox[i] if flip else lo[i]
    return affine, shape  # type: ignore[return-value]


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
    rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _anatomy(rng: np.random.Generator, affine: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Tissue maps on the site grid, with a small random pose and size per subject."""
    maps, t_aff = _template()
    jitter = np.eye(4)
    jitter[:3, :3] = _rotation(rng, 4.0) * rng.uniform(0.94, 1.06)
    jitter[:3, 3] = rng.uniform(-3.0, 3.0, 3)
    m = np.linalg.inv(t_aff) @ np.linalg.inv(jitter) @ affine
    return {
        k: ndimage.affine_transform(v, m[:3, :3], m[:3, 3], output_shape=shape, order=1)
        for k, v in maps.items()
    }


def _pick(rng: np.random.Generator, mask: np.ndarray, world: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        idx = np.flatnonzero(np.ones_like(mask))
    return world.reshape(3, -1)[:, rng.choice(idx)]


def _lesions(
    rng: np.random.Generator, population: str, tissue: dict[str, np.ndarray], world: np.ndarray, voxel: np.ndarray
) -> np.ndarray:
    """A compartment volume (0, NETC, SNFH, ET) of random smooth lesions."""
    shape = world.shape[1:]
    brain = tissue["brain"] > 0.5
    deep = ndimage.binary_erosion(brain, iterations=max(1, int(round(12.0 / voxel.mean()))))
    wm = (tissue["wm"] > 0.5) & deep
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.5)
    noise /= noise.std() + 1e-6
    out = np.zeros(shape, dtype=np.uint8)

    def blob(center: np.ndarray, radius: float) -> np.ndarray:
        axes = radius * rng.uniform(0.75, 1.25, 3)
        d = np.sqrt((((world - center[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0))
        return d * (1.0 + 0.18 * noise)

    if population == "glioma":
        d = blob(_pick(rng, wm, world), rng.uniform(11.0, 20.0))
        core = rng.uniform(0.45, 0.65)
        extent = rng.uniform(1.7, 2.3)
        out[(d < extent) & (brain | (d < 1.2))] = SNFH
        out[d < 1.0] = ET
        out[d < core] = NETC
    elif population == "metastasis":
        junction = (tissue["gm"] > 0.3) & (tissue["wm"] > 0.3) & deep
        blobs = [blob(_pick(rng, junction, world), rng.uniform(4.0, 9.0)) for _ in range(rng.integers(2, 6))]
        for d in blobs:
            out[(d < rng.uniform(1.8, 3.0)) & (tissue["wm"] > 0.25) & (out == 0)] = SNFH
        for d in blobs:
            out[d < 1.0] = ET
            if rng.random() < 0.5:
                out[d < 0.4] = NETC
    elif population == "meningioma":
        rim = brain & ~ndimage.binary_erosion(brain, iterations=1)
        for _ in range(rng.integers(1, 3)):
            d = blob(_pick(rng, rim, world), rng.uniform(9.0, 16.0))
            out[(d < 1.35) & brain & (out == 0)] = SNFH
            out[d < 1.0] = ET
    else:
        msg = f"unknown lesion population {population!r}; expected glioma, metastasis or meningioma"
        raise ValueError(msg)
    return out


def _cavity(rng: np.random.Generator, lesion: np.ndarray, tissue: dict[str, np.ndarray], world: np.ndarray) -> np.ndarray:
    """Resect part of the tumour: a fluid-filled cavity (:data:`RC`) centred on its rim."""
    rim = (lesion == ET) | (lesion == SNFH)
    center = _pick(rng, rim, world)
    axes = rng.uniform(11.0, 16.0, 3)
    d = np.sqrt((((world - center[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0))
    out = lesion.copy()
    out[(d < 1.0) & (tissue["brain"] > 0.3)] = RC
    return out


def _bias(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    terms = (x, y, z, x * y, y * z, x * z, x * x, y * y, z * z)
    field = sum(c * t for c, t in zip(rng.normal(0, 0.5, len(terms)), terms))
    return np.exp(amplitude * field).astype(np.float32)


def _sequences(
    rng: np.random.Generator, tissue: dict[str, np.ndarray], lesion: np.ndarray, scanner: Scanner
) -> dict[str, np.ndarray]:
    """The four sequences as seen by ``scanner`` (skull-stripped, so zero outside the head)."""
    soft = {k: ndimage.gaussian_filter((lesion == v).astype(np.float32), 0.6) for k, v in (("netc", NETC), ("snfh", SNFH), ("et", ET))}
    cavity = ndimage.gaussian_filter((lesion == RC).astype(np.float32), 0.6)  # fluid: looks like CSF
    in_lesion = np.clip(sum(soft.values()) + cavity, 0.0, 1.0)
    fractions = {k: tissue[k] * (1.0 - in_lesion) for k in ("csf", "gm", "wm")}
    fractions["csf"] = fractions["csf"] + cavity
    fractions.update(soft)
    head = (tissue["brain"] > 0.3) | (lesion > 0)
    texture = 1.0 + 0.05 * ndimage.gaussian_filter(rng.standard_normal(lesion.shape).astype(np.float32), 1.0)
    out = {}
    for m in MODALITIES:
        signal = sum(c * fractions[t] for c, t in zip(_CONTRAST[m], _TISSUES)) * texture
        signal = np.clip(signal * _bias(rng, lesion.shape, scanner.bias), 0.0, None) ** scanner.gamma
        n1 = rng.normal(0.0, scanner.noise, lesion.shape).astype(np.float32)
        if scanner.rician:
            n2 = rng.normal(0.0, scanner.noise, lesion.shape).astype(np.float32)
            signal = np.sqrt((signal + n1) ** 2 + n2**2)
        else:
            signal = np.clip(signal + n1, 0.0, None)
        signal = np.where(head, signal * scanner.scale, 0.0)
        if np.issubdtype(np.dtype(scanner.dtype), np.integer):
            signal = np.round(signal)
        out[m] = signal.astype(scanner.dtype)
    return out


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _site_yaml(name: str, variant: Variant) -> dict:
    present = [m for m in MODALITIES if m not in variant.missing]
    if variant.layout == "brats":
        modalities = {m: m for m in present}
    elif variant.layout == "msd":
        order = [m for m in _MSD_ORDER if m in present]
        modalities = {m: str(order.index(m)) for m in present}
    else:
        modalities = {m: _DATALIST_KEYS[m] for m in present}
    regions = {
        "brats": {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]},
        "msd": {"ET": [3], "TC": [2, 3], "WT": [1, 2, 3]},
        "wt": {"WT": [1]},
    }[variant.labels]
    doc = {"name": name, "data_dir": "data", "layout": variant.layout, "modalities": modalities, "regions": regions}
    if variant.missing:
        doc["missing"] = list(variant.missing)
    if variant.cavity:
        doc["extra_classes"] = {"RC": [_LABELS[variant.labels][RC]]}
    return doc


def _variant(i: int, rng: np.random.Generator) -> Variant:
    """Hospital ``i``'s variant: the three base ones, then perturbed copies of them."""
    base = VARIANTS[i % len(VARIANTS)]
    if i < len(VARIANTS):
        return base
    s = base.scanner
    scanner = replace(
        s,
        gamma=float(s.gamma * rng.uniform(0.85, 1.15)),
        scale=float(s.scale * rng.uniform(0.5, 2.0)),
        bias=float(s.bias * rng.uniform(0.7, 1.3)),
        noise=float(s.noise * rng.uniform(0.7, 1.3)),
        voxel=tuple(float(v * rng.uniform(0.9, 1.1)) for v in s.voxel),  # type: ignore[arg-type]
    )
    return replace(base, scanner=scanner)


def site_name(i: int) -> str:
    """``hospitalA``, ``hospitalB``, ... (``hospital27`` onwards past Z)."""
    return f"hospital{chr(ord('A') + i)}" if i < 26 else f"hospital{i + 1}"


def make_demo(
    out: str | Path,
    sites: int = 3,
    cases: int = 8,
    seed: int = 0,
    spacing_mm: float = 4.0,
    log: Callable[[str], None] | None = print,
    joiner: bool = False,
) -> list[Path]:
    """Write the demo federation: one folder per hospital with its data and site.yaml.

    Anatomy comes from the MNI152 2009 template and GM/WM maps shipped inside nilearn
    (posed and scaled a little differently per subject); sequences are synthesized
    from tissue fractions with sequence-specific contrasts, and lesions are random
    smooth shapes with an enhancing part (ET), a necrotic core (NETC) and oedema
    (SNFH). The hospitals differ in everything a federation meets:

    * hospitalA: glioma-like lesions, BraTS layout and labels, RAS, isotropic,
      int16, Rician noise;
    * hospitalB: metastasis-like lesions, Decathlon Task01 layout (4-D, dataset.json,
      MSD labels) without native T1 (declared ``missing``), LPS, anisotropic,
      float32, strong bias field, a flatter contrast curve;
    * hospitalC: meningioma-like extra-axial masses, MONAI datalist layout, whole
      tumour only (label 1), LAS, uint16, a steeper contrast curve.

    Further hospitals cycle these variants with perturbed scanners and their own seeds.
    With ``joiner``, one more hospital (:data:`JOINER_NAME`) is written for joining a
    running federation or testing a universal model on an unseen scanner: glioma-like
    lesions, BraTS layout and labels, only FLAIR and T1c (T1 and T2 declared
    ``missing``), RPI, 1.6x thicker slices, Gaussian noise, and a resection cavity in
    every case (label 4, declared as the site's extra class ``RC``). The other
    hospitals' files are the same with or without it.

    Args:
        out: the output folder (created).
        sites: number of hospitals.
        cases: cases per hospital.
        seed: the same seed gives the same arrays.
        spacing_mm: base voxel size; each scanner scales it (4 mm gives grids of
            about 36-54 voxels per side).
        log: progress printer (``None`` for silence).
        joiner: also write the joining hospital (its site.yaml comes last).

    Returns:
        The ``site.yaml`` paths, one per hospital.
    """
    if sites < 1 or cases < 1:
        msg = f"need at least one site and one case, found sites={sites}, cases={cases}"
        raise ValueError(msg)
    out = Path(out)
    paths = []
    start = time.perf_counter()
    plan = [(site_name(i), i, _variant(i, np.random.default_rng([seed, i, 10_000]))) for i in range(sites)]
    if joiner:
        plan.append((JOINER_NAME, sites, JOINER))
    for name, i, variant in plan:
        affine, shape = _grid(variant.scanner, spacing_mm)
        world = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
        world = np.einsum("ij,j...->i...", affine[:3, :3].astype(np.float32), world) + affine[:3, 3, None, None, None].astype(np.float32)
        voxel = np.abs(np.diag(affine)[:3])
        root, data = out / name, out / name / "data"
        data.mkdir(parents=True, exist_ok=True)
        entries = []
        for k in range(cases):
            rng = np.random.default_rng([seed, i, k])
            tissue = _anatomy(rng, affine, shape)
            lesion = _lesions(rng, variant.population, tissue, world, voxel)
            if variant.cavity:
                lesion = _cavity(rng, lesion, tissue, world)
            seqs = _sequences(rng, tissue, lesion, variant.scanner)
            label = np.zeros_like(lesion)
            for compartment, value in _LABELS[variant.labels].items():
                label[lesion == compartment] = value
            cid = f"{name}-{k:03d}"
            present = [m for m in MODALITIES if m not in variant.missing]
            if variant.layout == "brats":
                for m in present:
                    _save(seqs[m], affine, data / cid / f"{cid}-{m}.nii.gz")
                _save(label, affine, data / cid / f"{cid}-seg.nii.gz")
            elif variant.layout == "msd":
                stack = np.stack([seqs[m] for m in _MSD_ORDER if m in present], axis=-1)
                _save(stack, affine, data / "imagesTr" / f"{cid}.nii.gz")
                _save(label, affine, data / "labelsTr" / f"{cid}.nii.gz")
                entries.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
            else:
                for m in present:
                    _save(seqs[m], affine, data / "images" / f"{cid}_{_DATALIST_KEYS[m]}.nii.gz")
                _save(label, affine, data / "labels" / f"{cid}_wt.nii.gz")
                image = {_DATALIST_KEYS[m]: f"images/{cid}_{_DATALIST_KEYS[m]}.nii.gz" for m in present}
                entries.append({"id": cid, "image": image, "label": f"labels/{cid}_wt.nii.gz"})
            if log is not None:
                log(f"[make-demo] {name}: case {k + 1}/{cases} ({time.perf_counter() - start:.1f} s)")
        if variant.layout == "msd":
            order = [m for m in _MSD_ORDER if m in present]
            meta = {
                "name": f"{name} (uharmony-fed demo, Decathlon Task01 layout)",
                "tensorImageSize": "4D",
                "modality": {str(j): _MSD_NAMES[m] for j, m in enumerate(order)},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
                "numTraining": cases,
                "numTest": 0,
                "training": entries,
                "test": [],
            }
            (data / "dataset.json").write_text(json.dumps(meta, indent=2))
        elif variant.layout == "datalist":
            (data / "datalist.json").write_text(json.dumps({"training": entries}, indent=2))
        site_yaml = root / "site.yaml"
        header = (
            f"# {name}: uharmony-fed demo site ({variant.population}-like lesions, {variant.layout} layout, "
            f"{variant.scanner.orientation}, seed {seed}).\n"
        )
        site_yaml.write_text(header + yaml.safe_dump(_site_yaml(name, variant), sort_keys=False))
        paths.append(site_yaml)
    if log is not None:
        log(f"[make-demo] wrote {len(plan)} sites x {cases} cases to {out} in {time.perf_counter() - start:.1f} s")
    return paths
