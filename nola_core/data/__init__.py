"""Dataset specs, image folders, manifests and transforms (pure PyTorch / PIL)."""

from nola_core.data.benchmarks import (
    SOURCES as BENCHMARKS,
    BenchmarkNotFoundError,
    BenchmarkSource,
    benchmark_names,
    export_benchmark,
    get_benchmark,
)
from nola_core.data.datasets import ManifestImageDataset, collate_skipping_failures
from nola_core.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    REDUCED_JPEG_DECODE,
    ImageLoadError,
    check_image,
    is_image_path,
    load_rgb,
)
from nola_core.data.manifest import (
    FileStat,
    ImageRecord,
    Manifest,
    SkippedFile,
    build_manifest,
    known_labels,
)
from nola_core.data.spec import DatasetSpec, DatasetSpecError, check_dataset_name, load_dataset_spec
from nola_core.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiView,
    Preprocess,
    eval_transform,
    strong_transform,
    weak_transform,
)

__all__ = [
    "BENCHMARKS",
    "BenchmarkNotFoundError",
    "BenchmarkSource",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "REDUCED_JPEG_DECODE",
    "DatasetSpec",
    "DatasetSpecError",
    "FileStat",
    "ImageLoadError",
    "ImageRecord",
    "Manifest",
    "ManifestImageDataset",
    "MultiView",
    "Preprocess",
    "SkippedFile",
    "benchmark_names",
    "build_manifest",
    "check_dataset_name",
    "check_image",
    "collate_skipping_failures",
    "eval_transform",
    "export_benchmark",
    "get_benchmark",
    "is_image_path",
    "known_labels",
    "load_dataset_spec",
    "load_rgb",
    "strong_transform",
    "weak_transform",
]
