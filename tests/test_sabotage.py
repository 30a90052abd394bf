"""The sabotage suite: the power of the method tests, itself tested.

Each case breaks ONE mechanism on purpose (a monkeypatch to a known-wrong variant) and asserts
that the behavioural check written for that mechanism then FAILS, with the message of that
check. The checks are the plain functions the normal tests call (`check_*` in the test modules
named in each case; where a test holds its check inline, the test function itself, called with
its arguments built here), run on the same controlled data. `test_every_check_passes_unbroken` runs each check once without a patch,
so a check that always fails cannot pass for a detector.

One line per case in SABOTAGES: `breaks` says which mechanism and how; `check` names the check
that must catch it (each wraps one check function, or one test function, of the module it names).
When a mechanism changes on purpose (docs/fidelity.md), its case moves with it: a fix that
passes this suite is one whose tests can tell it from the bug.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import test_alignment
import test_deploy
import test_evaluation_splits
import test_export
import test_fidelity_lafter_latteclip
import test_fidelity_nola
import test_fidelity_text
import test_methods
import test_methods_real
import test_reliability
import test_tuning
from nola_core import alignment, export, features, runtime, tuning
from nola_core import eval as evaluation
from nola_core.data import MultiView, known_labels, strong_transform, transforms
from nola_core.llm import describe
from nola_core.methods import compare, compare_methods, lafter, latteclip, nola
from nola_core.methods.common import PseudoLabels
from nola_core.models import ModelConfig, PromptTunedClassifier, load_dino
from nola_assets import artifacts, common

# --- the checks, on shared controlled inputs (built once per session) ------------------------------


@functools.cache
def _tuning_setup():
    return test_tuning.tuning_setup()


@functools.cache
def _tiny_dino():
    return load_dino(ModelConfig.from_profile("tiny"))


@functools.cache
def _tuned_for_export():
    return test_export.tuned_classifier()


def tiny_tuning_inputs():
    """(CLIP, spec, 8 records, a seeded random CDE): test_fidelity_nola's `tiny` fixture."""
    clip, spec, manifest, _ = _tuning_setup()
    cde = torch.nn.functional.normalize(torch.randn(len(spec.classes), clip.embed_dim,
                                                    generator=torch.Generator().manual_seed(0)), dim=-1)
    return clip, spec, manifest.records[:8], cde


def tuning_trains_only_named_tensors(tmp_path: Path) -> None:
    before, after, _ = test_tuning.tune_tiny(_tuning_setup(), images=16, epochs=1)
    test_tuning.check_only_named_tensors_train(before, after)


def tuning_checkpoint_reloads_exactly(tmp_path: Path) -> None:
    _, after, _ = test_tuning.tune_tiny(_tuning_setup(), images=16, epochs=1)
    test_tuning.check_checkpoint_holds_the_named_tensors_and_reloads_exactly(
        _tuning_setup(), after, tmp_path / "tuned.safetensors")


def nola_labeller_sees_weak_views(tmp_path: Path) -> None:
    clip, spec, manifest, _ = _tuning_setup()
    test_tuning.check_nola_labeller_sees_weak_views(clip, _tiny_dino(), spec, manifest.records[:6])


def tuning_follows_the_labeller(tmp_path: Path) -> None:
    test_tuning.check_tuning_follows_the_labeller(_tuning_setup())


def nola_stages_beat_the_cde(tmp_path: Path) -> None:
    test_methods.test_nola_stages_improve_on_the_cde_labels_they_start_from(tmp_path)


def onnx_export_and_reported_difference(tmp_path: Path) -> None:
    exported, images = test_export.onnx_check_inputs(_tuned_for_export(), tmp_path)
    test_export.check_onnx_export_and_its_reported_difference(exported, images, tmp_path)


