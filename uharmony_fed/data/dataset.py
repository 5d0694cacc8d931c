"""Per-site train/val datasets (cached), and loading one case for inference and back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor, PersistentDataset
from monai.transforms import Compose, SpatialResample

from uharmony_fed.data.errors import DataError, Problem
from uharmony_fed.data.layouts import Case, discover_cases
from uharmony_fed.data.site import SiteConfig, regions_to_site_labels
from uharmony_fed.data.transforms import DataConfig, case_to_dict, preprocess_transforms, train_transform, val_transform
from uharmony_fed.data.validate import check_case


def split_cases(cases: list[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Split cases into train and val, deterministically for a seed.

    The split depends only on the sorted case ids and the seed, so excluding or
    fixing a bad case never moves the others between train and val.

    Args:
        cases: the site's cases.
        val_fraction: share held out (rounded; at least one case when there are two
            or more and the fraction is positive; at least one case stays in train).
        seed: the split seed.

    Returns:
        ``(train, val)``, each sorted by case id.
    """
    ordered = sorted(cases, key=lambda c: c.case_id)
    n = len(ordered)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


def usable_cases(
    cases: list[Case], site: SiteConfig, data_cfg: DataConfig, require_label: bool = True
) -> tuple[list[Case], list[Problem]]:
    """Validate cases up front and apply the site's bad-case policy.

    Args:
        cases: the cases to check.
        site: the site config (its ``bad_case_policy`` decides skip or fail).
        data_cfg: supplies ``max_voxels``.
        require_label: whether a case without a label is bad.

    Returns:
        ``(good cases, problems of the skipped ones)``.

    Raises:
        DataError: a case is bad and the policy is ``fail`` (the first problem, with
            the count of the others).
    """
    good, skipped = [], []
    for case in cases:
        problems = check_case(case, site, data_cfg.max_voxels, require_label)
        if not problems:
            good.append(case)
            continue
        if site.bad_case_policy == "fail":
            first = problems[0]
            more = f" ({len(problems) - 1} more problem(s) in case {case.case_id})" if len(problems) > 1 else ""
            raise DataError(first.file, first.reason + more, first.fix + " (or set bad_case_policy: skip in site.yaml)")
        skipped.extend(problems)
    return good, skipped


def _dataset(items: list[dict[str, Any]], transform: Compose, site: SiteConfig, cfg: DataConfig, tag: str) -> Dataset:
    if cfg.cache == "memory":
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=max(cfg.num_workers, 1), progress=False)
    if cfg.cache == "disk":
        # PersistentDataset hashes only the item, so the preprocessing settings and
        # the site's mapping name the folder: changing them never reuses stale files.
        key = json.dumps({"spacing": cfg.spacing, "modalities": site.modalities, "missing": site.missing, "regions": site.regions}, sort_keys=True)
        cache_dir = site.state_dir / "cache" / f"{tag}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        cache_dir.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=cache_dir)
    return Dataset(items, transform)


def build_datasets(site: SiteConfig, data_cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, list[Problem]]:
    """A site's train and val datasets, validated and cached.

    Train items are lists of ``samples_per_case`` patch dicts (``image`` (4, *roi),
    ``label`` (3, *roi) ET/TC/WT, ``present`` (4,), ``annotated`` (3,), ``case_id``);
    val items are whole preprocessed volumes with the same keys. Use
    :func:`data_loader` to batch them.

    Args:
        site: the site config.
        data_cfg: preprocessing, caching and patch settings.
        seed: seeds the train/val split and the augmentation.

    Returns:
        ``(train_ds, val_ds, skipped)``; ``skipped`` lists the problems of excluded
        cases (policy ``skip``).

    Raises:
        DataError: a bad case under policy ``fail``, or no usable training case.
    """
    cases = discover_cases(site)
    train_cases, val_cases = split_cases(cases, site.val_fraction, seed)
    train_cases, skipped_train = usable_cases(train_cases, site, data_cfg)
    val_cases, skipped_val = usable_cases(val_cases, site, data_cfg)
    if not train_cases:
        reason = f"no usable training case ({len(cases)} found, {len(skipped_train) + len(skipped_val)} problem(s))"
        raise DataError(site.data_dir, reason, "run 'uharmony-fed check-data' on the folder and fix what it reports")
    t_train = train_transform(site, data_cfg)
    t_train.set_random_state(seed=seed)
    train_ds = _dataset([case_to_dict(c, site) for c in train_cases], t_train, site, data_cfg, "train")
    val_ds = _dataset([case_to_dict(c, site) for c in val_cases], val_transform(site, data_cfg), site, data_cfg, "val")
    return train_ds, val_ds, skipped_train + skipped_val


