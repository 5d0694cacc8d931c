"""One site end to end without a federation: train, validate, predict back to NIfTI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from uharmony_fed.cli import main
from uharmony_fed.data import discover_cases, load_site_config

REPO = Path(__file__).resolve().parents[1]


def test_train_then_predict_one_site(tiny_demo: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "one.yaml"
    cfg.write_text((REPO / "configs" / "smoke.yaml").read_text().replace("data_root: smoke_data",
                                                                          f"data_root: {tiny_demo}"))
    site_yaml = tiny_demo / "hospitalB" / "site.yaml"
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--site-config", str(site_yaml), "--run-dir", str(run)]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["phase"] == "eval"] == [1, 2]
    assert all(0.0 <= r["dice-WT"] <= 1.0 for r in rows if r["phase"] == "eval")
    site = load_site_config(site_yaml)
    case = discover_cases(site)[0]
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--model", str(run), "--site-config", str(site_yaml), "--input", case.case_id,
                 "--output", str(out)]) == 0
    seg, ref = nib.load(out), nib.load(next(iter(case.images.values())))
    assert seg.shape == ref.shape[:3]
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, *site.label_values}
