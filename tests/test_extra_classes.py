"""A class only one site annotates (the joining hospital's resection cavity, RC)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from uharmony_fed import REGIONS
from uharmony_fed.data import load_site_config
from uharmony_fed.data.layouts import discover_cases
from uharmony_fed.data.site import SiteConfig, regions_to_site_labels, site_label_to_regions
from uharmony_fed.fed.site_runtime import SiteRuntime
from uharmony_fed.fed.wire import RoundSpec
from uharmony_fed.fedconfig import load_config

REPO = Path(__file__).resolve().parents[1]
BRATS = {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}


def test_extra_class_config_is_checked() -> None:
    ok = SiteConfig(data_dir=Path("."), regions=BRATS, extra_classes={"RC": [4]})
    assert ok.classes == (*REGIONS, "RC") and ok.label_values == (1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"label values \[3\] already belong"):
        SiteConfig(data_dir=Path("."), regions=BRATS, extra_classes={"RC": [3]})
    with pytest.raises(ValueError, match="not one of the regions"):
        SiteConfig(data_dir=Path("."), regions=BRATS, extra_classes={"WT": [4]})
    with pytest.raises(ValueError, match="positive label values"):
        SiteConfig(data_dir=Path("."), regions=BRATS, extra_classes={"RC": []})


def test_extra_class_masks_and_labels_round_trip() -> None:
    site = SiteConfig(data_dir=Path("."), regions=BRATS, extra_classes={"RC": [4]})
    label = np.zeros((6, 6, 6), dtype=np.int64)
    label[1, 1, 1], label[2, 2, 2], label[3, 3, 3], label[4, 4, 4] = 1, 2, 3, 4
    masks, annotated = site_label_to_regions(label, site)
    assert masks.shape == (4, 6, 6, 6) and annotated.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert masks[3].sum() == 1 and masks[3][4, 4, 4] == 1 and masks[2][4, 4, 4] == 0  # RC is not tumour
    np.testing.assert_array_equal(regions_to_site_labels(masks, site), label)
    # A voxel the model calls both tumour and cavity stays tumour; a 3-channel output writes no RC.
    both = masks.copy()
    both[3, 2, 2, 2] = 1
    assert regions_to_site_labels(both, site)[2, 2, 2] == 2
    assert (regions_to_site_labels(masks[:3], site) == 4).sum() == 0


@pytest.fixture(scope="module")
def joiner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uharmony_fed.demo import make_demo

    root = tmp_path_factory.mktemp("joiner")
    return make_demo(root, sites=1, cases=3, seed=0, spacing_mm=6.0, log=None, joiner=True)[-1]


def _runtime(site_yaml: Path, state: Path, policy: str) -> SiteRuntime:
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "data": {"spacing": [6.0, 6.0, 6.0]}, "train": {"amp": False, "device": "cpu", "local_steps": 2},
        "federation": {"policy": policy}})
    runtime = SiteRuntime(load_site_config(site_yaml), RoundSpec.from_fed(cfg, 1))
    runtime.state_path = state / "local_state.ckpt"
    return runtime


def test_demo_joiner_annotates_a_resection_cavity(joiner: Path) -> None:
    site = load_site_config(joiner)
    assert site.extra_classes == {"RC": [4]}
    seg = nib.load(discover_cases(site)[0].label)
    assert (np.asarray(seg.dataobj) == 4).sum() > 0


def test_site_with_extra_class_trains_its_own_output_and_shares_the_same_keys(joiner: Path, tmp_path: Path) -> None:
    runtime = _runtime(joiner, tmp_path, "uharmony")
    head_w = runtime.model.head.weight
    assert head_w.shape[1] == len(REGIONS) + 1
    assert all(not k.startswith("head.") for k in runtime.shared_keys)
    before = head_w[:, 3].detach().clone()
    metrics = runtime.train_round(runtime.spec)
    assert np.isfinite(metrics["train-loss"])
    assert not torch.equal(before, runtime.model.head.weight[:, 3].detach())  # RC's output learns
    out = runtime.evaluate(runtime.spec)
    assert "dice-RC" in out and 0.0 <= out["dice-RC"] <= 1.0
    regional = [out[f"dice-{r}"] for r in REGIONS]
    assert out["dice-mean"] == pytest.approx(float(np.mean(regional)))  # RC stays out of the shared mean


def test_extra_class_with_a_shared_head_is_refused(joiner: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need a site-local head.*policy 'fedavg'"):
        _runtime(joiner, tmp_path, "fedavg")


def test_predict_writes_the_extra_class_label_value(joiner: Path, tmp_path: Path) -> None:
    """The site's own head drives its extra output all the way to its label value on disk."""
    from uharmony_fed.checkpoint import save_payload
    from uharmony_fed.fedconfig import config_to_dict
    from uharmony_fed.predict import predict_case

    site = load_site_config(joiner)
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides={
        "name": "extra-class-run", "data": {"spacing": [6.0, 6.0, 6.0]}, "train": {"amp": False, "device": "cpu"}})
    runtime = SiteRuntime(site, RoundSpec.from_fed(cfg, 1))
    with torch.no_grad():  # regions certainly off, RC certainly on: every head voxel becomes RC
        runtime.model.head.bias[:, : len(REGIONS)] = -50.0
        runtime.model.head.bias[:, len(REGIONS)] = 50.0
    runtime.save_state(1)
    save_payload(tmp_path / "final_shared.ckpt", {"arrays": runtime.shared_tensors(), "policy": "uharmony",
                                                  "model": config_to_dict(cfg)["model"], "name": cfg.name})
    case = discover_cases(site)[0]
    seg = np.asarray(predict_case(tmp_path, site, case, cfg.data, device="cpu").dataobj)
    assert seg.shape == nib.load(case.images["t2f"]).shape
    assert set(np.unique(seg).tolist()) <= {0, 4} and (seg == 4).mean() > 0.9