def artifact_writes_are_atomic(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        test_reliability.test_a_full_disk_or_failed_rename_leaves_the_previous_version_and_no_temporary_file(
            tmp_path, patch)


def gpu_asset_requests_a_gpu_pod(tmp_path: Path) -> None:
    """A GPU asset declared the way every NoLA asset is (`common.nola_asset`), checked for its pod tag."""

    @common.nola_asset("sabotage", version="1", pool=common.GPU_POOL)
    def a_gpu_step(context):
        raise AssertionError("never materialized")

    test_deploy.check_gpu_assets_request_a_gpu_pod([a_gpu_step])


def top_k_beats_zero_shot(tmp_path: Path) -> None:
    test_alignment.check_top_k_is_more_precise_than_zero_shot_labels()


def selection_report_counts_by_id(tmp_path: Path) -> None:
    selection, labels, _ = test_alignment.check_top_k_is_more_precise_than_zero_shot_labels()
    test_alignment.check_selection_report_pairs_labels_with_ids(selection, labels)


def top_k_ranks_by_log_odds(tmp_path: Path) -> None:
    test_alignment.check_top_k_ranks_by_log_odds()


def top_k_ranks_first_choices_only(tmp_path: Path) -> None:
    test_fidelity_nola.test_top_k_ranks_only_images_whose_first_choice_is_the_class()


def dl_network_beats_zero_shot(tmp_path: Path) -> None:
    test_alignment.check_dl_network_beats_the_zero_shot_labels()


def pseudo_labels_by_id(tmp_path: Path) -> None:
    test_alignment.check_selected_pseudo_labels_carry_their_image_ids()


def lafter_labeller_stays_frozen(tmp_path: Path) -> None:
    test_fidelity_lafter_latteclip.lafter_frozen_labeller_check(tmp_path)


def latteclip_prototypes_reach_their_target(tmp_path: Path) -> None:
    test_fidelity_lafter_latteclip.latteclip_loop_check()


def tuned_head_is_the_cde_adapter(tmp_path: Path) -> None:
    test_fidelity_nola.test_tuned_head_is_the_cde_adapter_on_the_unnormalised_projected_feature(tiny_tuning_inputs(),
                                                                                                tmp_path)


def strong_view_is_the_reference(tmp_path: Path) -> None:
    test_fidelity_nola.test_strong_view_is_the_reference_composition()


def splits_scored_apart(tmp_path: Path) -> None:
    test_evaluation_splits.test_the_splits_are_scored_apart_and_differ_where_they_must()


def descriptions_name_their_class(tmp_path: Path) -> None:
    test_fidelity_text.test_llm_lines_without_the_class_name_get_it_prepended_and_are_counted(tmp_path)


def labels_never_reach_the_cde(tmp_path: Path) -> None:
    """The bit-identical check of test_methods_real on the CDE alone (the cheapest method to run twice)."""
    original, shuffled = test_methods_real.shuffled_label_copies(tmp_path)
    config = dataclasses.replace(test_methods_real.FAST, methods=("cde",))
    test_methods_real.check_checkpoints_do_not_depend_on_the_labels(compare_methods(original, config),
                                                                  compare_methods(shuffled, config))


def bias_weight_decay_and_constant_lr(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        test_fidelity_nola.test_no_weight_decay_on_biases_and_a_constant_learning_rate(tiny_tuning_inputs(), patch)


# --- the known-wrong variants ----------------------------------------------------------------------


def _also_trainable(pick: Callable[[PromptTunedClassifier], list[torch.nn.Parameter]]):
    def breaks(monkeypatch):
        real = PromptTunedClassifier.__init__

        def init(self, *args, **kwargs):
            real(self, *args, **kwargs)
            for parameter in pick(self):
                parameter.requires_grad_(True)

        monkeypatch.setattr(PromptTunedClassifier, "__init__", init)
    return breaks


def _checkpoint_of_every_tensor(monkeypatch):
    monkeypatch.setattr(PromptTunedClassifier, "trainable_state_dict",
                        lambda self: {n: p.detach().clone() for n, p in self.named_parameters()})


def _reload_skips_layer_norms(monkeypatch):
    real = PromptTunedClassifier.load_trainable_state_dict

    def load(self, tensors):
        kept = {n: t for n, t in tensors.items() if ".ln_" not in n}
        real(self, {**kept, **{n: t for n, t in self.trainable_state_dict().items() if n not in kept}})

    monkeypatch.setattr(PromptTunedClassifier, "load_trainable_state_dict", load)


def _checkpoint_in_bf16(monkeypatch):
    real = tuning.save_file
    monkeypatch.setattr(tuning, "save_file",
                        lambda tensors, *args, **kwargs: real({n: t.bfloat16() for n, t in tensors.items()}, *args, **kwargs))


def _labeller_fed_the_strong_view(monkeypatch):
    monkeypatch.setattr(nola, "tuning_views",
                        lambda clip, dino: MultiView((strong_transform(dino.preprocess), strong_transform(clip.preprocess))))


def _tuning_labels_with_the_model_being_tuned(monkeypatch):
    real = tuning._train_epoch

    def train_epoch(model, classifier, batches, plan, pseudo_labeller, *rest):
        return real(model, classifier, batches, plan, lambda weak: classifier(weak).argmax(-1), *rest)

    monkeypatch.setattr(tuning, "_train_epoch", train_epoch)


def _top_k_without_a_confidence_filter(monkeypatch):
    real = alignment.select_top_k
    monkeypatch.setattr(alignment, "select_top_k", lambda chunks, k, *args, **kwargs: real(chunks, 10**9, *args, **kwargs))


def _top_k_ranked_by_all_images(monkeypatch):
    """The selection before the fidelity fix: class c ranks all N images by their score for c; an
    image claimed twice keeps the class with the higher score."""

    def select(chunks, k, *args, **kwargs):
        scores = torch.cat([chunk.float() for chunk in chunks])
        best, rows = scores.T.topk(min(k, len(scores)), dim=1)
        winner: dict[int, tuple[float, int]] = {}
        for c in range(scores.shape[1]):
            for score, row in zip(best[c].tolist(), rows[c].tolist()):
                if row not in winner or score > winner[row][0]:
                    winner[row] = (score, c)
        order = sorted(winner)
        return alignment.PseudoLabelSelection(
            torch.tensor(order), torch.tensor([winner[r][1] for r in order]),
            torch.tensor([winner[r][0] for r in order]), k, scores.shape[1])

    monkeypatch.setattr(alignment, "select_top_k", select)
    monkeypatch.setattr(test_fidelity_nola, "select_top_k", select)


def _saturating_softmax_ranking(monkeypatch):
    monkeypatch.setattr(alignment, "_log_odds", lambda logits: torch.softmax(logits, dim=-1))


def _dl_network_not_stepping(monkeypatch):
    real = alignment.train_alignment
    monkeypatch.setattr(alignment, "train_alignment",
                        lambda features, selection, config, *a, **k: real(features, selection,
                                                                          dataclasses.replace(config, lr=0.0), *a, **k))


def _dl_network_on_shuffled_labels(monkeypatch):
    real = alignment.train_alignment

    def train(features, selection, *args, **kwargs):
        shuffled = selection.labels[torch.randperm(len(selection.labels), generator=torch.Generator().manual_seed(0))]
        return real(features, dataclasses.replace(selection, labels=shuffled), *args, **kwargs)

    monkeypatch.setattr(alignment, "train_alignment", train)


def _pseudo_label_ids_in_order_of_the_list(monkeypatch):
    monkeypatch.setattr(nola, "selection_pseudo_labels", lambda selection, ids: PseudoLabels(
        tuple(ids[: selection.indices.numel()]), selection.labels.long(), len(ids)))


def _pseudo_labels_sorted_by_class(monkeypatch):
    monkeypatch.setattr(nola, "selection_pseudo_labels", lambda selection, ids: PseudoLabels(
        tuple(ids[row] for row in selection.indices.tolist()), selection.labels.sort().values.long(), len(ids)))


def _report_pairs_labels_with_reversed_ids(monkeypatch):
    real = alignment.selection_report
    monkeypatch.setattr(alignment, "selection_report",
                        lambda selection, classes, ids, *args, **kwargs: real(selection, classes, ids[::-1], *args, **kwargs))


def _onnx_difference_reported_as_zero(monkeypatch):
    monkeypatch.setattr(export, "onnx_max_abs_difference", lambda path, exported, images: 0.0)


def _onnx_of_other_tensors(monkeypatch):
    real = export.export_onnx

    def export_onnx(exported, path, *args, **kwargs):
        moved = copy.deepcopy(exported)
        with torch.no_grad():
            moved.classifier.encoder.prompts.zero_()
        return real(moved, path, *args, **kwargs)

    monkeypatch.setattr(export, "export_onnx", export_onnx)


def _writes_in_place(monkeypatch):
    @contextlib.contextmanager
    def in_place(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        yield Path(path)

    def write_in_place(path, write):
        with in_place(path):
            write(path)
        return path

    monkeypatch.setattr(artifacts, "atomic_write", write_in_place)
    for module in (runtime, tuning, features):
        monkeypatch.setattr(module, "atomic_output", in_place)


def _labels_nudge_the_cde(monkeypatch):
    """Three images' ground-truth labels each move their class's CDE row by 1e-3."""
    labels: list[int] = []
    real_load, real_cde = compare.load_dataset, compare.cde_weights

    def load(dataset_dir):
        spec, manifest, labeled = real_load(dataset_dir)
        truth = known_labels(manifest, labeled)
        labels[:] = [truth[image_id] for image_id in manifest.ids[:3]]
        return spec, manifest, labeled

    def cde_weights(*args, **kwargs):
        weights = real_cde(*args, **kwargs).clone()
        for c in labels:
            weights[c] += 1e-3
        return weights

    monkeypatch.setattr(compare, "load_dataset", load)
    monkeypatch.setattr(compare, "cde_weights", cde_weights)


def _gpu_assets_without_pod_tags(monkeypatch):
    monkeypatch.setattr(common, "GPU_POD_TAGS", {})


def _decay_on_biases(monkeypatch):
    real = torch.optim.AdamW

    class DecayEverything(real):
        def __init__(self, params, *args, weight_decay=0.01, **kwargs):
            params = list(params)
            if params and isinstance(params[0], dict):
                params = [{**group, "weight_decay": weight_decay or 0.01} for group in params]
            super().__init__(params, *args, weight_decay=weight_decay, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", DecayEverything)


def _lafter_labeller_follows_the_student(monkeypatch):
    """The LaFTer labeller before the fidelity fix: the head being trained labels the weak view."""

    def labeller(classifier):
        def label(weak):
            features = torch.nn.functional.normalize(classifier.encoder.visual(weak).float(), dim=-1)
            return (features @ classifier.head.weight.float().T).argmax(dim=-1)
        return label

    monkeypatch.setattr(lafter, "lafter_pseudo_labeller", labeller)


def _cosine_schedule(monkeypatch):
    real = tuning._schedule
    monkeypatch.setattr(tuning, "_schedule", lambda optimizer, name, total_steps: real(optimizer, "cosine", total_steps))


def _head_on_normalised_features_at_scale_100(monkeypatch):
    """The tuned head before the fidelity fix: 100 · cosine instead of the CDE adapter on the raw feature."""
    monkeypatch.setattr(PromptTunedClassifier, "logits_from_features",
                        lambda self, features: 100 * self.head(torch.nn.functional.normalize(features, dim=-1)))


def _strong_view_perspective_0_5(monkeypatch):
    """strong_transform's own default changed back to the old perspective distortion 0.5."""
    names = [n for n, p in inspect.signature(transforms.strong_transform).parameters.items() if p.default is not p.empty]
    defaults = dict(zip(names, transforms.strong_transform.__defaults__), perspective_distortion=0.5)
    monkeypatch.setattr(transforms.strong_transform, "__defaults__", tuple(defaults[n] for n in names))


def _evaluation_blends_the_splits(monkeypatch):
    """Every labelled image scored in each split (the blend the evaluation used to report)."""
    real = evaluation._split_accuracy

    def blended(split, ids, predicted, labels, classes):
        held_out = frozenset(labels.by_id) if split == evaluation.HELD_OUT else frozenset()
        return real(split, ids, predicted, evaluation.EvaluationLabels(labels.by_id, held_out), classes)

    monkeypatch.setattr(evaluation, "_split_accuracy", blended)


def _descriptions_not_prefixed(monkeypatch):
    monkeypatch.setattr(describe, "prefix_unnamed_lines", lambda lines, class_name: (list(lines), 0))


def _latteclip_mixer_off(monkeypatch):
    monkeypatch.setattr(latteclip, "mixer_weights", lambda texts, prototypes: torch.ones(texts.shape[:-1]))


def _latteclip_no_prototype_update(monkeypatch):
    monkeypatch.setattr(latteclip, "update_prototypes", lambda prototypes, t_bar, labels: prototypes.clone())


def _latteclip_second_momentum(monkeypatch):
    real = latteclip.update_prototypes
    monkeypatch.setattr(latteclip, "update_prototypes", lambda prototypes, t_bar, labels: torch.nn.functional.normalize(
        0.99 * prototypes + 0.01 * real(prototypes, t_bar, labels), dim=-1))


def _latteclip_prototypes_not_carried(monkeypatch):
    real = latteclip.latteclip_step

    def step(image_embeddings, encode_texts, bank, indices, zero_shot_labels, prototypes, *rest):
        loss, _, stats = real(image_embeddings, encode_texts, bank, indices, zero_shot_labels, prototypes, *rest)
        return loss, prototypes, stats

    monkeypatch.setattr(latteclip, "latteclip_step", step)


# --- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sabotage:
    breaks: str  # the mechanism, and how it is broken
    check: Callable[[Path], object]  # the behavioural check that must then fail
    apply: Callable[[pytest.MonkeyPatch], None]
    fails_with: str  # a regex of that check's failure message


SABOTAGES = [
    Sabotage("prompt tuning: the patch embedding (conv1) left trainable",
             tuning_trains_only_named_tensors, _also_trainable(lambda m: [m.encoder.visual.conv1.weight]),
             "trained outside the named tensors"),
    Sabotage("prompt tuning: the whole vision tower left trainable",
             tuning_trains_only_named_tensors, _also_trainable(lambda m: list(m.encoder.visual.parameters())),
             "trained outside the named tensors"),
    Sabotage("checkpoint: every tensor saved, not only the trainable ones",
             tuning_checkpoint_reloads_exactly, _checkpoint_of_every_tensor, "checkpoint tensors: extra"),
    Sabotage("checkpoint: reload skips the LayerNorm tensors",
             tuning_checkpoint_reloads_exactly, _reload_skips_layer_norms, "reloaded classifier differs"),
    Sabotage("checkpoint: saved in bf16",
             tuning_checkpoint_reloads_exactly, _checkpoint_in_bf16, "checkpoint dtypes"),
    Sabotage("NoLA tuning: the pseudo-labeller fed the strong view",
             nola_labeller_sees_weak_views, _labeller_fed_the_strong_view, "no weak augmentation makes"),
    Sabotage("prompt tuning: the pseudo-labeller ignored (the model labels itself)",
             tuning_follows_the_labeller, _tuning_labels_with_the_model_being_tuned, "are predicted as it"),
    Sabotage("NoLA tuning: the DL labeller ignored (the model labels itself), on the NoLA toy world",
             nola_stages_beat_the_cde, _tuning_labels_with_the_model_being_tuned, r"\+ 0\.2\)"),  # tuned > CDE + 0.20
    Sabotage("top-k: no confidence filter (every image takes its argmax)",
             top_k_beats_zero_shot,
             _top_k_without_a_confidence_filter, "top-k precision"),
    Sabotage("top-k: ranked by a saturating softmax, not log-odds",
             top_k_ranks_by_log_odds, _saturating_softmax_ranking, "top-k picks"),
    Sabotage("top-k: class c ranks every image, also those whose first choice is another class",
             top_k_ranks_first_choices_only,
             _top_k_ranked_by_all_images, r"assert tensor\(\d+\) == \d+"),
    Sabotage("DL network: the optimiser never steps (lr 0)",
             dl_network_beats_zero_shot, _dl_network_not_stepping,
             "DL network accuracy"),
    Sabotage("DL network: trained on shuffled pseudo-labels",
             dl_network_beats_zero_shot, _dl_network_on_shuffled_labels,
             "DL network accuracy"),
    Sabotage("NoLA pseudo-labels: ids taken in list order, not from the selected rows",
             pseudo_labels_by_id,
             _pseudo_label_ids_in_order_of_the_list, "pseudo-labels by id"),
    Sabotage("NoLA pseudo-labels: labels reordered (sorted by class) against their ids",
             pseudo_labels_by_id,
             _pseudo_labels_sorted_by_class, "pseudo-labels by id"),
    Sabotage("top-k report: precision pairs each label with another image's id",
             selection_report_counts_by_id, _report_pairs_labels_with_reversed_ids, "counted by id"),
    Sabotage("ONNX: onnx_max_abs_difference reports 0 whatever the models do",
             onnx_export_and_reported_difference, _onnx_difference_reported_as_zero, "reported 0.0, measured"),
    Sabotage("ONNX: the exported graph holds other tensors than the classifier",
             onnx_export_and_reported_difference, _onnx_of_other_tensors, "ONNX logits differ"),
    Sabotage("artifact writes: in place, not through a renamed temporary file",
             artifact_writes_are_atomic, _writes_in_place, "did not fail the write"),
    Sabotage("label-free: three ground-truth labels nudge the CDE classifier by 1e-3",
             labels_never_reach_the_cde, _labels_nudge_the_cde, "cde: classifier depends on the labels"),
    Sabotage("deployment: GPU assets lose their dagster-k8s pod tags",
             gpu_asset_requests_a_gpu_pod, _gpu_assets_without_pod_tags, "no dagster-k8s/config tag"),
    Sabotage("NoLA optimiser: weight decay on biases too",
             bias_weight_decay_and_constant_lr, _decay_on_biases, r"bias': 0\.01\} != \{'[^']*bias': 0\.0\}"),
    Sabotage("NoLA schedule: cosine instead of the reference's constant learning rate",
             bias_weight_decay_and_constant_lr, _cosine_schedule, r"all\("),
    Sabotage("NoLA head: 100 · cosine instead of the CDE adapter on the unnormalised feature",
             tuned_head_is_the_cde_adapter, _head_on_normalised_features_at_scale_100, "method allclose"),
    Sabotage("strong view: perspective distortion 0.5, not the reference's 0.2",
             strong_view_is_the_reference, _strong_view_perspective_0_5, "RandomPerspective"),
    Sabotage("evaluation: each split scores every labelled image (a blend)",
             splits_scored_apart, _evaluation_blends_the_splits, r"assert \(?10 == 6"),
    Sabotage("descriptions: a line without the class name is kept as written",
             descriptions_name_their_class, _descriptions_not_prefixed, "bag: It is often shown flat"),
    Sabotage("LaFTer: the pseudo-labeller follows the head being trained",
             lafter_labeller_stays_frozen, _lafter_labeller_follows_the_student, r"== 0\.0$"),
    Sabotage("LatteCLIP: the Dynamic Feature Mixer off (equal text weights)",
             latteclip_prototypes_reach_their_target, _latteclip_mixer_off, "final_cosine"),
    Sabotage("LatteCLIP: the prototype update removed from the step",
             latteclip_prototypes_reach_their_target, _latteclip_no_prototype_update,
             "final_cosine"),
    Sabotage("LatteCLIP: a second momentum (0.99) on top of the prototype update",
             latteclip_prototypes_reach_their_target, _latteclip_second_momentum,
             "final_cosine"),
    Sabotage("LatteCLIP: the loop drops the updated prototypes between steps",
             latteclip_prototypes_reach_their_target, _latteclip_prototypes_not_carried,
             "final_cosine"),
]


@pytest.mark.parametrize("sabotage", SABOTAGES, ids=[s.breaks for s in SABOTAGES])
def test_the_check_catches_the_sabotage(sabotage, monkeypatch, tmp_path):
    sabotage.apply(monkeypatch)
    with pytest.raises(AssertionError, match=sabotage.fails_with):
        sabotage.check(tmp_path)


CHECKS = list({id(s.check): s for s in SABOTAGES}.values())


@pytest.mark.parametrize("sabotage", CHECKS, ids=[f"check of: {s.breaks}" for s in CHECKS])
def test_every_check_passes_unbroken(sabotage, tmp_path):
    sabotage.check(tmp_path)
