"""Top-k pseudo-label selection and the DL network on controlled data with known answers."""

import math

import torch
import torch.nn.functional as F

from nola_core.alignment import (
    AlignmentConfig,
    class_log_odds,
    per_class_k,
    predict_alignment,
    select_top_k,
    selection_report,
    train_alignment,
)


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
    # k=3: class 0 picks rows 0,1,2 and class 1 picks rows 3,2,1. Row 2 scores 0.70 for
    # class 1 against 0.30 for class 0, row 1 0.80 against 0.20: each goes to its higher score.
    selection = select_top_k([scores], k=3)
    assert dict(zip(selection.indices.tolist(), selection.labels.tolist())) == {0: 0, 1: 0, 2: 1, 3: 1}
    assert torch.allclose(selection.scores.exp(), torch.tensor([0.90, 0.80, 0.70, 0.95]))
    assert selection.counts == [2, 2]
    assert selection.short_classes == [0, 1]  # both lost an image to the other class


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


def test_top_k_is_more_precise_than_zero_shot_labels():
    _, clip, classifier, labels = _clustered()
    scores = torch.cat(list(class_log_odds(clip, classifier)))
    zero_shot_accuracy = (scores.argmax(-1) == labels).float().mean().item()
    selection = select_top_k([scores], k=per_class_k(len(labels), 5))
    precision = (selection.labels == labels[selection.indices]).float().mean().item()
    assert zero_shot_accuracy < 0.9  # the zero-shot labels are really noisy
    assert precision > zero_shot_accuracy + 0.08
    ids = [f"img{i}" for i in range(len(labels))]
    report = selection_report(selection, list("abcde"), ids, {ids[i]: int(labels[i]) for i in range(len(ids))})
    assert abs(report["precision"] - precision) < 1e-9
    assert sum(report["per_class"].values()) == selection.indices.numel()


def test_dl_network_beats_the_zero_shot_labels_it_learned_from():
    dino, clip, classifier, labels = _clustered(seed=1)
    scores = torch.cat(list(class_log_odds(clip, classifier)))
    zero_shot_accuracy = (scores.argmax(-1) == labels).float().mean().item()
    selection = select_top_k([scores], k=per_class_k(len(labels), 5))
    config = AlignmentConfig(epochs=20, seed=0)
    network, history = train_alignment(dino.half(), selection, config, device="cpu")
    dl_accuracy = (predict_alignment(network, dino.half()).argmax(-1) == labels).float().mean().item()
    assert history[-1] < history[0]
    assert dl_accuracy > zero_shot_accuracy + 0.10, (dl_accuracy, zero_shot_accuracy)


def test_alignment_training_is_deterministic_for_a_seed():
    dino, clip, classifier, _ = _clustered(per_class=50, seed=2)
    selection = select_top_k(class_log_odds(clip, classifier), k=16)
    config = AlignmentConfig(epochs=3, seed=7)
    first, _ = train_alignment(dino, selection, config, device="cpu")
    second, _ = train_alignment(dino, selection, config, device="cpu")
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_alignment_training_runs_within_the_cpu_thread_budget(monkeypatch):
    """Two ranks on a 4-CPU node (LOCAL_WORLD_SIZE, as torchrun sets it): 2 threads while the DL
    network trains, the caller's count after."""
    from nola_core import runtime

    dino, clip, classifier, _ = _clustered(per_class=20, seed=3)
    selection = select_top_k(class_log_odds(clip, classifier), k=16)
    monkeypatch.delenv(runtime.CPU_THREADS_ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(runtime, "available_cpus", lambda: 4)
    threads = []
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        train_alignment(dino, selection, AlignmentConfig(epochs=2), "cpu",
                        progress=lambda *_: threads.append(torch.get_num_threads()))
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)
    assert threads == [2, 2]
