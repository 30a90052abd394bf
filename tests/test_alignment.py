"""Top-k pseudo-label selection and the DL network on controlled data with known answers.

The check functions (`check_*`) are shared with tests/test_sabotage.py, which breaks each
mechanism on purpose and asserts that the check fails; they reach the mechanisms through their
modules (`alignment.select_top_k`, `nola.selection_pseudo_labels`) so that a patch there is seen.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from nola_core import alignment
from nola_core.alignment import (
    AlignmentConfig,
    class_log_odds,
    per_class_k,
    predict_alignment,
    select_top_k,
    selection_report,
    train_alignment,
)
from nola_core.methods import nola
from nola_core.methods.nola import cde_pseudo_labels


def test_k_follows_the_paper_formula():
    assert per_class_k(1000, 10) == 20  # floor(0.2 * 1000 / 10)
    assert per_class_k(100, 10) == 16  # floor gives 2, the minimum 16 wins
    assert per_class_k(1299, 10, k_min=1, k_fraction=0.2) == 25


def test_conflicting_image_keeps_the_class_with_the_higher_score():
    probabilities = torch.tensor(
        [
            [0.90, 0.10],  # row 0: top for class 0 and, with k=2, second for class 1
            [0.80, 0.20],
            [0.30, 0.70],
            [0.05, 0.95],
        ]
    )
    scores = probabilities.log()
    selection = select_top_k([scores], k=2)
    assert selection.indices.tolist() == [0, 1, 2, 3]
    assert selection.labels.tolist() == [0, 0, 1, 1]
    # k=3: each class ranks only the rows whose first choice it is (rows 0,1 and 2,3), so rows
    # 2 and 1 are never candidates of the other class (the conflict case: test_fidelity_nola.py).
    selection = select_top_k([scores], k=3)
    assert dict(zip(selection.indices.tolist(), selection.labels.tolist())) == {0: 0, 1: 0, 2: 1, 3: 1}
    assert torch.allclose(selection.scores.exp(), torch.tensor([0.90, 0.80, 0.70, 0.95]))
    assert selection.counts == [2, 2]
    assert selection.short_classes == [0, 1]  # two candidates of their own each, k = 3


def test_log_odds_match_softmax_and_do_not_saturate():
    logits = torch.tensor([[2.0, 1.0, -1.0], [40.0, 0.0, 0.0], [0.0, 60.0, 59.0]])
    from nola_core.alignment import _log_odds

    expected = torch.empty_like(logits)
    for row in range(3):
        for c in range(3):
            others = torch.cat([logits[row, :c], logits[row, c + 1 :]])
            expected[row, c] = logits[row, c] - others.logsumexp(0)
    assert torch.allclose(_log_odds(logits), expected, atol=1e-5)
    # Softmax rounds this image's top probability to exactly 1.0; its log-odds stay finite.
    assert torch.softmax(logits, -1)[1, 0] == 1.0
    assert abs(_log_odds(logits)[1, 0].item() - (40 - math.log(2))) < 1e-4


def test_fewer_images_than_k_takes_what_there_is():
    selection = select_top_k([torch.tensor([[0.6, 0.4], [0.3, 0.7]]).log()], k=16)
    assert sorted(selection.indices.tolist()) == [0, 1]
    assert selection.short_classes == [0, 1]


def test_streamed_selection_equals_selection_in_one_piece():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5000, 32, generator=generator).half()
    classifier = F.normalize(torch.randn(7, 32, generator=generator), dim=-1)
    whole = select_top_k(class_log_odds(features, classifier, chunk_size=10**6), k=40)
    streamed = select_top_k(class_log_odds(features, classifier, chunk_size=333), k=40)
    assert torch.equal(whole.indices, streamed.indices)
    assert torch.equal(whole.labels, streamed.labels)


def _clustered(num_classes=5, per_class=400, dim=64, seed=0):
    """DINO-like features with clear clusters, and CLIP-like features whose noise varies per image.

    CLIP-side confidence correlates with correctness: images with little noise are both the
    most confident and the most often right, as the top-k heuristic assumes.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    dino_centres = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1) * 4
    dino = dino_centres[labels] + torch.randn(len(labels), dim, generator=generator)
    text_centres = F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)
    noise_scale = torch.rand(len(labels), 1, generator=generator) * 0.9
    clip = text_centres[labels] + noise_scale * torch.randn(len(labels), dim, generator=generator)
    return dino, clip, text_centres, labels


def check_top_k_is_more_precise_than_zero_shot_labels(seed=0):
    """The k most confident images per class are labelled right more often than the zero-shot argmax."""
    _, clip, classifier, labels = _clustered(seed=seed)
    scores = torch.cat(list(class_log_odds(clip, classifier)))
    zero_shot_accuracy = (scores.argmax(-1) == labels).float().mean().item()
    selection = alignment.select_top_k([scores], k=per_class_k(len(labels), 5))
    precision = (selection.labels == labels[selection.indices]).float().mean().item()
    assert zero_shot_accuracy < 0.9  # the zero-shot labels are really noisy
    assert precision > zero_shot_accuracy + 0.08, ("top-k precision", precision, zero_shot_accuracy)
    return selection, labels, precision


