"""Find the cases of a site's data folder as they come: BraTS, Decathlon or datalist."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from uharmony_fed.data.errors import DataError
from uharmony_fed.data.site import SiteConfig, with_layout_defaults

_NII = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One case's files.

    Attributes:
        case_id: the case's name (folder or file stem).
        images: product modality -> the file holding it. A declared (not missing)
            modality always has an entry, even when its file does not exist, so
            validation can name the file it expected.
        channels: product modality -> channel index inside a 4-D file (Decathlon, or
            a datalist with one 4-D image); empty for one 3-D file per modality.
        label: the label file, or ``None`` when the case has none.
    """

    case_id: str
    images: dict[str, Path]
    label: Path | None = None
    channels: dict[str, int] = field(default_factory=dict)


def _strip_nii(name: str) -> str:
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _find(folder: Path, stem: str) -> Path:
    """``folder/stem.nii.gz`` or ``.nii``, whichever exists (``.nii.gz`` if neither)."""
    for ext in _NII:
        if (folder / f"{stem}{ext}").exists():
            return folder / f"{stem}{ext}"
    return folder / f"{stem}.nii.gz"


def _is_brats_case(folder: Path) -> bool:
    return any(
        _strip_nii(p.name).startswith(f"{folder.name}-") or _strip_nii(p.name).startswith(f"{folder.name}_")
        for p in folder.iterdir()
        if p.name.endswith(_NII)
    )


def detect_layout(data_dir: str | Path) -> str:
    """Tell which layout a data folder uses.

    ``dataset.json`` with ``imagesTr/`` is the Decathlon layout; ``datalist.json`` (or
    a ``.json`` file given directly) a MONAI datalist; sub-folders holding
    ``CASE-*.nii.gz`` files the BraTS layout.

    Args:
        data_dir: the site's data folder (or its datalist JSON).

    Returns:
        ``"msd"``, ``"datalist"`` or ``"brats"``.

    Raises:
        DataError: the folder does not exist or matches no layout.
    """
    data_dir = Path(data_dir)
    if data_dir.is_file() and data_dir.suffix == ".json":
        return "datalist"
    if not data_dir.is_dir():
        raise DataError(data_dir, "data folder not found", "point data_dir in site.yaml (or --data) at the folder holding the cases")
    if (data_dir / "dataset.json").is_file() and (data_dir / "imagesTr").is_dir():
        return "msd"
    if (data_dir / "datalist.json").is_file():
        return "datalist"
    if any(p.is_dir() and _is_brats_case(p) for p in data_dir.iterdir()):
        return "brats"
    reason = (
        "no known layout found (expected CASE/CASE-t1n.nii.gz folders (BraTS), "
        "dataset.json + imagesTr/ (Decathlon) or datalist.json)"
    )
    raise DataError(data_dir, reason, "arrange the data in one of these layouts or write a datalist.json")


