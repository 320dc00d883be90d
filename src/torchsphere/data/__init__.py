"""Datasets as in-memory tensors and batch augmentation on the training device. Nothing is downloaded.

``build_dataset(name, data_dir, ...)`` reads Fashion-MNIST / MNIST (IDX), CIFAR-10 / CIFAR-100 (python pickles),
class-per-folder image datasets (Pillow, via ``pip install "torchsphere[vision]"``), scikit-learn's digits, or
generates a tiny synthetic set, and returns a :class:`DatasetSplits` normalized as in the official SphereNet code,
``(x - 127.5) / 128``. ``make_augment(name)`` gives the matching tensor augmentation (the official CIFAR recipes
included).
"""
from .augment import Augment, crop_flip, list_augments, make_augment, random_crop, random_hflip
from .cifar import read_cifar10, read_cifar100
from .digits import read_digits
from .folder import read_image_folder
from .idx import read_idx, read_mnist_split
from .partitions import Partition, apply_partition, partition_indices, partition_schedule
from .registry import DEFAULT_AUGMENTS, build_dataset, default_augment, list_datasets, register_dataset
from .splits import DatasetNotFoundError, DatasetSplits, normalize_pixels, stratified_split
from .subset import FewShotTask, fewshot_task  # registers the "subset" dataset (class subsets, k-shot draws)

__all__ = [
    "DEFAULT_AUGMENTS",
    "Augment",
    "DatasetNotFoundError",
    "DatasetSplits",
    "FewShotTask",
    "Partition",
    "apply_partition",
    "build_dataset",
    "crop_flip",
    "default_augment",
    "fewshot_task",
    "list_augments",
    "list_datasets",
    "make_augment",
    "normalize_pixels",
    "partition_indices",
    "partition_schedule",
    "random_crop",
    "random_hflip",
    "read_cifar10",
    "read_cifar100",
    "read_digits",
    "read_idx",
    "read_image_folder",
    "read_mnist_split",
    "register_dataset",
    "stratified_split",
]
