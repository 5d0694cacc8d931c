"""MONAI preprocessing and augmentation pipelines, and their configuration."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)

from uharmony_fed import MODALITIES
from uharmony_fed.data.layouts import Case
from uharmony_fed.data.site import SiteConfig, site_label_to_regions

#: Data-dict key of one 3-D file per modality (``src_t1n`` ...) and of a 4-D file.
SRC_KEYS: tuple[str, ...] = tuple(f"src_{m}" for m in MODALITIES)
SRC_4D = "src_4d"


@dataclass(frozen=True)
class DataConfig:
    """How cases are preprocessed, augmented, cached and batched.

    Attributes:
        spacing: target voxel size in mm (RAS). Coarse by default for the CPU demo;
            BraTS runs use 1.0.
        roi_size: training patch size in voxels.
        batch_size: cases per training batch (each gives ``samples_per_case`` patches).
        samples_per_case: label-balanced patches drawn per case per epoch.
        cache: ``memory`` (CacheDataset), ``disk`` (PersistentDataset under the
            site's state_dir/cache) or ``none``.
        num_workers: DataLoader worker processes.
        max_voxels: cases with more voxels are rejected as bad input.
        augment: random flips and intensity scale/shift on training patches.
        modality_dropout: probability of blanking one present sequence of a patch.
    """

    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    roi_size: tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    samples_per_case: int = 2
    cache: Literal["memory", "disk", "none"] = "disk"
    num_workers: int = 0
    max_voxels: int = 16_000_000
    augment: bool = True
    modality_dropout: float = 0.0

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.spacing):
            msg = f"spacing must be positive, found {self.spacing}"
            raise ValueError(msg)
        if any(r < 1 for r in self.roi_size):
            msg = f"roi_size must be positive, found {self.roi_size}"
            raise ValueError(msg)
        for name in ("batch_size", "samples_per_case", "max_voxels"):
            if getattr(self, name) < 1:
                msg = f"{name} must be at least 1, found {getattr(self, name)}"
                raise ValueError(msg)
        if self.num_workers < 0:
            msg = f"num_workers must be >= 0, found {self.num_workers}"
            raise ValueError(msg)
        if not 0.0 <= self.modality_dropout <= 1.0:
            msg = f"modality_dropout must be in [0, 1], found {self.modality_dropout}"
            raise ValueError(msg)


def case_to_dict(case: Case, site: SiteConfig) -> dict[str, Any]:
    """The MONAI data dict of a case: source files per modality, label, id."""
    d: dict[str, Any] = {"case_id": case.case_id}
    present = [m for m in site.present if m in case.images]
    if case.channels:
        d[SRC_4D] = str(case.images[present[0]])
    else:
        d.update({f"src_{m}": str(case.images[m]) for m in present})
    if case.label is not None:
        d["label"] = str(case.label)
    return d


class AssembleChannelsd(MapTransform):
    """Build the 4-channel ``image`` (MODALITIES order) and ``present`` from the sources.

    Declared-missing sequences are zero-filled channels with ``present`` 0. The
    sources (``src_*`` keys, channel-first) are removed; ``image`` keeps the first
    source's affine and metadata so later spatial transforms stay invertible.
    """

    def __init__(self, site: SiteConfig) -> None:
        super().__init__(keys=[*SRC_KEYS, SRC_4D], allow_missing_keys=True)
        self.site = site

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        multi = d.pop(SRC_4D, None)
        singles = {m: d.pop(f"src_{m}") for m in MODALITIES if f"src_{m}" in d}
        ref = multi if multi is not None else next(iter(singles.values()))
        image = torch.zeros((len(MODALITIES), *ref.shape[1:]), dtype=torch.float32)
        present = torch.zeros(len(MODALITIES), dtype=torch.float32)
        for i, m in enumerate(MODALITIES):
            if multi is not None and m in self.site.modalities:
                image[i] = torch.as_tensor(multi[int(self.site.modalities[m])])
            elif m in singles:
                image[i] = torch.as_tensor(singles[m][0])
            else:
                continue
            present[i] = 1.0
        # The meta dict carries the affine (and the original one) that Orientation,
        # Spacing and the inverse mapping rely on.
        d["image"] = MetaTensor(image, meta=dict(ref.meta)) if isinstance(ref, MetaTensor) else MetaTensor(image)
        d["present"] = present
        return d


class LabelToRegionsd(MapTransform):
    """Turn the site's ``label`` into float ET/TC/WT masks and an ``annotated`` vector."""

    def __init__(self, site: SiteConfig, key: str = "label") -> None:
        super().__init__(keys=[key], allow_missing_keys=True)
        self.site = site

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            raw = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
            masks, annotated = site_label_to_regions(torch.round(raw.float()), self.site)
            if isinstance(label, MetaTensor):
                masks = MetaTensor(masks, meta=dict(label.meta))
            d[key] = masks
            d["annotated"] = annotated
        return d


class MaskAbsentd(MapTransform):
    """Keep absent sequences exactly zero (intensity shifts would otherwise fill them)."""

    def __init__(self, key: str = "image") -> None:
        super().__init__(keys=[key])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] * d["present"].view(-1, *([1] * (d[key].ndim - 1))).to(d[key].dtype)
        return d


