"""Check a site's cases before training: readable, 3-D, on one grid, finite, mapped labels."""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from uharmony_fed import MODALITIES
from uharmony_fed.config import ConfigError
from uharmony_fed.data.errors import DataError, Problem
from uharmony_fed.data.layouts import Case, detect_layout, discover_cases
from uharmony_fed.data.site import BRATS_REGIONS, SiteConfig, load_site_config, with_layout_defaults

#: Largest spatial extent (voxels) a case may have unless configured otherwise.
DEFAULT_MAX_VOXELS = 16_000_000
#: Largest difference (mm, or unitless for the rotation part) between two affines
#: still counted as the same grid; NIfTI stores affines as float32.
AFFINE_TOL = 1e-3

# Common datalist keys, for guessing a mapping when a folder has no site.yaml.
_ALIASES = {
    "t1n": ("t1n", "t1", "T1", "t1w", "T1w"),
    "t1c": ("t1c", "t1ce", "T1CE", "t1gd", "T1GD", "T1gd", "T1c"),
    "t2w": ("t2w", "t2", "T2", "T2w"),
    "t2f": ("t2f", "flair", "FLAIR", "Flair"),
}


@dataclass
class CaseReport:
    """What :func:`check_data` found about one case.

    Attributes:
        case_id: the case's id.
        modalities: the product modalities whose files were read.
        shape: spatial shape of the first readable image (empty if none).
        spacing: voxel size in mm.
        orientation: axis codes from ``nibabel.aff2axcodes`` (e.g. ``"LPS"``).
        label_values: the distinct values in the label volume.
        problems: every reason the case cannot be used.
    """

    case_id: str
    modalities: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    spacing: tuple[float, ...] = ()
    orientation: str = ""
    label_values: tuple[int, ...] = ()
    problems: list[Problem] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """True when the case has no problem."""
        return not self.problems