def check_selection_report_pairs_labels_with_ids(selection, labels) -> dict:
    """`selection_report`'s precision is the share of selected (image id, label) pairs that match
    the known labels, counted here by id."""
    ids = [f"img{i}" for i in range(len(labels))]
    truth = {ids[i]: int(labels[i]) for i in range(len(ids))}
    report = alignment.selection_report(selection, list("abcde"), ids, truth)
    right = sum(truth[ids[row]] == label for row, label in zip(selection.indices.tolist(), selection.labels.tolist()))
    assert report["precision"] == pytest.approx(right / selection.indices.numel(), abs=1e-9), \
        f"reported precision {report['precision']}, counted by id {right / selection.indices.numel()}"
    return report


def test_top_k_is_more_precise_than_zero_shot_labels():
    selection, labels, precision = check_top_k_is_more_precise_than_zero_shot_labels()
    report = check_selection_report_pairs_labels_with_ids(selection, labels)
    assert report["precision"] == pytest.approx(precision, abs=1e-6)
    assert sum(report["per_class"].values()) == selection.indices.numel()


def check_dl_network_beats_the_zero_shot_labels(seed=1):
    """The DL network, trained on the top-k labels, beats those zero-shot labels on all images."""
    dino, clip, classifier, labels = _clustered(seed=seed)
    scores = torch.cat(list(class_log_odds(clip, classifier)))
    zero_shot_accuracy = (scores.argmax(-1) == labels).float().mean().item()
    selection = select_top_k([scores], k=per_class_k(len(labels), 5))
    config = AlignmentConfig(epochs=20, seed=0)
    network, history = alignment.train_alignment(dino.half(), selection, config, device="cpu")
    dl_accuracy = (predict_alignment(network, dino.half()).argmax(-1) == labels).float().mean().item()
    assert dl_accuracy > zero_shot_accuracy + 0.10, ("DL network accuracy", dl_accuracy, zero_shot_accuracy)
    return history


def test_dl_network_beats_the_zero_shot_labels_it_learned_from():
    history = check_dl_network_beats_the_zero_shot_labels()
    assert history[-1] < history[0]


def _features_at_margins(margins):
    """2-D unit features whose logits under the classifier eye(2) at scale 100 differ by `margins`
    (class 0 minus class 1): 100·(cos θ − sin θ) = margin, i.e. log-odds of class 0 = margin."""
    angles = [math.pi / 4 - math.asin(m / (100 * math.sqrt(2))) for m in margins]
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles]), torch.eye(2)


def check_top_k_ranks_by_log_odds():
    """k=3 of class 0 among margins where softmax rounds every class-0 probability to 1.0 in
    float32: only the log-odds tell 100 from 20, so the ranking itself decides the pick. The
    highest margins sit in the middle, so no tie-break by position (first or last rows) finds them."""
    margins = [20, 25, 100, 90, 80, 30, 35, -50, -60, -70]
    features, classifier = _features_at_margins(margins)
    assert (torch.softmax(100 * features @ classifier.T, -1)[:7, 0] == 1.0).all()  # saturated
    selection = cde_pseudo_labels(features, classifier, AlignmentConfig(k_min=3, k_fraction=0.0))
    picked = {row: label for row, label in zip(selection.indices.tolist(), selection.labels.tolist())}
    assert picked == {2: 0, 3: 0, 4: 0, 7: 1, 8: 1, 9: 1}, f"top-k picks {picked}"
    assert selection.scores.tolist() == pytest.approx([100, 90, 80, 50, 60, 70], abs=0.05)


def test_top_k_ranks_by_log_odds_where_softmax_saturates():
    check_top_k_ranks_by_log_odds()


def check_selected_pseudo_labels_carry_their_image_ids():
    """Known answer: of images a..f (margins below), class 0's two most confident are a and e,
    class 1's are f and b; NoLA's id-keyed pseudo-labels say exactly that. The labels in row
    order (0, 1, 0, 1) are neither sorted nor a palindrome, so a reordering shows."""
    train_ids = ["a", "b", "c", "d", "e", "f"]
    features, classifier = _features_at_margins([90, -80, 10, -10, 80, -90])
    selection = cde_pseudo_labels(features, classifier, AlignmentConfig(k_min=2, k_fraction=0.0))
    pseudo = nola.selection_pseudo_labels(selection, train_ids)
    assert dict(zip(pseudo.ids, pseudo.labels.tolist())) == {"a": 0, "b": 1, "e": 0, "f": 1}, \
        f"pseudo-labels by id: {dict(zip(pseudo.ids, pseudo.labels.tolist()))}"
    assert pseudo.candidates == len(train_ids)


def test_selected_pseudo_labels_carry_their_image_ids():
    check_selected_pseudo_labels_carry_their_image_ids()


def test_alignment_training_is_deterministic_for_a_seed():
    dino, clip, classifier, _ = _clustered(per_class=50, seed=2)
    selection = select_top_k(class_log_odds(clip, classifier), k=16)
    config = AlignmentConfig(epochs=3, seed=7)
    first, _ = train_alignment(dino, selection, config, device="cpu")
    second, _ = train_alignment(dino, selection, config, device="cpu")
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_alignment_training_runs_within_the_cpu_thread_budget(monkeypatch):
    """Two ranks on a 4-CPU node (`processes`, a rank's `DistributedContext.local_world_size`):
    2 threads while the DL network trains, the caller's count after."""
    from nola_core import runtime

    dino, clip, classifier, _ = _clustered(per_class=20, seed=3)
    selection = select_top_k(class_log_odds(clip, classifier), k=16)
    monkeypatch.setattr(runtime, "available_cpus", lambda: 4)
    threads = []
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        train_alignment(dino, selection, AlignmentConfig(epochs=2), "cpu",
                        progress=lambda *_: threads.append(torch.get_num_threads()), processes=2)
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
    assert threads == [2, 2]
