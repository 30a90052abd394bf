"""Accuracy of the mini models on in-memory images, for the training report and calibration.

Images go through the preprocessing the loader attached to each model (the same as in the
pipeline). Labels are used only to measure: to score, and to fit the diagnostic head that
measures how much room a domain leaves for label-free adaptation; nothing here is a pipeline step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nola_core.alignment import (
    AlignmentConfig,
    PseudoLabelSelection,
    class_log_odds,
    per_class_k,
    predict_alignment,
    select_top_k,
    selection_report,
    train_alignment,
)
from nola_core.data.transforms import eval_transform
from nola_core.mini.fashion import CLASSES
from nola_core.text import get_templates, zero_shot_classifier


def _batch(images: Sequence[np.ndarray], preprocess) -> torch.Tensor:
    transform = eval_transform(preprocess)
    return torch.stack([transform(Image.fromarray(image).convert("RGB")) for image in images])


@torch.inference_mode()
def clip_features(clip, images: Sequence[np.ndarray], batch_size: int = 512) -> torch.Tensor:
    pixels = _batch(images, clip.preprocess)
    return torch.cat([clip.encode_image(chunk) for chunk in pixels.split(batch_size)]).float()


@torch.inference_mode()
def dino_features(dino, images: Sequence[np.ndarray], batch_size: int = 512) -> torch.Tensor:
    pixels = _batch(images, dino.preprocess)
    return torch.cat([dino.encode_image(chunk) for chunk in pixels.split(batch_size)]).float()


def generic_zero_shot(clip, templates: str = "generic") -> torch.Tensor:
    """[10, D] the zero-shot classifier of the mini world's classes (`generic` templates)."""
    return zero_shot_classifier(clip, CLASSES, get_templates(templates))


def zero_shot_accuracy(clip_image_features: torch.Tensor, zero_shot: torch.Tensor, labels: np.ndarray) -> float:
    """Top-1 of the zero-shot classifier on CLIP image features (`clip_features`)."""
    predicted = (clip_image_features @ zero_shot.T).argmax(1).numpy()
    return float((predicted == np.asarray(labels)).mean())


def top_k_precision(clip_image_features: torch.Tensor, zero_shot: torch.Tensor, labels: np.ndarray) -> float:
    """Share of right labels among NoLA's top-k zero-shot pseudo-labels (`alignment.select_top_k`,
    k by its defaults): how good the examples are that the DL network learns from."""
    config = AlignmentConfig()
    k = per_class_k(len(labels), len(CLASSES), config.k_min, config.k_fraction)
    selection = select_top_k(class_log_odds(clip_image_features, zero_shot, config.logit_scale), k)
    ids = [str(row) for row in range(len(labels))]
    return selection_report(selection, CLASSES, ids, dict(zip(ids, np.asarray(labels).tolist())))["precision"]


def head_accuracy_with_true_labels(train_features: torch.Tensor, train_labels: np.ndarray,
                                   test_features: torch.Tensor, test_labels: np.ndarray, seed: int = 0) -> float:
    """Top-1 on the test rows of NoLA's DL network head (`alignment.train_alignment`, its
    defaults) fitted on the *true* labels of the train rows: what a perfect labeller would let a
    head on these features reach from that many images, the ceiling of label-free adaptation
    on them. A diagnostic of the world (labels used to measure it), never a pipeline step."""
    labels = torch.as_tensor(np.asarray(train_labels, dtype=np.int64))
    selection = PseudoLabelSelection(indices=torch.arange(len(labels)), labels=labels,
                                     scores=torch.zeros(len(labels)), k=0, num_classes=len(CLASSES))
    network, _ = train_alignment(train_features, selection, AlignmentConfig(seed=seed), "cpu")
    predicted = predict_alignment(network, test_features).argmax(1).numpy()
    return float((predicted == np.asarray(test_labels)).mean())


def knn_accuracy(features: torch.Tensor, labels: np.ndarray, k: int = 20) -> float:
    """Leave-one-out k-nearest-neighbour top-1 (cosine, majority vote) within one set."""
    normed = F.normalize(features, dim=1)
    similarity = normed @ normed.T
    similarity.fill_diagonal_(-2.0)
    neighbours = similarity.topk(k, dim=1).indices
    votes = torch.as_tensor(np.asarray(labels, dtype=np.int64))[neighbours]
    predicted = torch.mode(votes, dim=1).values.numpy()
    return float((predicted == np.asarray(labels)).mean())