@dataclass
class Report:
    """The result of :func:`check_data`.

    Attributes:
        data_dir: the folder checked.
        layout: the layout used.
        site: the site config the check used (given, read or inferred).
        cases: one entry per case.
        problems: problems that stop the whole folder from being read.
    """

    data_dir: Path
    layout: str
    site: SiteConfig | None
    cases: list[CaseReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the folder was read, has cases, and every case is usable."""
        return not self.problems and bool(self.cases) and all(c.usable for c in self.cases)


class _Reader:
    """Loads each file once per case (a Decathlon 4-D file serves every channel)."""

    def __init__(self) -> None:
        self.headers: dict[Path, nib.Nifti1Image | Problem] = {}
        self.arrays: dict[Path, np.ndarray | Problem] = {}

    def header(self, path: Path) -> nib.Nifti1Image | Problem:
        if path not in self.headers:
            self.headers[path] = self._header(path)
        return self.headers[path]

    @staticmethod
    def _header(path: Path) -> nib.Nifti1Image | Problem:
        if path.stat().st_size == 0:
            return Problem(str(path), "file is empty (0 bytes)", "copy or export the file again")
        try:
            return nib.load(path)  # type: ignore[return-value]
        except Exception as exc:  # nibabel raises many types for a bad header
            reason = f"not a readable NIfTI file ({type(exc).__name__}: {exc})"
            return Problem(str(path), reason, "export the image again as NIfTI (.nii.gz)")

    def array(self, path: Path, img: nib.Nifti1Image) -> np.ndarray | Problem:
        if path not in self.arrays:
            try:
                self.arrays[path] = np.asanyarray(img.dataobj)
            except (EOFError, zlib.error, OSError, ValueError) as exc:
                reason = f"truncated or corrupt, the voxel data cannot be read ({type(exc).__name__}: {exc})"
                fix = "copy or export the file again; the transfer was probably interrupted"
                self.arrays[path] = Problem(str(path), reason, fix)
        return self.arrays[path]


def _grid_problem(path: Path, shape: tuple, affine: np.ndarray, ref: tuple[str, tuple, np.ndarray]) -> Problem | None:
    name, ref_shape, ref_affine = ref
    diff = float(np.abs(affine - ref_affine).max())
    if shape == ref_shape and diff <= AFFINE_TOL * max(1.0, float(np.abs(ref_affine).max())):
        return None
    reason = (
        f"not on the same grid as {name}: expected shape {ref_shape}, found {shape}; "
        f"largest affine difference {diff:.3g}"
    )
    fix = f"resample or register it onto the {name} image's grid before training"
    return Problem(str(path), reason, fix)


def _inspect(case: Case, site: SiteConfig, max_voxels: int, require_label: bool) -> CaseReport:
    report = _inspect_files(case, site, max_voxels, require_label)
    # A Decathlon 4-D file serves every channel: report its problem once.
    report.problems = list(dict.fromkeys(report.problems))
    return report


def _inspect_files(case: Case, site: SiteConfig, max_voxels: int, require_label: bool) -> CaseReport:
    report = CaseReport(case.case_id)
    problems = report.problems
    reader = _Reader()
    ref: tuple[str, tuple, np.ndarray] | None = None
    found = []
    for m in MODALITIES:
        if m not in site.modalities:
            continue
        path = case.images.get(m)
        if path is None or not path.is_file():
            reason = f"declared modality {m!r} not found (expected {path})"
            fix = f"add the file, or list '{m}' under 'missing:' in site.yaml if the site has no {m}"
            problems.append(Problem(str(path or case.case_id), reason, fix))
            continue
        img = reader.header(path)
        if isinstance(img, Problem):
            problems.append(img)
            continue
        shape = tuple(int(s) for s in img.shape)
        channel = case.channels.get(m)
        if channel is not None:
            if len(shape) != 4 or channel >= shape[3]:
                reason = f"modality {m!r} is channel {channel}, but the image has shape {shape}"
                problems.append(Problem(str(path), reason, "fix the channel index in site.yaml or the 4-D image"))
                continue
            shape = shape[:3]
        elif len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3 or min(shape) < 2:
            reason = f"expected a 3-D volume, found shape {shape} ({'2-D' if len(shape) < 3 or min(shape) < 2 else f'{len(shape)}-D'})"
            problems.append(Problem(str(path), reason, "provide the whole 3-D volume, not a slice or a series"))
            continue
        if int(np.prod(shape)) > max_voxels:
            reason = f"{int(np.prod(shape)):,} voxels exceed the budget of {max_voxels:,}"
            fix = "crop or downsample the case, or raise data.max_voxels"
            problems.append(Problem(str(path), reason, fix))
            return report  # the other files are the same size; do not read them
        if ref is None:
            ref = (m, shape, img.affine)
            report.shape = shape
            report.spacing = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
            report.orientation = "".join(nib.aff2axcodes(img.affine))
        else:
            grid = _grid_problem(path, shape, img.affine, ref)
            if grid is not None:
                problems.append(grid)
                continue
        data = reader.array(path, img)
        if isinstance(data, Problem):
            if data not in problems:
                problems.append(data)
            continue
        if channel is not None:
            data = data[..., channel]
        data = data.astype(np.float32, copy=False)
        finite = np.isfinite(data)
        if not finite.all():
            reason = f"{int((~finite).sum())} NaN or Inf voxels in modality {m!r}"
            fix = "replace them with finite values (e.g. numpy.nan_to_num) and save again"
            problems.append(Problem(str(path), reason, fix))
            continue
        if not data.any():
            reason = f"modality {m!r} is all zeros"
            fix = f"export the sequence again, or list '{m}' under 'missing:' in site.yaml"
            problems.append(Problem(str(path), reason, fix))
            continue
        found.append(m)
    report.modalities = tuple(found)
    if case.label is None:
        if require_label:
            where = next(iter(case.images.values()), Path(case.case_id))
            reason = f"case {case.case_id!r} has no label file"
            problems.append(Problem(str(where.parent), reason, "add its segmentation (e.g. CASE-seg.nii.gz) or remove the case"))
        return report
    if not case.label.is_file():
        problems.append(Problem(str(case.label), "label file not found", "add the segmentation or fix its path"))
        return report
    img = reader.header(case.label)
    if isinstance(img, Problem):
        problems.append(img)
        return report
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 2:
        reason = f"expected a 3-D label volume, found shape {shape}"
        problems.append(Problem(str(case.label), reason, "provide the whole 3-D segmentation"))
        return report
    if ref is not None:
        grid = _grid_problem(case.label, shape, img.affine, ref)
        if grid is not None:
            problems.append(grid)
            return report
    data = reader.array(case.label, img)
    if isinstance(data, Problem):
        problems.append(data)
        return report
    values = np.unique(data)
    if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
        reason = "label volume holds non-integer values"
        problems.append(Problem(str(case.label), reason, "save the segmentation with integer label values"))
        return report
    report.label_values = tuple(int(v) for v in values)
    unmapped = sorted(set(report.label_values) - {0} - set(site.label_values))
    if unmapped:
        reason = f"label values {unmapped} are not mapped by the site's regions (mapped: {list(site.label_values)})"
        fix = "add them under 'regions:' in site.yaml, or correct the label file"
        problems.append(Problem(str(case.label), reason, fix))
    return report


def check_case(
    case: Case, site: SiteConfig, max_voxels: int = DEFAULT_MAX_VOXELS, require_label: bool = True
) -> list[Problem]:
    """Every reason one case cannot be used for training.

    Checks: each declared modality's file exists, is not empty, has a readable
    NIfTI header and complete voxel data, is 3-D, fits ``max_voxels``, is on the
    same grid (shape and affine) as the others, holds no NaN/Inf and is not all
    zero; the label exists (if required), is on that grid, holds integers, and
    every non-zero value is mapped by ``site.regions``.

    Args:
        case: the case from :func:`discover_cases`.
        site: the site config whose mapping applies.
        max_voxels: the largest spatial size allowed.
        require_label: whether a case without a label is a problem.

    Returns:
        The problems found, empty when the case is usable.
    """
    return _inspect(case, site, max_voxels, require_label).problems


def _guess_site(data_dir: Path, layout: str) -> SiteConfig:
    """A site config for a bare folder, from the layout's convention."""
    layout = layout if layout != "auto" else detect_layout(data_dir)
    if layout == "msd":
        # dataset.json names its channels; a folder lacking a sequence has fewer.
        try:
            names = json.loads((data_dir / "dataset.json").read_text()).get("modality", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            names = {}
        lower = {m: {a.lower() for a in keys} for m, keys in _ALIASES.items()}
        modalities = {m: str(i) for i, n in names.items() for m in MODALITIES if str(n).lower() in lower[m]}
        if modalities:
            missing = tuple(m for m in MODALITIES if m not in modalities)
            site = SiteConfig(data_dir=data_dir, name=data_dir.name, modalities=modalities, missing=missing)
            return with_layout_defaults(site, layout)
    if layout != "datalist":
        return with_layout_defaults(SiteConfig(data_dir=data_dir, name=data_dir.name), layout)
    path = data_dir if data_dir.is_file() else data_dir / "datalist.json"
    try:
        first = json.loads(path.read_text())["training"][0]["image"]
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        reason = f"cannot read the first 'training' entry ({exc!r})"
        raise DataError(path, reason, "write a datalist.json as described in uharmony_fed.data.layouts") from exc
    if not isinstance(first, dict):
        reason = "cannot guess which image is which modality without a site.yaml"
        raise DataError(path, reason, "write a site.yaml next to the data with a 'modalities' mapping")
    modalities = {m: next(k for k in keys if k in first) for m, keys in _ALIASES.items() if any(k in first for k in keys)}
    missing = tuple(m for m in MODALITIES if m not in modalities)
    site = SiteConfig(data_dir=data_dir, name=path.parent.name, modalities=modalities, missing=missing)
    regions = {r: list(v) for r, v in BRATS_REGIONS.items()}
    return dataclasses.replace(site, layout="datalist", regions=regions)


def check_data(
    data_dir: str | Path,
    layout: str = "auto",
    site: SiteConfig | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    require_label: bool = True,
) -> Report:
    """Check every case of a data folder and describe it.

    Without ``site``, ``DATA/site.yaml`` is used if present; otherwise the mapping is
    inferred from the layout: BraTS or Decathlon Task01 conventions (a Decathlon
    ``dataset.json``'s channel names decide its modalities); a datalist's image keys
    are matched against common names (T1, T1CE, T2, FLAIR...) and BraTS labels are
    assumed.

    Args:
        data_dir: the folder (or datalist JSON) to check.
        layout: ``auto``, ``brats``, ``msd`` or ``datalist``.
        site: the site config to check against.
        max_voxels: the largest case size allowed.
        require_label: whether a case without a label is a problem.

    Returns:
        The :class:`Report`; ``report.ok`` tells whether every case is usable.
    """
    data_dir = Path(data_dir)
    try:
        if site is None and (data_dir / "site.yaml").is_file():
            site = load_site_config(data_dir / "site.yaml")
        elif site is None:
            site = _guess_site(data_dir, layout)
        if layout != "auto" and site.layout != layout:
            site = dataclasses.replace(site, layout=layout)  # type: ignore[arg-type]
        cases = discover_cases(site)
    except DataError as exc:
        return Report(data_dir, layout, site, problems=[Problem(exc.file, exc.reason, exc.fix)])
    except ConfigError as exc:
        return Report(data_dir, layout, site, problems=[Problem(exc.where, str(exc), "correct site.yaml")])
    report = Report(data_dir, site.layout, site)
    if not cases:
        report.problems.append(Problem(str(data_dir), f"no cases found ({site.layout} layout)", "check data_dir and layout"))
    report.cases = [_inspect(c, site, max_voxels, require_label) for c in cases]
    return report


def format_report(report: Report) -> str:
    """A plain-text table of a :class:`Report`, problems indented under their case."""
    usable = sum(c.usable for c in report.cases)
    name = report.site.name if report.site else "?"
    lines = [f"{report.data_dir} (site {name}, layout {report.layout}): {len(report.cases)} cases, {usable} usable"]
    lines += [f"  ERROR {p}" for p in report.problems]
    width = max([len(c.case_id) for c in report.cases] + [4])
    if report.cases:
        lines.append(f"  {'case':<{width}}  {'shape':<15} {'spacing (mm)':<18} {'orient':<6} {'modalities':<19} labels")
    for c in report.cases:
        shape = "x".join(map(str, c.shape)) or "-"
        spacing = "x".join(f"{s:g}" for s in c.spacing) or "-"
        mods = ",".join(c.modalities) or "-"
        labels = ",".join(map(str, c.label_values)) or "-"
        status = "ok" if c.usable else f"{len(c.problems)} problem(s)"
        lines.append(f"  {c.case_id:<{width}}  {shape:<15} {spacing:<18} {c.orientation or '-':<6} {mods:<19} {labels:<8} {status}")
        lines += [f"      - {p}" for p in c.problems]
    lines.append("OK: every case is usable." if report.ok else "NOT OK: fix the problems above.")
    return "\n".join(lines)
