"""Site data: site.yaml, layouts, validation, MONAI pipelines and datasets."""

from uharmony_fed.data.dataset import (
    InferenceCase,
    build_datasets,
    data_loader,
    load_case_for_inference,
    split_cases,
    usable_cases,
)
from uharmony_fed.data.errors import DataError, Problem
from uharmony_fed.data.layouts import Case, detect_layout, discover_cases
from uharmony_fed.data.site import (
    SiteConfig,
    load_site_config,
    regions_to_site_labels,
    site_label_to_regions,
    with_layout_defaults,
)
from uharmony_fed.data.transforms import DataConfig, train_transform, val_transform
from uharmony_fed.data.validate import CaseReport, Report, check_case, check_data, format_report

__all__ = [
    "Case",
    "CaseReport",
    "DataConfig",
    "DataError",
    "InferenceCase",
    "Problem",
    "Report",
    "SiteConfig",
    "build_datasets",
    "check_case",
    "check_data",
    "data_loader",
    "detect_layout",
    "discover_cases",
    "format_report",
    "load_case_for_inference",
    "load_site_config",
    "regions_to_site_labels",
    "site_label_to_regions",
    "split_cases",
    "train_transform",
    "usable_cases",
    "val_transform",
]
