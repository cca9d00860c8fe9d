"""Datasets: the user's ImageFolder directories, the built-in rendered dataset, manifests and checks."""

from trainer.data.builtin import builtin_dataset, load_dataset, parse_builtin, write_imagefolder
from trainer.data.dataset import SPLITS, Dataset, DatasetManifest, Sample, sample_from_image, split_of
from trainer.data.imagefolder import load_imagefolder

__all__ = [
    "SPLITS",
    "Dataset",
    "DatasetManifest",
    "Sample",
    "builtin_dataset",
    "load_dataset",
    "load_imagefolder",
    "parse_builtin",
    "sample_from_image",
    "split_of",
    "write_imagefolder",
]
