"""A hospital's data description (site.yaml) and its label-value <-> region mapping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from uharmony_fed import MODALITIES, REGIONS
from uharmony_fed.config import ConfigError, load_yaml, parse

Layout = Literal["auto", "brats", "msd", "datalist"]

#: BraTS 2023+ file suffixes and labels (1 NETC, 2 SNFH, 3 ET).
BRATS_MODALITIES: dict[str, str] = {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f"}
BRATS_REGIONS: dict[str, list[int]] = {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}
#: Decathlon Task01 channel order (FLAIR, T1w, T1gd, T2w) and labels
#: (1 edema, 2 non-enhancing tumour, 3 enhancing tumour).
MSD_MODALITIES: dict[str, str] = {"t2f": "0", "t1n": "1", "t1c": "2", "t2w": "3"}
MSD_REGIONS: dict[str, list[int]] = {"ET": [3], "TC": [2, 3], "WT": [1, 2, 3]}
#: Regions nest: a voxel in a region is also in every region listed after it.
_NESTING: dict[str, tuple[str, ...]] = {"ET": ("TC", "WT"), "TC": ("WT",), "WT": ()}


@dataclass(frozen=True)
class SiteConfig:
    """What a site's data look like and how its conventions map to the product's.

    Attributes:
        name: the site's name (defaults to the folder holding site.yaml).
        data_dir: the folder (or datalist JSON) holding the cases.
        state_dir: where the site keeps caches and local model state.
        layout: ``"brats"``, ``"msd"``, ``"datalist"`` or ``"auto"`` (detected).
        modalities: product channel (t1n, t1c, t2w, t2f) -> the site's file suffix
            (BraTS), channel index as a string (Decathlon 4-D), or datalist key.
            Empty means the layout's convention (BraTS or Decathlon Task01).
        missing: product channels this site does not have (zero-filled, flagged absent).
        regions: product region (ET, TC, WT) -> the site's label values in it; the
            regions present are the ones the site annotates. Empty means the layout's
            convention.
        extra_classes: classes only this site annotates (for example a resection
            cavity, ``RC: [4]``): class name -> its label values, none of them in a
            region. They get their own outputs in the site's head (which must stay
            local) and never enter the shared regions or their Dice mean.
        val_fraction: share of the site's cases held out for validation.
        bad_case_policy: ``"skip"`` excludes unusable cases and reports them;
            ``"fail"`` stops with a :class:`DataError`.
    """

    data_dir: Path
    name: str = ""
    state_dir: Path = Path("state")
    layout: Layout = "auto"
    modalities: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    regions: dict[str, list[int]] = field(default_factory=dict)
    extra_classes: dict[str, list[int]] = field(default_factory=dict)
    val_fraction: float = 0.34
    bad_case_policy: Literal["skip", "fail"] = "skip"

    def __post_init__(self) -> None:
        for m in [*self.modalities, *self.missing]:
            if m not in MODALITIES:
                msg = f"unknown modality {m!r}; expected one of {', '.join(MODALITIES)}"
                raise ValueError(msg)
        both = sorted(set(self.modalities) & set(self.missing))
        if both:
            msg = f"modalities {both} are both mapped and declared missing; keep one"
            raise ValueError(msg)
        if self.modalities:
            unmapped = [m for m in MODALITIES if m not in self.modalities and m not in self.missing]
            if unmapped:
                msg = (
                    f"modalities {unmapped} are neither mapped nor declared missing; "
                    "add them under 'modalities' or 'missing'"
                )
                raise ValueError(msg)
        if self.missing and len(set(self.missing)) == len(MODALITIES):
            msg = "every modality is declared missing; a site needs at least one"
            raise ValueError(msg)
        for r, values in self.regions.items():
            if r not in REGIONS:
                msg = f"unknown region {r!r}; expected one of {', '.join(REGIONS)}"
                raise ValueError(msg)
            if not values or any(int(v) != v or v <= 0 for v in values):
                msg = f"region {r!r} needs a list of positive label values, found {values!r}"
                raise ValueError(msg)
        in_regions = {int(v) for vs in self.regions.values() for v in vs}
        seen: set[int] = set()
        for name, values in self.extra_classes.items():
            if name in REGIONS or not name.isidentifier():
                msg = (f"extra class {name!r}: expected a new class name (letters, digits, _), "
                       f"not one of the regions {', '.join(REGIONS)}")
                raise ValueError(msg)
            if not values or any(int(v) != v or v <= 0 for v in values):
                msg = f"extra class {name!r} needs a list of positive label values, found {values!r}"
                raise ValueError(msg)
            clash = sorted((in_regions | seen) & {int(v) for v in values})
            if clash:
                msg = (f"extra class {name!r}: label values {clash} already belong to a region or another "
                       "extra class; give each label value one meaning")
                raise ValueError(msg)
            seen.update(int(v) for v in values)
        if not 0.0 <= self.val_fraction < 1.0:
            msg = f"val_fraction must be in [0, 1), found {self.val_fraction}"
            raise ValueError(msg)

    @property
    def annotated(self) -> tuple[str, ...]:
        """The regions this site labels, in :data:`REGIONS` order."""
        return tuple(r for r in REGIONS if r in self.regions)

    @property
    def classes(self) -> tuple[str, ...]:
        """The model's output channels for this site: :data:`REGIONS`, then its extra classes."""
        return (*REGIONS, *self.extra_classes)

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every non-zero label value the site uses (regions and extra classes), sorted."""
        groups = [*self.regions.values(), *self.extra_classes.values()]
        return tuple(sorted({int(v) for vs in groups for v in vs}))

    @property
    def present(self) -> tuple[str, ...]:
        """The modalities this site has, in :data:`MODALITIES` order."""
        return tuple(m for m in MODALITIES if m not in self.missing)


def with_layout_defaults(site: SiteConfig, layout: str) -> SiteConfig:
    """Fill an empty ``modalities``/``regions`` from the layout's convention.

    Args:
        site: the parsed site config.
        layout: the concrete layout (``brats``, ``msd`` or ``datalist``).

    Returns:
        The site config with ``layout`` set and conventions filled in.

    Raises:
        ValueError: a datalist site without explicit ``modalities`` or ``regions``.
    """
    modalities, regions = dict(site.modalities), dict(site.regions)
    conventions = {"brats": (BRATS_MODALITIES, BRATS_REGIONS), "msd": (MSD_MODALITIES, MSD_REGIONS)}
    if layout not in conventions and (not modalities or not regions):
        msg = f"layout {layout!r} has no convention; set 'modalities' and 'regions' in site.yaml"
        raise ValueError(msg)
    if not modalities:
        modalities = {m: s for m, s in conventions[layout][0].items() if m not in site.missing}
    if not regions:
        regions = {r: list(v) for r, v in conventions[layout][1].items()}
    return dataclasses.replace(site, layout=layout, modalities=modalities, regions=regions)  # type: ignore[arg-type]


def load_site_config(path: str | Path) -> SiteConfig:
    """Read a site's ``site.yaml``; relative paths resolve against its folder.

    ``layout: auto`` is resolved by looking at the data folder, and an empty
    ``modalities`` or ``regions`` is filled from the layout's convention.

    Args:
        path: the site.yaml file.

    Returns:
        The validated :class:`SiteConfig`, with absolute paths.

    Raises:
        ConfigError: an unknown key (with the nearest valid one), a wrong type or an
            inconsistent mapping.
        DataError: the layout cannot be detected.
    """
    from uharmony_fed.data.layouts import detect_layout

    path = Path(path)
    raw: dict[str, Any] = load_yaml(path)
    site = parse(SiteConfig, raw, str(path))
    base = path.parent.resolve()
    site = dataclasses.replace(
        site,
        name=site.name or base.name,
        data_dir=(base / site.data_dir).resolve(),
        state_dir=(base / site.state_dir).resolve(),
    )
    layout = site.layout if site.layout != "auto" else detect_layout(site.data_dir)
    try:
        return with_layout_defaults(site, layout)
    except ValueError as exc:
        raise ConfigError(str(path), str(exc)) from exc


def _membership(site: SiteConfig) -> dict[int, frozenset[str]]:
    values = sorted({int(v) for vs in site.regions.values() for v in vs})
    return {v: frozenset(r for r, vs in site.regions.items() if v in vs) for v in values}


def site_label_to_regions(
    label: np.ndarray | torch.Tensor, site: SiteConfig
) -> tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]:
    """Turn a site label volume into the product's region masks.

    Args:
        label: the site's label volume, ``(H, W, D)`` or ``(1, H, W, D)``.
        site: the site whose ``regions`` mapping applies.

    Returns:
        ``(masks, annotated)``: float32 masks ``(C, H, W, D)`` in ``site.classes`` order
        (:data:`REGIONS`, then the site's extra classes; all zero for regions the site
        does not annotate) and a float32 ``(C,)`` vector with 1 for each annotated
        class. Same array library as ``label``.
    """
    if label.ndim == 4 and label.shape[0] == 1:
        label = label[0]
    masks = []
    for r in site.classes:
        values = site.regions.get(r) or site.extra_classes.get(r, [])
        if isinstance(label, torch.Tensor):
            m = torch.isin(label, torch.as_tensor(values, dtype=label.dtype, device=label.device))
            masks.append(m.to(torch.float32))
        else:
            masks.append(np.isin(label, values).astype(np.float32))
    annotated = [1.0 if r in site.regions or r in site.extra_classes else 0.0 for r in site.classes]
    if isinstance(label, torch.Tensor):
        return torch.stack(masks), torch.tensor(annotated, dtype=torch.float32)
    return np.stack(masks), np.asarray(annotated, dtype=np.float32)


def _label_for(predicted: frozenset[str], members: dict[int, frozenset[str]]) -> int:
    if not predicted or not members:
        return 0
    exact = [v for v, s in members.items() if s == predicted]
    if exact:
        return min(exact)
    supersets = [v for v, s in members.items() if s >= predicted]
    if supersets:
        return min(supersets, key=lambda v: (len(members[v]), v))
    return min(members, key=lambda v: (-len(members[v] & predicted), len(members[v] - predicted), v))


def regions_to_site_labels(
    region_masks: np.ndarray | torch.Tensor, site: SiteConfig, threshold: float = 0.5
) -> np.ndarray:
    """Turn predicted region masks into a volume of the site's own label values.

    A voxel's predicted set is the regions whose mask exceeds ``threshold``, closed
    under nesting (ET lies inside TC inside WT, so ET without TC counts as ET, TC and
    WT), then restricted to the regions the site annotates. The voxel gets the label
    whose region-membership set (label ``v`` is in region ``r`` iff ``v`` is in
    ``site.regions[r]``) equals that set; if none does, the label with the smallest
    membership set containing it; failing that, the one sharing most regions. Ties
    go to the smaller label value; an empty set gives 0. A voxel outside every region
    whose extra-class mask is above ``threshold`` gets that class's first label value
    (the most probable class where several are).

    Args:
        region_masks: ``(C, H, W, D)`` probabilities or binary masks in ``site.classes``
            order (``C = 3`` also works for a site with extra classes: none written).
        site: the site whose label convention to write.
        threshold: a voxel is in a region when its mask is above this value.

    Returns:
        An int16 label volume ``(H, W, D)``.
    """
    if isinstance(region_masks, torch.Tensor):
        region_masks = region_masks.detach().cpu().numpy()
    if region_masks.shape[0] not in (len(REGIONS), len(site.classes)):
        msg = f"expected {len(site.classes)} channels {site.classes}, found shape {region_masks.shape}"
        raise ValueError(msg)
    extra = region_masks[len(REGIONS):]
    region_masks = region_masks[: len(REGIONS)]
    members = _membership(site)
    on = region_masks > threshold
    code = np.zeros(region_masks.shape[1:], dtype=np.int64)
    for i in range(len(REGIONS)):
        code |= on[i].astype(np.int64) << i
    lut = np.zeros(2 ** len(REGIONS), dtype=np.int16)
    for c in range(len(lut)):
        chosen = {r for i, r in enumerate(REGIONS) if c >> i & 1}
        for r in list(chosen):
            chosen.update(_NESTING.get(r, ()))
        lut[c] = _label_for(frozenset(chosen) & frozenset(site.annotated), members)
    labels = lut[code]
    if len(extra):
        best = extra.argmax(0)
        firsts = np.asarray([vs[0] for vs in site.extra_classes.values()], dtype=np.int16)
        put = (labels == 0) & (extra.max(0) > threshold)
        labels[put] = firsts[best[put]]
    return labels
