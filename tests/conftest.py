"""Shared fixtures: tiny NIfTI cases in every layout, and a tiny demo federation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

MODS = ("t1n", "t1c", "t2w", "t2f")
#: Label values written by the synthetic cases (BraTS convention: 1 NETC, 2 SNFH, 3 ET).
BRATS_TO_MSD = {0: 0, 1: 2, 2: 1, 3: 3}


def grid_affine(spacing=(2.0, 2.0, 2.0), orientation: str = "RAS", shape=(16, 16, 16)) -> np.ndarray:
    """An axis-aligned affine with the given voxel size and axis directions."""
    aff = np.eye(4)
    for i, (code, pos) in enumerate(zip(orientation, "RAS")):
        flip = code != pos
        aff[i, i] = -spacing[i] if flip else spacing[i]
        aff[i, 3] = (shape[i] - 1) * spacing[i] - 16.0 if flip else -16.0
    return aff


def synth_case(shape=(16, 16, 16), seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Four float32 sequences (a bright ellipsoid 'brain') and a BraTS label volume."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    c = (np.asarray(shape, dtype=np.float32) - 1) / 2
    r = np.sqrt((((idx - c[:, None, None, None]) / (c[:, None, None, None] * 0.85)) ** 2).sum(0))
    brain = r < 1.0
    lc = c + rng.integers(-2, 3, 3)
    d = np.sqrt(((idx - lc[:, None, None, None]) ** 2).sum(0))
    label = np.zeros(shape, dtype=np.uint8)
    label[(d < 4.5) & brain] = 2
    label[d < 3.0] = 3
    label[d < 1.5] = 1
    images = {}
    for i, m in enumerate(MODS):
        img = (100.0 * (i + 1) + 10 * rng.standard_normal(shape)) * brain
        img += 50.0 * (label > 0)
        images[m] = img.astype(np.float32)
    return images, label


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Save ``array`` as NIfTI (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def write_site_yaml(folder: Path, **fields) -> Path:
    """Write ``folder/site.yaml`` with ``data_dir: data`` unless given."""
    fields.setdefault("data_dir", "data")
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


@pytest.fixture
def make_brats(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a BraTS-layout site folder (``site.yaml`` + ``data/``); returns the site.yaml."""

    def make(
        n: int = 3,
        shape=(16, 16, 16),
        spacing=(2.0, 2.0, 2.0),
        orientation: str = "RAS",
        missing: tuple[str, ...] = (),
        name: str = "brats_site",
        **site_fields,
    ) -> Path:
        root = tmp_path / name
        aff = grid_affine(spacing, orientation, shape)
        for k in range(n):
            images, label = synth_case(shape, seed=k)
            cid = f"Case-{k:03d}"
            for m in MODS:
                if m not in missing:
                    write_nifti(root / "data" / cid / f"{cid}-{m}.nii.gz", images[m], aff)
            write_nifti(root / "data" / cid / f"{cid}-seg.nii.gz", label, aff)
        mods = {m: m for m in MODS if m not in missing}
        fields = {"name": name, "layout": "brats", "modalities": mods, "regions": {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}}
        if missing:
            fields["missing"] = list(missing)
        fields.update(site_fields)
        return write_site_yaml(root, **fields)

    return make


@pytest.fixture
def make_msd(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a Decathlon Task01 site (4-D FLAIR,T1w,T1gd,T2w; MSD labels); returns site.yaml."""

    def make(n: int = 2, shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0), orientation: str = "RAS", write_yaml: bool = True) -> Path:
        root = tmp_path / "msd_site"
        data = root / "data"
        aff = grid_affine(spacing, orientation, shape)
        entries = []
        for k in range(n):
            images, label = synth_case(shape, seed=k)
            stack = np.stack([images[m] for m in ("t2f", "t1n", "t1c", "t2w")], axis=-1)
            msd_label = np.vectorize(BRATS_TO_MSD.get)(label).astype(np.uint8)
            write_nifti(data / "imagesTr" / f"BRATS_{k:03d}.nii.gz", stack, aff)
            write_nifti(data / "labelsTr" / f"BRATS_{k:03d}.nii.gz", msd_label, aff)
            entries.append({"image": f"./imagesTr/BRATS_{k:03d}.nii.gz", "label": f"./labelsTr/BRATS_{k:03d}.nii.gz"})
        meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}, "training": entries}
        (data / "dataset.json").write_text(json.dumps(meta))
        if write_yaml:
            return write_site_yaml(root, name="msd_site", layout="msd")
        return data

    return make


@pytest.fixture
def make_datalist(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a datalist site (dict, list or 4-D image form; whole-tumour labels); returns site.yaml."""

    def make(form: str = "dict", n: int = 2, shape=(16, 16, 16)) -> Path:
        root = tmp_path / f"datalist_{form}"
        data = root / "data"
        keys = {"t1n": "T1", "t1c": "T1CE", "t2w": "T2", "t2f": "FLAIR"}
        entries = []
        for k in range(n):
            images, label = synth_case(shape, seed=k)
            wt = (label > 0).astype(np.uint8)
            write_nifti(data / "labels" / f"c{k}.nii.gz", wt)
            if form == "dict":
                for m in MODS:
                    write_nifti(data / "images" / f"c{k}_{keys[m]}.nii.gz", images[m])
                image: object = {keys[m]: f"images/c{k}_{keys[m]}.nii.gz" for m in MODS}
            elif form == "list":
                for m in MODS:
                    write_nifti(data / "images" / f"c{k}_{m}.nii.gz", images[m])
                image = [f"images/c{k}_{m}.nii.gz" for m in MODS]
            else:
                write_nifti(data / "images" / f"c{k}.nii.gz", np.stack([images[m] for m in MODS], -1))
                image = f"images/c{k}.nii.gz"
            entries.append({"id": f"c{k}", "image": image, "label": f"labels/c{k}.nii.gz"})
        (data / "datalist.json").write_text(json.dumps({"training": entries}))
        mods = keys if form == "dict" else {m: str(i) for i, m in enumerate(MODS)}
        return write_site_yaml(root, name=f"dl_{form}", layout="datalist", modalities=mods, regions={"WT": [1]})

    return make


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo federation (3 sites x 3 cases, 6 mm voxels); returns its root folder.

    Site configs are ``ROOT/hospitalA/site.yaml`` etc. Treat it as read-only.
    """
    from uharmony_fed.demo import make_demo

    root = tmp_path_factory.mktemp("tiny_demo")
    make_demo(root, sites=3, cases=3, seed=0, spacing_mm=6.0, log=None)
    return root