class RandModalityDropoutd(RandomizableTransform, MapTransform):
    """With probability ``prob``, blank one present sequence (at least one stays).

    Teaches the model to cope with sequences a site lacks; ``present`` is updated so
    the model sees the channel as absent.
    """

    def __init__(self, prob: float, key: str = "image") -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys=[key])
        self._drop = -1

    def randomize(self, present: torch.Tensor) -> None:  # type: ignore[override]
        super().randomize(None)
        idx = torch.nonzero(present > 0).flatten().tolist()
        self._drop = int(self.R.choice(idx)) if self._do_transform and len(idx) > 1 else -1

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(d["present"])
        if self._drop >= 0:
            present = d["present"].clone()
            present[self._drop] = 0.0
            d["present"] = present
            for key in self.key_iterator(d):
                img = d[key].clone()
                img[self._drop] = 0
                d[key] = img
        return d


def preprocess_transforms(site: SiteConfig, cfg: DataConfig) -> list[Any]:
    """The deterministic part: load, assemble, regions, RAS, spacing, crop, normalize."""
    keys = ["image", "label"]
    return [
        LoadImaged(keys=[*SRC_KEYS, SRC_4D, "label"], reader="NibabelReader", image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(keys=[*SRC_KEYS, SRC_4D, "label"], allow_missing_keys=True),
        AssembleChannelsd(site),
        LabelToRegionsd(site),
        Orientationd(keys=keys, axcodes="RAS", labels=None, allow_missing_keys=True),
        Spacingd(
            keys=keys,
            pixdim=cfg.spacing,
            mode=("bilinear", "nearest"),
            dtype=np.float32,
            allow_missing_keys=True,
        ),
        CropForegroundd(keys=keys, source_key="image", margin=1, allow_smaller=True, allow_missing_keys=True),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        MaskAbsentd(),
    ]


def train_transform(site: SiteConfig, cfg: DataConfig) -> Compose:
    """Preprocessing plus label-balanced patches of ``roi_size`` and augmentation."""
    keys = ["image", "label"]
    tail: list[Any] = [
        SpatialPadd(keys=keys, spatial_size=cfg.roi_size),
        RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=cfg.roi_size,
            pos=1,
            neg=1,
            num_samples=cfg.samples_per_case,
            image_key="image",
            image_threshold=0,
        ),
    ]
    if cfg.augment:
        tail += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
        tail += [
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    if cfg.modality_dropout > 0:
        tail.append(RandModalityDropoutd(cfg.modality_dropout))
    tail.append(MaskAbsentd())
    return Compose([*preprocess_transforms(site, cfg), *tail])


def val_transform(site: SiteConfig, cfg: DataConfig) -> Compose:
    """Preprocessing only: the whole volume (the trainer runs a sliding window)."""
    return Compose(preprocess_transforms(site, cfg))
