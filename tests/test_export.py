"""Export → load → identical logits; WiSE-FT endpoints; text-limit and name-collision reports."""

import copy
import json
import logging

import pytest
import torch

from nola_core import export
from nola_core.data import build_manifest, eval_transform, load_dataset_spec, load_rgb
from nola_core.demo import demo_dataset_path
from nola_core.export import MANIFEST_NAME, export_classifier, load_classifier
from nola_core.models import ModelConfig, load_clip
from nola_core.models.vpt import interpolate_trainable
from nola_core.methods.nola import apply_wiseft
from nola_core.tuning import build_prompt_classifier
from nola_core.text.dataset import text_checks
from nola_core.text import colliding_class_names
from nola_core.tuning import TuningConfig

TINY = ModelConfig.from_profile("tiny")


def tuned_classifier():
    """(CLIP, spec, CDE, a classifier whose trainable tensors were moved away from their initial
    values, eight demo images)."""
    clip = load_clip(TINY)
    spec = load_dataset_spec(demo_dataset_path())
    cde = torch.nn.functional.normalize(torch.randn(len(spec.classes), clip.embed_dim), dim=-1)
    classifier = build_prompt_classifier(clip, cde, TuningConfig(num_prompts=4))
    with torch.no_grad():
        for parameter in classifier.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    images = [load_rgb(spec.root / r.path) for r in build_manifest(spec, "unlabeled").records[:8]]
    return clip, spec, cde, classifier.eval(), images


@pytest.fixture(scope="module")
def tuned():
    return tuned_classifier()


def onnx_check_inputs(tuned, folder):
    """(the export of `tuned` loaded back, a normalised batch of its images) for the ONNX check."""
    clip, spec, _, classifier, images = tuned
    export_classifier(classifier, TINY, clip.preprocess, spec.classes, folder)
    return load_classifier(folder), torch.stack([eval_transform(clip.preprocess)(image) for image in images])


def test_export_round_trip_gives_identical_logits_on_real_images(tuned, tmp_path):
    clip, spec, _, classifier, images = tuned
    export_classifier(classifier, TINY, clip.preprocess, spec.classes, tmp_path / "export",
                      provenance={"dataset": spec.name})
    loaded = load_classifier(tmp_path / "export")
    batch = torch.stack([eval_transform(clip.preprocess)(image) for image in images])
    with torch.no_grad():
        assert torch.equal(loaded.logits(batch), classifier(batch))
    probabilities = loaded.predict(images)
    assert probabilities.shape == (8, 4) and torch.allclose(probabilities.sum(-1), torch.ones(8), atol=1e-5)
    assert loaded.classes == list(spec.classes)
    manifest = json.loads((tmp_path / "export" / MANIFEST_NAME).read_text())
    assert manifest["clip"]["random_weights"] is True and manifest["provenance"]["dataset"] == "fashion_mini"


def onnx_minus_torch(session, classifier, images) -> float:
    """Largest |onnxruntime − torch| logit on `images`, computed here, not by the code under test."""
    [onnx_logits] = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        return (torch.from_numpy(onnx_logits) - classifier(images)).abs().max().item()


def check_onnx_export_and_its_reported_difference(exported, images, folder):
    """`export_onnx` writes a model that onnxruntime runs to torch's logits (within 1e-3, measured
    here), and `onnx_max_abs_difference` reports the difference this test measures, both for the
    export and for a classifier whose logits were moved away from it by a known amount."""
    import onnxruntime

    path = export.export_onnx(exported, folder / export.ONNX_NAME)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    measured = onnx_minus_torch(session, exported.classifier, images)
    assert measured < 1e-3, f"ONNX logits differ from torch's by {measured}"
    reported = export.onnx_max_abs_difference(path, exported, images)
    assert reported == pytest.approx(measured, rel=1e-3, abs=1e-7), f"reported {reported}, measured {measured}"
    moved = copy.deepcopy(exported)
    moved.classifier.logit_scale *= 1.5  # every logit moves by half its value
    measured_moved = onnx_minus_torch(session, moved.classifier, images)
    with torch.no_grad():
        assert measured_moved > 0.4 * exported.classifier(images).abs().max().item() > 1e-3
    reported_moved = export.onnx_max_abs_difference(path, moved, images)
    assert reported_moved == pytest.approx(measured_moved, rel=1e-3), f"reported {reported_moved}, measured {measured_moved}"


def test_onnx_export_runs_to_the_torch_logits_and_the_difference_is_reported_right(tuned, tmp_path):
    pytest.importorskip("onnx", reason="the onnx package is not installed (pip install 'nola[onnx]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'nola[onnx]')")
    check_onnx_export_and_its_reported_difference(*onnx_check_inputs(tuned, tmp_path), tmp_path)


def test_tampered_export_is_refused(tuned, tmp_path):
    clip, spec, _, classifier, _ = tuned
    export_classifier(classifier, TINY, clip.preprocess, spec.classes, tmp_path)
    with open(tmp_path / "trainable.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="does not match the hash"):
        load_classifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="nola export"):
        load_classifier(tmp_path / "nowhere")


def test_wiseft_endpoints_are_exact(tuned):
    clip, _, cde, classifier, images = tuned
    config = TuningConfig(num_prompts=4)
    batch = torch.stack([eval_transform(clip.preprocess)(image) for image in images])
    untuned = build_prompt_classifier(clip, cde, config).eval()
    with torch.no_grad():
        tuned_logits, untuned_logits = classifier(batch), untuned(batch)
        assert not torch.allclose(tuned_logits, untuned_logits)
        for alpha, expected in ((0.0, untuned_logits), (1.0, tuned_logits)):
            mixed = copy.deepcopy(classifier)
            apply_wiseft(mixed, clip, cde, config, alpha)
            assert torch.equal(mixed(batch), expected)
        half = interpolate_trainable(untuned.trainable_state_dict(), classifier.trainable_state_dict(), 0.5)
        assert torch.allclose(half["head.weight"], (untuned.head.weight + classifier.head.weight) / 2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        interpolate_trainable({}, {}, 1.5)


def test_name_collisions_and_truncated_descriptions_are_reported(tuned, tmp_path, caplog):
    clip = tuned[0]
    assert colliding_class_names(["Bag", "bags", "box", "boxes", "butterfly", "butterflies", "T-shirt",
                                  "t shirt", "dress", "cat"]) == [
        ["Bag", "bags"], ["box", "boxes"], ["butterfly", "butterflies"], ["T-shirt", "t shirt"]]
    (tmp_path / "unlabeled").mkdir()
    (tmp_path / "dataset.yaml").write_text("name: odd\nclasses: [Bag, bags, shoe]\n")
    spec = load_dataset_spec(tmp_path)
    long_text = "a very long description " * 20  # about 80 tokens
    with caplog.at_level(logging.WARNING):
        checks = text_checks(clip, spec, {"Bag": [long_text, long_text, "a bag."], "bags": ["bags."], "shoe": []})
    assert checks["collisions"] == [["Bag", "bags"]]
    assert checks["truncated"] == {"Bag": 2}
    assert "2 description(s) of class 'Bag' exceed CLIP's 77-token context" in caplog.text