def _brats_cases(site: SiteConfig) -> list[Case]:
    cases = []
    for folder in sorted(p for p in site.data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not _is_brats_case(folder):
            continue
        cid = folder.name
        sep = "_" if not any(folder.glob(f"{cid}-*")) else "-"
        images = {m: _find(folder, f"{cid}{sep}{suffix}") for m, suffix in site.modalities.items()}
        label = _find(folder, f"{cid}{sep}seg")
        cases.append(Case(cid, images, label if label.exists() else None))
    return cases


def _channel(site: SiteConfig, m: str, where: Path) -> int:
    try:
        return int(site.modalities[m])
    except ValueError:
        msg = f"modality {m!r} maps to {site.modalities[m]!r}, expected a channel index of the 4-D image"
        raise DataError(where, msg, f"set modalities.{m} in site.yaml to the channel index, e.g. '0'") from None


def _msd_cases(site: SiteConfig) -> list[Case]:
    root = site.data_dir
    meta_file = root / "dataset.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(meta_file, f"cannot read dataset.json ({exc})", "restore the Decathlon dataset.json") from exc
    entries = meta.get("training") or [
        {"image": f"./imagesTr/{p.name}", "label": f"./labelsTr/{p.name}"}
        for p in sorted((root / "imagesTr").glob("*.nii*"))
    ]
    channels = {m: _channel(site, m, meta_file) for m in site.modalities}
    cases = []
    for e in entries:
        image = root / e["image"]
        if image.name.startswith("."):  # macOS resource forks in the official tarball
            continue
        label = root / e["label"] if e.get("label") else None
        images = {m: image for m in site.modalities}
        cases.append(Case(_strip_nii(image.name), images, label, dict(channels)))
    return sorted(cases, key=lambda c: c.case_id)


def _datalist_cases(site: SiteConfig) -> list[Case]:
    path = site.data_dir if site.data_dir.is_file() else site.data_dir / "datalist.json"
    base = path.parent
    try:
        entries = json.loads(path.read_text())["training"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        reason = f"cannot read the 'training' list ({exc!r})"
        raise DataError(path, reason, 'write {"training": [{"image": {...}, "label": ...}]}') from exc
    cases = []
    for i, e in enumerate(entries):
        image = e.get("image") if isinstance(e, dict) else None
        label = base / e["label"] if isinstance(e, dict) and e.get("label") else None
        channels: dict[str, int] = {}
        if isinstance(image, dict):
            try:
                images = {m: base / image[key] for m, key in site.modalities.items()}
            except KeyError as exc:
                reason = f"entry {i} has no image key {exc.args[0]!r} (found {sorted(image)})"
                fix = "add the key to the entry or map the modality to an existing key in site.yaml"
                raise DataError(path, reason, fix) from None
        elif isinstance(image, list):
            idx = {m: _channel(site, m, path) for m in site.modalities}
            images = {m: base / image[j] for m, j in idx.items() if j < len(image)}
            absent = [m for m, j in idx.items() if j >= len(image)]
            if absent:
                reason = f"entry {i} lists {len(image)} images, modalities {absent} point past the end"
                raise DataError(path, reason, "fix the modality indices in site.yaml or the image list")
        elif isinstance(image, str):
            channels = {m: _channel(site, m, path) for m in site.modalities}
            images = {m: base / image for m in site.modalities}
        else:
            reason = f"entry {i} 'image' must be a mapping, a list or a path, found {image!r}"
            raise DataError(path, reason, "see the datalist format in uharmony_fed.data.layouts")
        first = next(iter(images.values()), None)
        cid = str(e.get("id") or e.get("case_id") or (_strip_nii(first.name) if first else f"case{i:04d}"))
        cases.append(Case(cid, images, label, channels))
    return cases


def discover_cases(site: SiteConfig) -> list[Case]:
    """List a site's cases from its data folder.

    Layouts:

    * ``brats``: ``DATA/CASE/CASE-<suffix>.nii.gz`` per modality (``<suffix>`` from
      ``site.modalities``) and ``CASE-seg.nii.gz``; ``_`` separators and ``.nii``
      are accepted too.
    * ``msd``: Decathlon ``dataset.json`` whose ``training`` entries name a 4-D
      ``imagesTr/*.nii.gz`` and ``labelsTr/*.nii.gz``; ``site.modalities`` gives
      each modality's channel index.
    * ``datalist``: ``datalist.json`` (paths relative to its folder)::

          {"training": [{"id": "case1",            # optional
                         "image": {"T1": "c1/t1.nii.gz", "FLAIR": "c1/flair.nii.gz"},
                         "label": "c1/seg.nii.gz"}]}

      ``site.modalities`` maps each modality to a key of ``image``. ``image`` may
      also be a list of 3-D files (modalities map to list indices, as strings) or
      one 4-D file (modalities map to channel indices).

    Args:
        site: the site config (``layout: auto`` is detected here).

    Returns:
        The cases, sorted by id for brats and msd, in file order for a datalist.

    Raises:
        DataError: the folder or its index file cannot be read.
    """
    layout = site.layout if site.layout != "auto" else detect_layout(site.data_dir)
    if not site.modalities or not site.regions:
        site = with_layout_defaults(site, layout)
    if layout == "brats":
        if not site.data_dir.is_dir():
            raise DataError(site.data_dir, "data folder not found", "point data_dir in site.yaml at the BraTS folder")
        return _brats_cases(site)
    if layout == "msd":
        return _msd_cases(site)
    return _datalist_cases(site)
