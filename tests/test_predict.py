"""Prediction: a site's model from a run's shared arrays and its own local part, back on the case's grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from uharmony_fed.checkpoint import save_payload
from uharmony_fed.cli import main
from uharmony_fed.config import parse, to_dict
from uharmony_fed.data import DataConfig, load_site_config
from uharmony_fed.fedconfig import config_to_dict, load_config
from uharmony_fed.model import ModelConfig, build_model
from uharmony_fed.policy import canonical_state, get_policy, split_keys
from uharmony_fed.predict import case_from_input, load_site_model, predict_case, predict_to_files

FED = "testfed"
TINY = ModelConfig(features=(4, 8, 16), head_channels=4)
DATA = {"spacing": [4.0, 4.0, 4.0], "roi_size": [16, 16, 16], "cache": "none"}
#: Head biases (ET, TC, WT) that make every voxel "WT only": SNFH (2) in BraTS, edema (1) in Decathlon.
WT_ONLY = (-10.0, -10.0, 10.0)


def write_run(run: Path, site_yamls: list[Path], bias=WT_ONLY, policy: str = "uharmony") -> Path:
    """A finished run (final_shared.ckpt, fed.yaml) and each site's local state.

    The head's weights are zeroed and its bias set to ``bias`` in the local part, so the
    prediction shows whether the site's own head was loaded.
    """
    torch.manual_seed(0)
    model = build_model(TINY)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor(bias).expand_as(model.head.bias))
    shared, local = split_keys(model, get_policy(policy))
    canon = canonical_state(model)
    save_payload(run / "final_shared.ckpt", {"arrays": {k: canon[k].clone() for k in shared}, "policy": policy,
                                             "model": to_dict(TINY), "rounds": 1, "name": FED})
    cfg = load_config(overrides={"name": FED, "data": DATA, "federation": {"policy": policy}})
    (run / "fed.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    for sy in site_yamls:
        site = load_site_config(sy)
        save_payload(site.state_dir / FED / "local_state.ckpt",
                     {"round": 1, "step": 2, "local": {k: canon[k].clone() for k in local}, "optimizer": None})
    return run


@pytest.mark.parametrize(("orientation", "spacing", "shape"), [("LPS", (2.0, 2.0, 2.0), (16, 16, 16)),
                                                               ("RAS", (1.5, 2.5, 4.0), (20, 14, 9))])
def test_prediction_on_the_case_grid_with_site_labels(make_brats, tmp_path, orientation, spacing, shape):
    sy = make_brats(n=1, shape=shape, spacing=spacing, orientation=orientation)
    run = write_run(tmp_path / "run", [sy])
    site = load_site_config(sy)
    case_dir = site.data_dir / "Case-000"
    case, sub = case_from_input(case_dir, site)
    seg = predict_case(run, sub, case)
    ref = nib.load(case_dir / "Case-000-t2f.nii.gz")
    out = tmp_path / "seg.nii.gz"
    nib.save(seg, out)
    back = nib.load(out)
    assert back.shape == ref.shape
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-5)
    assert "".join(nib.aff2axcodes(back.affine)) == orientation
    assert back.get_data_dtype() == np.int16
    values = set(np.unique(np.asarray(back.dataobj)).tolist())
    assert 2 in values and values <= {0, 2}, values  # WT-only is SNFH (2); outside the brain crop 0


def test_decathlon_4d_input_uses_the_sites_channels_and_labels(make_msd, tmp_path):
    sy = make_msd(n=1, orientation="LPS")
    run = write_run(tmp_path / "run", [sy])
    site = load_site_config(sy)
    image = site.data_dir / "imagesTr" / "BRATS_000.nii.gz"
    case, _ = case_from_input(image, site)
    assert case.channels == {"t1n": 1, "t1c": 2, "t2w": 3, "t2f": 0}
    seg = predict_case(load_site_model(run, site, "cpu"), site, case, parse(DataConfig, DATA))
    assert seg.shape == nib.load(image).shape[:3]
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) == {0, 1}  # Decathlon: 1 is edema


def test_overlay_and_single_sequence_input(make_brats, tmp_path):
    sy = make_brats(n=1, orientation="LPS")
    run = write_run(tmp_path / "run", [sy], bias=(10.0, 10.0, 10.0))
    site = load_site_config(sy)
    flair = site.data_dir / "Case-000" / "Case-000-t2f.nii.gz"
    label = site.data_dir / "Case-000" / "Case-000-seg.nii.gz"
    res = predict_to_files(run / "final_shared.ckpt", sy, flair, tmp_path / "o" / "seg.nii.gz",
                           overlay=tmp_path / "o" / "seg.png", label=label, device="cpu")
    assert res.case_id == "Case-000" and res.federation == FED
    assert set(res.label_counts) == {0, 3}  # every region on: ET (3)
    assert res.overlay is not None and res.overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_local_state_names_the_file_and_the_federation(make_brats, tmp_path):
    sy = make_brats(n=1)
    run = write_run(tmp_path / "run", [])
    site = load_site_config(sy)
    with pytest.raises(FileNotFoundError) as err:
        load_site_model(run, site, "cpu")
    msg = str(err.value)
    assert str(site.state_dir / FED / "local_state.ckpt") in msg
    assert f"has not trained in federation {FED!r}" in msg


def test_fedavg_needs_no_local_state(make_brats, tmp_path):
    sy = make_brats(n=1)
    run = write_run(tmp_path / "run", [], policy="fedavg")
    sm = load_site_model(run, load_site_config(sy), "cpu")
    assert sm.policy == "fedavg" and sm.data == parse(DataConfig, DATA)


def test_cli_predict(make_brats, tmp_path, capsys):
    sy = make_brats(n=1)
    run = write_run(tmp_path / "run", [sy])
    case = sy.parent / "data" / "Case-000"
    out = tmp_path / "seg.nii.gz"
    base = ["predict", "--model", str(run), "--site-config", str(sy), "--output", str(out), "--device", "cpu"]
    assert main([*base, "--input", str(case), "--overlay", str(tmp_path / "seg.png")]) == 0
    assert "Case-000" in capsys.readouterr().out and out.is_file() and (tmp_path / "seg.png").is_file()
    assert main([*base, "--input", "Case-000"]) == 0  # a case id of the site's data
    capsys.readouterr()
    assert main([*base, "--input", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err
    assert main([*base, "--input", str(case), "--model", str(tmp_path)]) == 2
    assert "final_shared.ckpt" in capsys.readouterr().err
