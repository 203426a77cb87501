"""Data sets for erf-lab: the embedded ``digits-ms`` default, ``noise``, image folders and
COCO annotation files, all opened through one spec grammar by :func:`open_data` (the grammar below is :mod:`erf_lab.data.spec`'s).
"""
from .base import IMAGENET_MEAN, IMAGENET_STD, SampleDataset
from .bins import COCO_SIZE_EDGES, assign_size_bins, bin_of, size_bin_edges
from . import spec as _spec
from .spec import DEFAULT_SPEC, SPLITS, open_data

__doc__ = f"{__doc__}\n{_spec.__doc__}"

__all__ = [
    "open_data",
    "SampleDataset",
    "DEFAULT_SPEC",
    "SPLITS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "COCO_SIZE_EDGES",
    "size_bin_edges",
    "assign_size_bins",
    "bin_of",
]
