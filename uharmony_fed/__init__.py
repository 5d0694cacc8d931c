"""uharmony-fed: federated 3-D lesion segmentation with U-Harmony normalization."""

__version__ = "0.1.0"

#: Output regions of every model, in channel order (BraTS region convention).
REGIONS: tuple[str, ...] = ("ET", "TC", "WT")
#: Input sequences of every model, in channel order; a site declares which it lacks.
MODALITIES: tuple[str, ...] = ("t1n", "t1c", "t2w", "t2f")
