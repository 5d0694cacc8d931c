"""Opt-in exports and the universal model: what an export holds, the gate, prediction without a site id."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from uharmony_fed.checkpoint import load_payload, save_payload
from uharmony_fed.cli import main
from uharmony_fed.config import to_dict
from uharmony_fed.data import DataConfig, discover_cases, load_case_for_inference, load_site_config
from uharmony_fed.fedconfig import config_to_dict, load_config
from uharmony_fed.model import ModelConfig, build_model, param_roles
from uharmony_fed.policy import canonical_state, get_policy, split_keys
from uharmony_fed.predict import load_site_model
from uharmony_fed.universal import (
    DomainDescriptor,
    UniversalModel,
    fallback_radii,
    first_norm_statistics,
    gate_distances,
    gate_mahalanobis,
    gate_weights,
    load_export,
    shrunk_variances,
)

FED = "unifed"
SITES = ("hospitalA", "hospitalB", "hospitalC")
TINY = ModelConfig(features=(4, 8, 16), head_channels=4)
DATA = {"spacing": [6.0, 6.0, 6.0], "roi_size": [16, 16, 16], "cache": "none"}


def _site_copy(tiny_demo: Path, site: str, dest: Path) -> Path:
    """The demo site's site.yaml, reading its data in place but keeping state under ``dest``."""
    doc = yaml.safe_load((tiny_demo / site / "site.yaml").read_text())
    doc["data_dir"] = str((tiny_demo / site / "data").resolve())
    doc["state_dir"] = str(dest / site / "state")
    (dest / site).mkdir(parents=True, exist_ok=True)
    path = dest / site / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def fed_run(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A finished uharmony run over the tiny demo, each site with its own (random) local part."""
    root = tmp_path_factory.mktemp("unirun")
    run = root / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = build_model(TINY)
    shared, local = split_keys(model, get_policy("uharmony"))
    canon = canonical_state(model)
    save_payload(run / "final_shared.ckpt", {"arrays": {k: canon[k].clone() for k in shared}, "policy": "uharmony",
                                             "model": to_dict(TINY), "rounds": 1, "name": FED})
    cfg = load_config(overrides={"name": FED, "data": DATA})
    (run / "fed.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    sites = {}
    for i, name in enumerate(SITES):
        sites[name] = sy = _site_copy(tiny_demo, name, root)
        gen = torch.Generator().manual_seed(100 + i)
        own = {k: canon[k] + 0.1 * torch.randn(canon[k].shape, generator=gen) for k in local}
        save_payload(load_site_config(sy).state_dir / FED / "local_state.ckpt",
                     {"round": 1, "step": 2, "local": own, "optimizer": None})
    return run, sites


@pytest.fixture(scope="module")
def exports(fed_run, tmp_path_factory) -> list[Path]:
    run, sites = fed_run
    out = tmp_path_factory.mktemp("exports")
    paths = []
    for name, sy in sites.items():
        assert main(["export", "--site-config", str(sy), "--model", str(run), "--out", str(out / f"{name}.pt")]) == 0
        paths.append(out / f"{name}.pt")
    return paths


@pytest.fixture(scope="module")
def universal(fed_run, exports, tmp_path_factory) -> Path:
    run, _ = fed_run
    out = tmp_path_factory.mktemp("universal") / "universal.pt"
    assert main(["assemble", "--model", str(run), "--exports", *map(str, exports), "--out", str(out)]) == 0
    return out


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def test_export_holds_only_restore_and_head(fed_run, exports, tiny_demo) -> None:
    run, sites = fed_run
    model = build_model(TINY)
    roles = param_roles(model)
    expected = {k for k in canonical_state(model) if roles[k] in ("restore", "head")}
    case_ids = [c.case_id for s in SITES for c in discover_cases(load_site_config(tiny_demo / s / "site.yaml"))]
    for name, path in zip(SITES, exports):
        doc = load_export(path)
        assert set(doc) == {"kind", "version", "site", "federation", "policy", "shared_digest", "params", "descriptor"}
        assert set(doc["params"]) == expected
        assert set(doc["descriptor"]) == {"mean", "var", "count"}
        assert doc["descriptor"]["count"] == 2  # the training split of 3 cases
        # The site's own local part is what left, not the shared starting point.
        state = load_payload(load_site_config(sites[name]).state_dir / FED / "local_state.ckpt")
        for k, v in state["local"].items():
            assert torch.equal(doc["params"][k], v)
        for s in _strings(load_payload(path)):
            for forbidden in ("/", "\\", ".nii", ".gz", "data", "state", *case_ids):
                assert forbidden not in s, f"{forbidden!r} in export string {s!r}"
        tensors = [v for v in doc["params"].values()] + [doc["descriptor"]["mean"], doc["descriptor"]["var"]]
        assert sum(t.numel() for t in tensors) < 2000  # tiny: no image could hide in it


def test_assembled_model_is_each_site_model_under_a_one_hot_gate(fed_run, universal) -> None:
    run, sites = fed_run
    um = UniversalModel.load(universal)
    assert um.site_names == list(SITES)
    assert um.data == DataConfig(spacing=(6.0, 6.0, 6.0), roi_size=(16, 16, 16), cache="none")
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        out = um(x)
        gate = um.gate(x)
        assert out.shape == (2, 3, 16, 16, 16) and torch.isfinite(out).all()
        assert gate.shape == (2, 3) and torch.allclose(gate.sum(1), torch.ones(2))
        for s, name in enumerate(SITES):
            ref = load_site_model(run, load_site_config(sites[name]), "cpu").model(x)
            one_hot = torch.nn.functional.one_hot(torch.tensor(s), 3).float()
            assert torch.allclose(um(x, gate=one_hot), ref, atol=1e-5)
        # A mixed gate is the mix of the sites' logits.
        w = torch.tensor([0.2, 0.5, 0.3])
        mix = sum(w[s] * um.site_logits(x, s) for s in range(3))
        assert torch.allclose(um(x, gate=w), mix, atol=1e-5)


def test_assemble_refuses_an_export_of_another_run(fed_run, exports, tmp_path) -> None:
    run, _ = fed_run
    other = tmp_path / "other"
    other.mkdir()
    payload = load_payload(run / "final_shared.ckpt")
    payload["arrays"] = {k: v + 1.0 for k, v in payload["arrays"].items()}
    save_payload(other / "final_shared.ckpt", payload)
    assert main(["assemble", "--model", str(other), "--exports", str(exports[0]), "--out",
                 str(tmp_path / "u.pt")]) == 2
    assert not (tmp_path / "u.pt").exists()


def _demo_features(tiny_demo: Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = DataConfig(**{**DATA, "spacing": (6.0, 6.0, 6.0), "roi_size": (16, 16, 16)})
    feats = {}
    for name in SITES:
        site = load_site_config(tiny_demo / name / "site.yaml")
        images = [load_case_for_inference(c, site, cfg).image.as_tensor()[None] for c in discover_cases(site)]
        feats[name] = torch.cat([first_norm_statistics(net, img) for img in images])
    return feats


def test_gate_picks_the_site_of_a_held_out_case(tiny_demo: Path) -> None:
    """Leave one case out: descriptors from the others, the gate must name the held-out case's site.

    A freshly initialized network with the same shared weights for every site: the
    first layer's statistics are scanner-dependent before any training.
    """
    torch.manual_seed(0)
    feats = _demo_features(tiny_demo, build_model(TINY))
    hits, trials = 0, 0
    for name in SITES:
        for i in range(feats[name].shape[0]):
            descs = [DomainDescriptor.from_features(
                torch.cat([feats[s][:i], feats[s][i + 1:]]) if s == name else feats[s]) for s in SITES]
            d = gate_distances(feats[name][i : i + 1], torch.stack([x.mean for x in descs]), shrunk_variances(descs))
            hits += SITES[int(d.argmin())] == name
            trials += 1
    assert trials == 9
    assert hits / trials >= 0.8, f"gate accuracy {hits}/{trials} (chance 1/3)"


def _synthetic_sites() -> tuple[list[DomainDescriptor], torch.Tensor, torch.Tensor]:
    """Three sites of 8 cases in 16 dimensions, 10 units apart, unit spread."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([0.0, 10.0, 20.0])[:, None].expand(3, 16)
    descs = [DomainDescriptor.from_features(c + torch.randn(8, 16, generator=gen)) for c in centers]
    variances = shrunk_variances(descs)
    return descs, torch.stack([d.mean for d in descs]), variances


def test_gate_falls_back_to_uniform_far_from_every_site_and_stays_sharp_near_one() -> None:
    descs, means, variances = _synthetic_sites()
    radii = fallback_radii(descs, variances)
    assert radii.shape == (3,) and bool((radii > 10.0).all()) and bool((radii < 25.0).all())

    def weights(f: torch.Tensor, fallback: bool = True) -> torch.Tensor:
        return gate_weights(gate_distances(f, means, variances), gate_mahalanobis(f, means, variances),
                            radii if fallback else None)

    gen = torch.Generator().manual_seed(1)
    near = means[1] + 0.5 * torch.randn(4, 16, generator=gen)  # unseen cases of site 1
    assert torch.equal(weights(near), weights(near, fallback=False))
    assert bool((weights(near)[:, 1] > 0.99).all())

    far = means[0] - 200.0 + torch.randn(4, 16, generator=gen)  # nearest to site 0, far from all
    assert bool((weights(far, fallback=False)[:, 0] > 0.99).all())  # the plain softmax: one site
    w = weights(far)
    assert torch.allclose(w.sum(-1), torch.ones(4))
    assert bool(((w - 1 / 3).abs() < 0.02).all()), w

    # In between, the farther the case, the flatter the gate.
    steps = torch.stack([means[0] - t * torch.ones(16) for t in (5.0, 20.0, 80.0)])
    assert torch.all(weights(steps)[:, 0].diff() < 0)


def test_a_universal_file_without_radii_still_loads(universal, tmp_path) -> None:
    doc = load_payload(universal)
    radii = torch.tensor(doc["gate"].pop("radii"))
    save_payload(tmp_path / "old.pt", doc)
    assert torch.allclose(UniversalModel.load(tmp_path / "old.pt").gate_radii, radii)


def test_exported_gate_picks_each_sites_validation_case(fed_run, universal, tiny_demo) -> None:
    """The assembled gate, on each site's held-out validation case (not in its descriptor)."""
    from uharmony_fed.data import split_cases

    _, sites = fed_run
    um = UniversalModel.load(universal)
    picked = {}
    for name, sy in sites.items():
        site = load_site_config(sy)
        _, val = split_cases(discover_cases(site), site.val_fraction, 0)
        assert len(val) == 1
        image = load_case_for_inference(val[0], site, um.data).image.as_tensor()[None]
        picked[name] = um.site_names[int(um.gate(image)[0].argmax())]
    assert picked == {s: s for s in SITES}


def test_predict_universal_on_an_unseen_site_keeps_shape_and_affine(universal, make_brats, tmp_path) -> None:
    sy = make_brats(n=1, shape=(20, 14, 12), spacing=(1.5, 2.5, 4.0), orientation="LPS", name="newcomer")
    case = load_site_config(sy).data_dir / "Case-000"
    out = tmp_path / "seg.nii.gz"
    rc = main(["predict", "--universal", "--model", str(universal), "--site-config", str(sy), "--input", str(case),
               "--output", str(out), "--device", "cpu", "--overlay", str(tmp_path / "o.png")])
    assert rc == 0
    src = nib.load(case / "Case-000-t1n.nii.gz")
    seg = nib.load(out)
    assert seg.shape == src.shape
    assert np.allclose(seg.affine, src.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}
    assert (tmp_path / "o.png").is_file()


def test_predict_universal_rejects_a_site_model_file(fed_run, make_brats, tmp_path) -> None:
    run, _ = fed_run
    sy = make_brats(n=1)
    rc = main(["predict", "--universal", "--model", str(run / "final_shared.ckpt"), "--site-config", str(sy),
               "--input", str(load_site_config(sy).data_dir / "Case-000"), "--output", str(tmp_path / "s.nii.gz")])
    assert rc == 2


def test_plain_predict_points_a_universal_model_to_the_flag(universal, make_brats, tmp_path, capsys) -> None:
    sy = make_brats(n=1)
    rc = main(["predict", "--model", str(universal), "--site-config", str(sy),
               "--input", str(load_site_config(sy).data_dir / "Case-000"), "--output", str(tmp_path / "s.nii.gz")])
    assert rc == 2 and "--universal" in capsys.readouterr().err


def test_universal_model_loads_and_predicts_without_flower(universal) -> None:
    code = (
        "import sys, torch\n"
        "sys.modules['flwr'] = None  # any import of Flower now fails\n"
        "from uharmony_fed.universal import UniversalModel\n"
        f"um = UniversalModel.load({str(universal)!r}, 'cpu')\n"
        "out = um(torch.randn(1, 4, 16, 16, 16))\n"
        "assert out.shape == (1, 3, 16, 16, 16)\n"
        "assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules if sys.modules[m] is not None)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_demo_joiner_is_an_unseen_scanner_and_leaves_the_others_unchanged(universal, tmp_path) -> None:
    from uharmony_fed.demo import JOINER_NAME, make_demo

    make_demo(tmp_path / "plain", sites=1, cases=1, seed=0, spacing_mm=8.0, log=None)
    paths = make_demo(tmp_path / "join", sites=1, cases=1, seed=0, spacing_mm=8.0, log=None, joiner=True)
    assert [p.parent.name for p in paths] == ["hospitalA", JOINER_NAME]
    before = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    after = sorted(p.relative_to(tmp_path / "join")
                   for p in (tmp_path / "join" / "hospitalA").rglob("*") if p.is_file())
    assert before == after
    for rel in before:
        assert (tmp_path / "plain" / rel).read_bytes() == (tmp_path / "join" / rel).read_bytes(), rel
    site = load_site_config(paths[-1])
    assert site.present == ("t1c", "t2f")
    case = discover_cases(site)[0]
    out = tmp_path / "new-seg.nii.gz"
    assert main(["predict", "--universal", "--model", str(universal), "--site-config", str(paths[-1]),
                 "--input", str(site.data_dir / case.case_id), "--output", str(out), "--device", "cpu"]) == 0
    src, seg = nib.load(case.images["t2f"]), nib.load(out)
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)


def test_export_by_site_name_matches_export_by_site_config(fed_run, exports, tmp_path, capsys) -> None:
    """``uharmony-fed export --site S`` finds S's site.yaml through the config, as ``train --site`` does."""
    run, sites = fed_run
    fed_yaml = tmp_path / "fed.yaml"
    fed_yaml.write_text(yaml.safe_dump({"name": FED, "data_root": str(sites["hospitalB"].parents[1]),
                                        "sites": list(SITES)}))
    out = tmp_path / "b.pt"
    assert main(["export", "--site", "hospitalB", "--config", str(fed_yaml), "--model", str(run),
                 "--out", str(out)]) == 0
    by_name, by_config = load_export(out), load_export(exports[SITES.index("hospitalB")])
    assert by_name["site"] == "hospitalB"
    assert all(torch.equal(by_name["params"][k], by_config["params"][k]) for k in by_config["params"])
    assert main(["export", "--model", str(run)]) == 2
    assert "give --site NAME" in capsys.readouterr().err
