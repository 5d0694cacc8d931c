"""The ``uharmony-fed`` command, in process: help, plan, make-demo, check-data and config errors."""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uharmony_fed.cli import COMMANDS, build_parser, main
from uharmony_fed.fedconfig import load_config
from uharmony_fed.policy import POLICIES

ROOT = Path(__file__).resolve().parents[1]
PLAN_KEYS = {"shared_tensors", "shared_params", "local_tensors", "local_params", "bytes_per_round"}


def subcommands() -> list[str]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_every_subcommand_has_a_function():
    assert subcommands() == sorted(COMMANDS)


@pytest.mark.parametrize("name", subcommands())
def test_help_exits_0(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"usage: uharmony-fed {name}" in capsys.readouterr().out


def test_plan_json(capsys):
    assert main(["plan", "--json", "--config", str(ROOT / "configs" / "smoke.yaml")]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table) == set(POLICIES)
    for name, row in table.items():
        assert PLAN_KEYS <= set(row), name
    assert 0 < table["uharmony"]["bytes_per_round"] <= table["fedavg"]["bytes_per_round"]
    assert table["uharmony"]["local_tensors"] > 0 == table["fedavg"]["local_tensors"]


def test_make_demo_then_check_data_ok(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["make-demo", "--out", str(out), "--sites", "1", "--cases", "1"]) == 0
    site_yaml = out / "hospitalA" / "site.yaml"
    assert str(site_yaml) in capsys.readouterr().out
    assert main(["check-data", "--data", str(out / "hospitalA" / "data"), "--site-config", str(site_yaml)]) == 0
    assert "OK: every case is usable." in capsys.readouterr().out


def test_make_demo_joiner_passes_check_data_with_its_extra_class(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["make-demo", "--out", str(out), "--sites", "1", "--cases", "1", "--joiner"]) == 0
    site_yaml = out / "hospitalNew" / "site.yaml"
    assert str(site_yaml) in capsys.readouterr().out
    assert "extra_classes" in site_yaml.read_text()
    assert main(["check-data", "--data", str(out / "hospitalNew" / "data"), "--site-config", str(site_yaml)]) == 0
    assert "OK: every case is usable." in capsys.readouterr().out


# ------------------------------------------------------------------------ check-data, broken


def _case(site_yaml: Path) -> Path:
    return site_yaml.parent / "data" / "Case-000"


def _truncate(folder: Path) -> Path:
    f = folder / "Case-000-t1c.nii.gz"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    return f


def _empty(folder: Path) -> Path:
    f = folder / "Case-000-t1n.nii.gz"
    f.write_bytes(b"")
    return f


def _rewrite(folder: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    f = folder / name
    img = nib.load(f)
    nib.save(nib.Nifti1Image(change(np.asarray(img.dataobj)), img.affine), f)
    return f


def _nan(folder: Path) -> Path:
    def add_nan(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        a[8, 8, 8] = np.nan
        return a

    return _rewrite(folder, "Case-000-t2w.nii.gz", add_nan)


def _unmapped(folder: Path) -> Path:
    def add_4(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[0, 0, 0] = 4
        return a

    return _rewrite(folder, "Case-000-seg.nii.gz", add_4)


def _other_grid(folder: Path) -> Path:
    return _rewrite(folder, "Case-000-t2f.nii.gz", lambda a: a[:, :, :-1])


def _flat(folder: Path) -> Path:
    return _rewrite(folder, "Case-000-t1n.nii.gz", lambda a: a[:, :, 8])


def _missing(folder: Path) -> Path:
    f = folder / "Case-000-t1c.nii.gz"
    f.unlink()
    return f


BROKEN = {
    "truncated": (_truncate, "truncated or corrupt"),
    "zero-byte": (_empty, "file is empty"),
    "nan": (_nan, "NaN or Inf"),
    "unmapped-label": (_unmapped, "label values [4] are not mapped"),
    "grids-disagree": (_other_grid, "not on the same grid"),
    "2-d": (_flat, "expected a 3-D volume"),
    "missing-modality": (_missing, "declared modality 't1c' not found"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_check_data_names_the_file_and_the_fix(kind, make_brats, capsys):
    site_yaml = make_brats(n=1)
    breaker, reason = BROKEN[kind]
    bad = breaker(_case(site_yaml))
    if kind == "truncated":  # the header still reads; the voxel data does not
        with pytest.raises((EOFError, OSError)), gzip.open(bad) as fh:
            fh.read()
    code = main(["check-data", "--data", str(site_yaml.parent / "data"), "--site-config", str(site_yaml)])
    out, err = capsys.readouterr()
    assert code == 1
    line = next(ln for ln in out.splitlines() if str(bad) in ln)
    assert reason in line and "Fix:" in line
    assert "NOT OK" in out
    assert "Traceback" not in out + err


def test_check_data_missing_folder_is_reported(tmp_path, capsys):
    assert main(["check-data", "--data", str(tmp_path / "nowhere")]) == 1
    out, err = capsys.readouterr()
    assert "data folder not found" in out and "Traceback" not in out + err


# ------------------------------------------------------------------------ config errors


def _one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_unknown_config_key_suggests_the_right_one(tmp_path, capsys):
    cfg = tmp_path / "fed.yaml"
    cfg.write_text("federation: {polcy: fedavg}\n")
    assert main(["plan", "--config", str(cfg)]) == 2
    line = _one_line_error(capsys)
    assert "federation.polcy" in line and "did you mean 'policy'" in line


def test_wrong_config_type(tmp_path, capsys):
    cfg = tmp_path / "fed.yaml"
    cfg.write_text('federation: {rounds: "three"}\n')
    assert main(["plan", "--config", str(cfg)]) == 2
    line = _one_line_error(capsys)
    assert "federation.rounds" in line and "integer" in line


def test_missing_config_file(tmp_path, capsys):
    assert main(["plan", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml" in _one_line_error(capsys)


def test_shipped_configs():
    assert load_config(ROOT / "configs" / "demo.yaml") == load_config()
    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    assert smoke.name == "smoke" and smoke.federation.rounds == 2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["make-demo", "--sites", "three"], "argument --sites: invalid int value: 'three'"),
        (["simulat"], "argument COMMAND: invalid choice: 'simulat'"),
        (["check-data"], "the following arguments are required: --data"),
        (["check-data", "--data", "x", "--layout", "bids"], "argument --layout: invalid choice: 'bids'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, expected, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1
