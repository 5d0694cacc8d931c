"""Tests of the demo federation generator."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from uharmony_fed.data import DataConfig, build_datasets, check_data, data_loader, discover_cases, load_site_config
from uharmony_fed.demo import TEMPLATE_FILES, make_demo, template_dir

SITES = ("hospitalA", "hospitalB", "hospitalC")


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asanyarray(nib.load(p).dataobj) for p in sorted(root.rglob("*.nii.gz"))}


def _volumes(site_yaml: Path, modality: str) -> list[tuple[np.ndarray, np.ndarray, nib.Nifti1Image]]:
    site = load_site_config(site_yaml)
    out = []
    for case in discover_cases(site):
        img = nib.load(case.images[modality])
        data = np.asanyarray(img.dataobj).astype(np.float32)
        if case.channels:
            data = data[..., case.channels[modality]]
        out.append((data, np.asanyarray(nib.load(case.label).dataobj), img))
    return out


def test_template_ships_with_nilearn() -> None:
    for name in TEMPLATE_FILES.values():
        assert (template_dir() / name).is_file()


def test_demo_is_deterministic_and_seeded(tmp_path: Path) -> None:
    kw = {"sites": 4, "cases": 1, "spacing_mm": 8.0, "log": None}
    a = _arrays(make_demo(tmp_path / "a", seed=3, **kw)[0].parent.parent)
    b = _arrays(make_demo(tmp_path / "b", seed=3, **kw)[0].parent.parent)
    c = _arrays(make_demo(tmp_path / "c", seed=4, **kw)[0].parent.parent)
    assert a.keys() == b.keys() == c.keys() and len(a) == 5 + 2 + 5 + 5  # A, B, C, D files
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert any(not np.array_equal(a[k], c[k]) for k in a if "seg" not in k and "labels" not in k)
    # A fourth site cycles hospitalA's variant with its own seed and scanner.
    d_t1c = next(v for k, v in a.items() if k.startswith("hospitalD") and k.endswith("t1c.nii.gz"))
    a_t1c = next(v for k, v in a.items() if k.startswith("hospitalA") and k.endswith("t1c.nii.gz"))
    assert d_t1c.shape != a_t1c.shape or not np.array_equal(d_t1c, a_t1c)


def test_demo_sites_check_clean(tiny_demo: Path) -> None:
    for name in SITES:
        report = check_data(tiny_demo / name)
        assert report.ok, report.problems or [c.problems for c in report.cases]
        assert len(report.cases) == 3
        # Without site.yaml the mapping is inferred (dataset.json names, datalist keys).
        assert check_data(tiny_demo / name / "data").ok


def test_demo_sites_differ(tiny_demo: Path) -> None:
    sites = {name: load_site_config(tiny_demo / name / "site.yaml") for name in SITES}
    assert [s.layout for s in sites.values()] == ["brats", "msd", "datalist"]
    assert sites["hospitalB"].missing == ("t1n",) and sites["hospitalC"].missing == ()
    assert sites["hospitalA"].regions == {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
    assert sites["hospitalB"].regions == {"ET": [3], "TC": [2, 3], "WT": [1, 2, 3]}
    assert sites["hospitalC"].regions == {"WT": [1]}
    grids, medians, labels, blobs = {}, {}, {}, {}
    for name in SITES:
        vols = _volumes(tiny_demo / name / "site.yaml", "t2f")
        img = vols[0][2]
        grids[name] = ("".join(nib.aff2axcodes(img.affine)), tuple(np.round(img.header.get_zooms()[:3], 3)))
        medians[name] = float(np.median(np.concatenate([v[v > 0] for v, _, _ in vols])))
        labels[name] = set(np.unique(np.concatenate([lab.ravel() for _, lab, _ in vols])).tolist())
        blobs[name] = np.mean([ndimage.label(lab > 0)[1] for _, lab, _ in vols])
    assert [g[0] for g in grids.values()] == ["RAS", "LPS", "LAS"]
    assert len({g[1] for g in grids.values()}) == 3
    spacing_b = grids["hospitalB"][1]
    assert spacing_b[2] > 1.2 * spacing_b[0]  # anisotropic
    ordered = sorted(medians.values())
    assert ordered[1] > 2 * ordered[0] and ordered[2] > 2 * ordered[1], medians  # scanner intensity scales
    assert labels["hospitalA"] == {0, 1, 2, 3} and labels["hospitalC"] == {0, 1}
    assert labels["hospitalB"] >= {0, 1, 3}
    assert blobs["hospitalB"] > blobs["hospitalA"]  # several metastases vs one glioma


def test_demo_glioma_has_necrotic_core_inside_enhancing_rim(tiny_demo: Path) -> None:
    for _, lab, _ in _volumes(tiny_demo / "hospitalA" / "site.yaml", "t1c"):
        assert (lab == 1).any() and (lab == 3).sum() > 0 and (lab == 2).sum() > 0


@pytest.mark.parametrize("name", SITES)
def test_demo_sites_feed_the_pipeline(tiny_demo: Path, name: str) -> None:
    site = load_site_config(tiny_demo / name / "site.yaml")
    cfg = DataConfig(spacing=(6.0, 6.0, 6.0), roi_size=(16, 16, 16), batch_size=1)
    train_ds, val_ds, skipped = build_datasets(site, cfg, seed=0)
    assert (len(train_ds), len(val_ds), skipped) == (2, 1, [])
    batch = next(iter(data_loader(train_ds, cfg, train=True)))
    assert batch["image"].shape == (2, 4, 16, 16, 16) and batch["label"].shape == (2, 3, 16, 16, 16)
    present = {"hospitalB": [0.0, 1.0, 1.0, 1.0]}.get(name, [1.0] * 4)
    annotated = {"hospitalC": [0.0, 0.0, 1.0]}.get(name, [1.0] * 3)
    assert batch["present"][0].tolist() == present and batch["annotated"][0].tolist() == annotated
    assert float(val_ds[0]["label"][2].sum()) > 0