def data_loader(ds: Dataset, data_cfg: DataConfig, train: bool) -> DataLoader:
    """A MONAI DataLoader: train batches flatten the per-case patch lists; val is one volume per batch."""
    return DataLoader(
        ds,
        batch_size=data_cfg.batch_size if train else 1,
        shuffle=train,
        num_workers=data_cfg.num_workers,
    )


@dataclass
class InferenceCase:
    """A case preprocessed for prediction, with what is needed to go back to its grid.

    Attributes:
        case_id: the case's id.
        image: ``(4, H, W, D)`` MetaTensor on the preprocessing grid (RAS, configured
            spacing, cropped); its ``affine`` locates it in the world.
        present: ``(4,)`` float, 1 for each sequence the site has.
        original_affine: the case's own affine (4x4).
        original_shape: the case's own spatial shape.
    """

    case_id: str
    image: MetaTensor
    present: torch.Tensor
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]

    def to_original_grid(self, pred: torch.Tensor | np.ndarray, mode: str = "bilinear") -> torch.Tensor:
        """Resample a prediction on ``image``'s grid back onto the case's own grid.

        Args:
            pred: ``(C, H, W, D)`` probabilities (``mode="bilinear"``) or labels
                (``mode="nearest"``) on the preprocessing grid.
            mode: interpolation mode.

        Returns:
            ``(C, *original_shape)`` tensor; outside the cropped region it is 0.
        """
        if isinstance(pred, MetaTensor):
            pred = pred.as_tensor()
        pred = MetaTensor(torch.as_tensor(pred, dtype=torch.float32), affine=self.image.affine)
        out = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)(
            pred, dst_affine=torch.as_tensor(self.original_affine, dtype=torch.float64), spatial_size=self.original_shape
        )
        return torch.as_tensor(out).float()

    def prediction_to_nifti(self, region_probs: torch.Tensor | np.ndarray, site: SiteConfig, threshold: float = 0.5) -> nib.Nifti1Image:
        """The prediction as a NIfTI on the case's own grid with the site's label values.

        Args:
            region_probs: ``(3, H, W, D)`` ET/TC/WT probabilities on ``image``'s grid.
            site: the site whose label convention to write.
            threshold: region membership threshold.

        Returns:
            An int16 :class:`nibabel.Nifti1Image` with the case's affine (as sform and qform).
        """
        probs = self.to_original_grid(region_probs, mode="bilinear")
        labels = np.asarray(regions_to_site_labels(probs, site, threshold), dtype=np.int16)
        img = nib.Nifti1Image(labels, self.original_affine)
        img.set_data_dtype(np.int16)
        img.set_sform(self.original_affine, code=1)
        img.set_qform(self.original_affine, code=1)
        return img


def load_case_for_inference(case: Case, site: SiteConfig, data_cfg: DataConfig) -> InferenceCase:
    """Preprocess one case exactly as for validation, keeping the way back.

    Args:
        case: the case (its label, if any, is ignored).
        site: the site config.
        data_cfg: preprocessing settings.

    Returns:
        The :class:`InferenceCase`.

    Raises:
        DataError: the case is not usable (the first problem found).
    """
    problems = check_case(case, site, data_cfg.max_voxels, require_label=False)
    if problems:
        raise problems[0].to_error()
    item = case_to_dict(case, site)
    item.pop("label", None)
    out = Compose(preprocess_transforms(site, data_cfg))(item)
    ref = nib.load(next(iter(case.images[m] for m in site.present if m in case.images)))
    return InferenceCase(
        case_id=case.case_id,
        image=out["image"],
        present=out["present"],
        original_affine=np.asarray(ref.affine, dtype=np.float64),
        original_shape=tuple(int(s) for s in ref.shape[:3]),  # type: ignore[arg-type]
    )


__all__ = [
    "InferenceCase",
    "build_datasets",
    "data_loader",
    "load_case_for_inference",
    "split_cases",
    "usable_cases",
]
