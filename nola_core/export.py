"""A self-contained adapted classifier: export it, load it back with one call, predict.

An export holds only what tuning changed — the trainable tensors (safetensors) — plus the
identity of the base CLIP (architecture, pretrained tag, or the identity of a local file), its
preprocessing, the class names and provenance, in a small JSON manifest with file hashes.
Loading rebuilds the base model through the same `load_clip` and checks every hash.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from nola_core.artifact_refs import load_ref, pointed_digest
from nola_core.storage import DEFAULT_CACHE_DIR
from nola_core.data import Preprocess, eval_transform, load_rgb
from nola_core.models import ModelConfig, PromptTunedClassifier, load_clip
from nola_core.tuning import save_trainable

EXPORT_FORMAT = "nola-classifier/1"
MANIFEST_NAME = "classifier.json"
TENSORS_NAME = "trainable.safetensors"
EXPORT_ASSET = "exported_classifier"  # the Dagster asset that writes an export into the artifact store
TUNED_ASSET = "prompt_tuned_encoder"  # the asset an export is made from (its digest: the export's key "tuned")


def export_classifier(
    classifier: PromptTunedClassifier,
    models: ModelConfig,
    preprocess: Preprocess,
    classes: Sequence[str],
    out_dir: str | Path,
    provenance: dict | None = None,
) -> Path:
    """Write `out_dir/{classifier.json, trainable.safetensors}`; returns the manifest path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_trainable(classifier, out_dir / TENSORS_NAME)
    manifest = {
        "format": EXPORT_FORMAT,
        "classes": list(classes),
        "clip": {
            "name": models.clip_name,
            "pretrained": models.clip_pretrained,
            "checkpoint": models.clip_checkpoint,
            "init_seed": models.init_seed,
            "identity": models.clip_identity(),
            "random_weights": models.clip_is_random,
        },
        "preprocess": dataclasses.asdict(preprocess),
        "prompts": {
            "num_prompts": classifier.encoder.num_prompts,
            "deep": classifier.encoder.prompts.shape[0] > 1,
            "logit_scale": classifier.logit_scale,
            "head_input": classifier.head_input,
        },
        "files": {TENSORS_NAME: _sha256(out_dir / TENSORS_NAME)},
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance or {},
    }
    path = out_dir / MANIFEST_NAME
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(temporary, path)
    return path


def copy_export(artifact_root: str | Path, dataset: str, to: str | Path, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Copy the latest materialized `exported_classifier` of `dataset` out of the artifact store (a
    folder, or a URL read through its copy under `cache_dir`) to `to`; refuses a missing or stale
    one (its tuned encoder rematerialized since). Returns `to`."""
    ref = load_ref(artifact_root, EXPORT_ASSET, dataset, cache_dir)
    if ref is None or not ref.file(MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"no exported classifier for dataset {dataset!r} under {artifact_root}: materialize "
            f"{EXPORT_ASSET} for that partition first (`nola run`, `nola demo`, or the Dagster UI)")
    tuned = pointed_digest(artifact_root, TUNED_ASSET, dataset)
    if tuned is not None and tuned != ref.key.get("tuned"):
        raise FileNotFoundError(
            f"the exported classifier of {dataset!r} is stale: {TUNED_ASSET} was rematerialized "
            f"since (e.g. by the new-images sensor); materialize {EXPORT_ASSET} for {dataset!r} again")
    target = Path(to)
    target.mkdir(parents=True, exist_ok=True)
    for file in (MANIFEST_NAME, TENSORS_NAME):
        shutil.copy2(ref.file(file), target / file)
    return target


class ExportedClassifier(nn.Module):
    """Takes a normalised image batch (forward) or PIL images / paths (`predict`); gives probabilities."""

    def __init__(self, classifier: PromptTunedClassifier, classes: Sequence[str], preprocess: Preprocess, manifest: dict):
        super().__init__()
        self.classifier = classifier.eval()
        self.classes = list(classes)
        self.preprocess = preprocess
        self.manifest = manifest
        self._transform = eval_transform(preprocess)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(images), dim=-1)

    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        loaded = [image if isinstance(image, Image.Image) else load_rgb(image) for image in images]
        batch = torch.stack([self._transform(image.convert("RGB")) for image in loaded])
        device = next(self.classifier.parameters()).device
        return self(batch.to(device)).float().cpu()

    def top_classes(self, probabilities: torch.Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
        values, indices = probabilities.topk(min(k, len(self.classes)), dim=-1)
        return [[(self.classes[i], float(v)) for v, i in zip(row_v, row_i)]
                for row_v, row_i in zip(values.tolist(), indices.tolist())]


def load_classifier(
    export_dir: str | Path, device: str | torch.device = "cpu", clip_checkpoint: str | None = None,
    weights_dir: str | None = None,
) -> ExportedClassifier:
    """Rebuild an exported classifier. `clip_checkpoint` points at a local copy of the base weights;
    `weights_dir` at a `nola weights download` folder (`nola predict` passes NOLA_WEIGHTS_DIR)."""
    export_dir = Path(export_dir)
    manifest_path = export_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not found; is {export_dir} a `nola export` folder?")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{manifest_path}: field 'format' is {manifest.get('format')!r}, expected {EXPORT_FORMAT!r}")
    for name, expected in manifest["files"].items():
        if _sha256(export_dir / name) != expected:
            raise ValueError(f"{export_dir / name}: content does not match the hash in {MANIFEST_NAME}")
    clip_info = manifest["clip"]
    models = ModelConfig(
        clip_name=clip_info["name"],
        clip_pretrained=clip_info["pretrained"],
        clip_checkpoint=clip_checkpoint or clip_info["checkpoint"],
        init_seed=clip_info["init_seed"],
        weights_dir=weights_dir,
    )
    clip = load_clip(models, device)
    tensors = load_file(str(export_dir / TENSORS_NAME))
    prompts = manifest["prompts"]
    classifier = PromptTunedClassifier(
        clip.visual,
        torch.zeros(len(manifest["classes"]), clip.embed_dim),
        num_prompts=prompts["num_prompts"],
        deep_prompts=prompts["deep"],
        logit_scale=prompts["logit_scale"],
        head_input=prompts.get("head_input", "normalized"),  # exports before the field had a cosine head
    )
    classifier.load_trainable_state_dict(tensors)
    preprocess = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["preprocess"].items()})
    return ExportedClassifier(classifier.to(device), manifest["classes"], preprocess, manifest)


ONNX_NAME = "vision.onnx"


def export_onnx(exported: ExportedClassifier, path: str | Path, opset: int = 17) -> Path:
    """The vision path (normalised image batch → logits) as ONNX, batch size dynamic.

    Needs the `onnx` package (`pip install 'nola[onnx]'`). Uses torch's TorchScript-based exporter,
    which needs no extra dependency; preprocessing stays outside the graph (see the manifest).
    """
    import warnings

    path = Path(path)
    size = exported.preprocess.image_size
    example = torch.zeros(1, 3, size, size, device=next(exported.classifier.parameters()).device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
        torch.onnx.export(exported.classifier, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return path


def onnx_max_abs_difference(onnx_path: str | Path, exported: ExportedClassifier, images: torch.Tensor) -> float:
    """Largest |onnxruntime logits − torch logits| on `images` (a normalised batch); needs onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    [onnx_logits] = session.run(None, {"images": images.float().cpu().numpy()})
    with torch.no_grad():
        torch_logits = exported.logits(images.to(next(exported.classifier.parameters()).device)).float().cpu()
    return float((torch.from_numpy(onnx_logits) - torch_logits).abs().max())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
