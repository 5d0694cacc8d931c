"""Tests of site configs, layouts, validation, the MONAI pipeline and datasets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import grid_affine, synth_case, write_nifti, write_site_yaml

from uharmony_fed import MODALITIES, REGIONS
from uharmony_fed.config import ConfigError
from uharmony_fed.data import (
    DataConfig,
    DataError,
    SiteConfig,
    build_datasets,
    check_case,
    check_data,
    data_loader,
    detect_layout,
    discover_cases,
    format_report,
    load_case_for_inference,
    load_site_config,
    regions_to_site_labels,
    site_label_to_regions,
    split_cases,
    val_transform,
)
from uharmony_fed.data.transforms import RandModalityDropoutd, case_to_dict

SMALL = DataConfig(spacing=(2.0, 2.0, 2.0), roi_size=(8, 8, 8), samples_per_case=2, batch_size=2)
BRATS = {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
MSD = {"ET": [3], "TC": [2, 3], "WT": [1, 2, 3]}
WT_ONLY = {"WT": [1]}


def _site(regions: dict, **kw) -> SiteConfig:
    mods = {m: m for m in MODALITIES}
    return SiteConfig(data_dir=Path("."), modalities=mods, regions=regions, **kw)


# ---------------------------------------------------------------- site.yaml


def test_unknown_site_yaml_key_names_nearest(tmp_path: Path) -> None:
    path = write_site_yaml(tmp_path, name="x", modalites={"t1n": "t1n"})
    with pytest.raises(ConfigError, match="did you mean 'modalities'") as exc:
        load_site_config(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"modalities": {"t1": "t1"}}, "unknown modality 't1'"),
        ({"regions": {"NCR": [1]}}, "unknown region 'NCR'"),
        ({"modalities": {m: m for m in MODALITIES}, "missing": ["t1n"]}, "both mapped and declared missing"),
        ({"modalities": {"t1n": "t1n", "t1c": "t1c"}}, "neither mapped nor declared missing"),
        ({"regions": {"WT": []}}, "positive label values"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"bad_case_policy": "skp"}, "did you mean 'skip'"),
    ],
)
def test_site_yaml_rejects_inconsistent_mappings(tmp_path: Path, fields: dict, match: str) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match=match):
        load_site_config(write_site_yaml(tmp_path, **fields))


def test_site_yaml_relative_paths_and_layout_conventions(make_msd) -> None:
    path = make_msd(n=1)
    site = load_site_config(path)
    assert site.data_dir == (path.parent / "data").resolve()
    assert site.state_dir == (path.parent / "state").resolve()
    assert site.layout == "msd"
    assert site.modalities == {"t2f": "0", "t1n": "1", "t1c": "2", "t2w": "3"}
    assert site.regions == MSD


# ---------------------------------------------------------------- region mapping


@pytest.mark.parametrize(
    ("regions", "expected"),
    [
        # label value -> membership in (ET, TC, WT)
        (BRATS, {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 1), 3: (1, 1, 1)}),
        (MSD, {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 1), 3: (1, 1, 1)}),
        (WT_ONLY, {0: (0, 0, 0), 1: (0, 0, 1)}),
    ],
    ids=["brats", "msd", "wt-only"],
)
def test_site_labels_to_regions(regions: dict, expected: dict) -> None:
    site = _site(regions)
    label = np.array(list(expected), dtype=np.uint8).reshape(-1, 1, 1)
    masks, annotated = site_label_to_regions(label, site)
    assert masks.shape == (3, len(expected), 1, 1)
    for i, value in enumerate(expected):
        assert tuple(masks[:, i, 0, 0]) == expected[value]
    assert tuple(annotated) == tuple(float(r in regions) for r in REGIONS)
    t_masks, _ = site_label_to_regions(torch.as_tensor(label[None]), site)
    assert torch.equal(t_masks, torch.as_tensor(masks))


@pytest.mark.parametrize("regions", [BRATS, MSD, WT_ONLY], ids=["brats", "msd", "wt-only"])
def test_inverse_mapping_round_trips(regions: dict) -> None:
    site = _site(regions)
    label = np.random.default_rng(0).choice([0, *site.label_values], size=(6, 5, 4)).astype(np.int16)
    masks, _ = site_label_to_regions(label, site)
    np.testing.assert_array_equal(regions_to_site_labels(masks, site), label)


@pytest.mark.parametrize(
    ("regions", "predicted", "label"),
    [
        (BRATS, (1, 0, 0), 3),  # ET without TC/WT: nested, so ET
        (BRATS, (1, 0, 1), 3),
        (BRATS, (0, 1, 0), 1),  # TC without WT: necrotic core
        (MSD, (0, 1, 0), 2),
        (WT_ONLY, (1, 1, 0), 1),
        (WT_ONLY, (0, 0, 0), 0),
    ],
)
def test_inverse_mapping_closes_under_nesting(regions: dict, predicted: tuple, label: int) -> None:
    masks = np.asarray(predicted, dtype=np.float32).reshape(3, 1, 1, 1)
    assert regions_to_site_labels(masks, _site(regions))[0, 0, 0] == label


# ---------------------------------------------------------------- layouts and pipeline


def _preprocess(site: SiteConfig, case, cfg: DataConfig = SMALL) -> dict:
    return val_transform(site, cfg)(case_to_dict(case, site))


def test_brats_layout_reads_and_assembles_channels(make_brats) -> None:
    site = load_site_config(make_brats(n=2, missing=("t1c",)))
    cases = discover_cases(site)
    assert [c.case_id for c in cases] == ["Case-000", "Case-001"]
    assert set(cases[0].images) == {"t1n", "t2w", "t2f"} and cases[0].label is not None
    out = _preprocess(site, cases[0])
    assert out["image"].shape[0] == 4 and out["label"].shape[0] == 3
    assert out["present"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert float(out["image"][1].abs().sum()) == 0.0  # declared missing: zero-filled
    assert out["annotated"].tolist() == [1.0, 1.0, 1.0]
    nz = out["image"][0][out["image"][0] != 0]
    assert abs(float(nz.mean())) < 0.1 and abs(float(nz.std()) - 1) < 0.1  # normalized on the brain


def test_msd_layout_lps_anisotropic_becomes_ras_at_configured_spacing(make_msd) -> None:
    site = load_site_config(make_msd(n=1, spacing=(1.5, 1.5, 3.0), orientation="LPS"))
    (case,) = discover_cases(site)
    assert case.channels == {"t2f": 0, "t1n": 1, "t1c": 2, "t2w": 3}
    assert nib.aff2axcodes(nib.load(case.images["t1n"]).affine) == ("L", "P", "S")
    out = _preprocess(site, case)
    aff = out["image"].affine.numpy()
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(aff)[:3]), SMALL.spacing, atol=1e-4)
    assert out["label"].shape[1:] == out["image"].shape[1:]
    # MSD labels (1 edema, 2 non-enhancing, 3 enhancing) give the same regions as BraTS.
    assert out["label"][0].sum() > 0 and torch.all(out["label"][0] <= out["label"][1])
    assert torch.all(out["label"][1] <= out["label"][2])


def test_msd_channels_land_in_product_order(make_msd) -> None:
    site = load_site_config(make_msd(n=1))
    cfg = dataclasses.replace(SMALL, spacing=(2.0, 2.0, 2.0))
    from monai.transforms import Compose

    from uharmony_fed.data.transforms import preprocess_transforms

    head = Compose(preprocess_transforms(site, cfg)[:3])  # load, channel-first, assemble
    out = head(case_to_dict(discover_cases(site)[0], site))
    images, _ = synth_case(seed=0)
    for i, m in enumerate(MODALITIES):
        np.testing.assert_allclose(out["image"][i].numpy(), images[m], rtol=1e-6)


@pytest.mark.parametrize("form", ["dict", "list", "4d"])
def test_datalist_layout_whole_tumour_site(make_datalist, form: str) -> None:
    site = load_site_config(make_datalist(form=form))
    assert site.layout == "datalist"
    cases = discover_cases(site)
    assert [c.case_id for c in cases] == ["c0", "c1"]
    assert not any(check_case(c, site) for c in cases)
    out = _preprocess(site, cases[0])
    assert out["annotated"].tolist() == [0.0, 0.0, 1.0]
    assert float(out["label"][:2].sum()) == 0.0 and float(out["label"][2].sum()) > 0
    assert out["present"].tolist() == [1.0] * 4


def test_detect_layout_unknown_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no known layout") as exc:
        detect_layout(tmp_path)
    assert exc.value.file == str(tmp_path) and "Fix:" in str(exc.value)


def test_inference_round_trip_to_original_lps_grid(make_brats) -> None:
    path = make_brats(n=1, spacing=(2.0, 2.0, 2.0), orientation="LPS")
    site = load_site_config(path)
    (case,) = discover_cases(site)
    inf = load_case_for_inference(case, site, SMALL)
    assert nib.aff2axcodes(inf.image.affine.numpy()) == ("R", "A", "S")
    # The preprocessed label stands in for a perfect prediction on the model's grid.
    out = _preprocess(site, case)
    assert out["label"].shape[1:] == inf.image.shape[1:]
    img = inf.prediction_to_nifti(out["label"], site)
    original = nib.load(case.label)
    np.testing.assert_array_equal(img.affine, original.affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(original.dataobj))


def test_inference_on_coarser_grid_returns_original_shape(make_brats) -> None:
    site = load_site_config(make_brats(n=1, shape=(16, 14, 12), spacing=(1.0, 1.0, 2.5)))
    (case,) = discover_cases(site)
    inf = load_case_for_inference(case, site, DataConfig(spacing=(2.0, 2.0, 2.0)))
    back = inf.to_original_grid(torch.ones(3, *inf.image.shape[1:]))
    assert back.shape == (3, 16, 14, 12) and float(back.max()) == pytest.approx(1.0)


# ---------------------------------------------------------------- bad input


def _truncate(p: Path) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


def _zero_bytes(p: Path) -> None:
    p.write_bytes(b"")


def _other_shape(p: Path) -> None:
    write_nifti(p, synth_case(shape=(16, 16, 14))[0]["t1n"], grid_affine())


def _other_affine(p: Path) -> None:
    write_nifti(p, np.asanyarray(nib.load(p).dataobj), grid_affine(spacing=(2.0, 2.0, 2.5)))


def _nan(p: Path) -> None:
    img = nib.load(p)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    write_nifti(p, data, img.affine)


def _two_d(p: Path) -> None:
    write_nifti(p, np.ones((16, 16), np.float32))


def _all_zero(p: Path) -> None:
    write_nifti(p, np.zeros((16, 16, 16), np.float32), grid_affine())


def _unmapped_label(p: Path) -> None:
    img = nib.load(p)
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 4
    write_nifti(p, data, img.affine)


BAD = {
    "truncated": ("t1c", _truncate, "truncated or corrupt", "copy or export the file again"),
    "zero-byte": ("t2w", _zero_bytes, "empty (0 bytes)", "copy or export"),
    "grid-shape": ("t2f", _other_shape, "not on the same grid", "resample"),
    "grid-affine": ("t2f", _other_affine, "largest affine difference", "resample"),
    "nan": ("t1n", _nan, "1 NaN or Inf voxels", "nan_to_num"),
    "2d": ("t1c", _two_d, "expected a 3-D volume, found shape (16, 16)", "whole 3-D volume"),
    "all-zero": ("t2w", _all_zero, "all zeros", "missing"),
    "unmapped-label": ("seg", _unmapped_label, "label values [4] are not mapped", "regions:"),
    "missing-modality": ("t1n", lambda p: p.unlink(), "declared modality 't1n' not found", "under 'missing:'"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_names_file_and_fix(make_brats, kind: str) -> None:
    suffix, damage, reason, fix = BAD[kind]
    site = load_site_config(make_brats(n=2, bad_case_policy="fail"))
    bad = site.data_dir / "Case-001" / f"Case-001-{suffix}.nii.gz"
    damage(bad)
    good_case, bad_case = discover_cases(site)
    assert check_case(good_case, site) == []
    problems = check_case(bad_case, site)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.file == str(bad)
    assert reason in problem.reason and fix in problem.fix
    # Policy "fail": one DataError "FILE: reason. Fix: ...".
    with pytest.raises(DataError) as exc:
        build_datasets(site, SMALL, seed=0)
    assert exc.value.file == str(bad)
    assert str(exc.value).startswith(f"{bad}: ") and reason in str(exc.value) and "Fix: " in str(exc.value)


def test_voxel_budget(make_brats) -> None:
    site = load_site_config(make_brats(n=1))
    (problem,) = check_case(discover_cases(site)[0], site, max_voxels=1000)
    assert "exceed the budget of 1,000" in problem.reason and "max_voxels" in problem.fix


def test_bad_case_policy_skip_excludes_and_reports(make_brats) -> None:
    site = load_site_config(make_brats(n=3, bad_case_policy="skip", val_fraction=0.0))
    bad = site.data_dir / "Case-002" / "Case-002-t2f.nii.gz"
    _nan(bad)
    train_ds, val_ds, skipped = build_datasets(site, SMALL, seed=0)
    assert len(train_ds) == 2 and len(val_ds) == 0
    assert [p.file for p in skipped] == [str(bad)]
    batch = next(iter(data_loader(train_ds, SMALL, train=True)))
    assert batch["image"].shape == (4, 4, 8, 8, 8)  # 2 cases x 2 patches
    assert batch["label"].shape == (4, 3, 8, 8, 8) and batch["present"].shape == (4, 4)
    assert set(batch["case_id"]) <= {"Case-000", "Case-001"}


def test_disk_cache_lives_in_state_dir(make_brats) -> None:
    site = load_site_config(make_brats(n=2, val_fraction=0.5))
    cfg = dataclasses.replace(SMALL, cache="disk")
    train_ds, val_ds, _ = build_datasets(site, cfg, seed=0)
    _ = train_ds[0], val_ds[0]
    assert list((site.state_dir / "cache").glob("*/*.pt"))


def test_split_is_deterministic_and_seeded(make_brats) -> None:
    site = load_site_config(make_brats(n=6, shape=(8, 8, 8)))
    cases = discover_cases(site)
    train, val = split_cases(cases, 0.34, seed=1)
    assert (train, val) == split_cases(list(reversed(cases)), 0.34, seed=1)
    assert len(val) == 2 and len(train) == 4
    splits = {tuple(c.case_id for c in split_cases(cases, 0.34, seed=s)[1]) for s in range(6)}
    assert len(splits) > 1


def test_check_data_bare_folder_infers_mapping_and_reports(make_brats, make_msd) -> None:
    site_yaml = make_brats(n=2, orientation="LPS")
    data_dir = site_yaml.parent / "data"
    _unmapped_label(data_dir / "Case-000" / "Case-000-seg.nii.gz")
    report = check_data(data_dir)  # no site.yaml in data/: BraTS convention
    assert report.layout == "brats" and not report.ok
    ok, bad = report.cases[1], report.cases[0]
    assert ok.usable and ok.orientation == "LPS" and ok.shape == (16, 16, 16) and ok.spacing == (2.0, 2.0, 2.0)
    assert ok.label_values == (0, 1, 2, 3) and ok.modalities == MODALITIES
    text = format_report(report)
    assert "Case-000" in text and "label values [4]" in text and "NOT OK" in text
    msd = check_data(make_msd(n=1, write_yaml=False))
    assert msd.ok and msd.layout == "msd" and msd.site.regions == MSD


def test_modality_dropout_keeps_one_present() -> None:
    t = RandModalityDropoutd(prob=1.0)
    t.set_random_state(0)
    present = torch.tensor([1.0, 0.0, 1.0, 0.0])
    dropped = set()
    for _ in range(10):
        d = t({"image": torch.ones(4, 2, 2, 2) * present.view(4, 1, 1, 1), "present": present})
        dropped.add(int(torch.nonzero(present - d["present"])[0, 0]))
        assert d["present"].sum() == 1
        assert torch.equal(d["image"].flatten(1).amax(1), d["present"])
    assert dropped == {0, 2}  # only present sequences are dropped, each sometimes
