"""Two CPU processes (gloo) give the same features and the same tuned tensors as one process.

Tolerances: features are stored in float16 and may differ by float rounding between batch
compositions (each rank encodes other batches): max |difference| <= 2e-3. Trained tensors:
every optimizer step sees the same images with the same augmentations whatever the split;
only the summation order of the gradient differs, so after two epochs of AdamW
max |difference| <= 1e-5 (the learning rate is 1e-2; measured 6e-8).
"""

import copy

import pytest
import torch

from nola_core.data import MultiView, build_manifest, eval_transform, load_dataset_spec, strong_transform, weak_transform
from nola_core.demo import demo_dataset_path
from nola_core.distributed import (
    DistributedContext,
    extract_features_distributed,
    init_distributed,
    launch,
    shard_positions,
)
from nola_core.features import FeatureConfig, extract_features, load_feature_table
from nola_core.models import ModelConfig, PromptTunedClassifier, load_clip, load_dino
from nola_core.runtime import ComputeSettings
from nola_core.tuning import TuningConfig, epoch_plan, train_prompts

FEATURE_TOLERANCE = 2e-3
TRAINED_TOLERANCE = 1e-5  # measured: 6e-8 on the 2-core CPU
NUM_IMAGES = 21  # odd: the last step splits unevenly over two ranks


def _first_pixel_labels(weak: torch.Tensor) -> torch.Tensor:
    """A deterministic pseudo-labeller standing in for the DL network (4 classes)."""
    return (weak[:, 0, 0, 0] * 1000).long().remainder(4)


def _features_and_tuning(context: DistributedContext, root, records, cde, output):
    tiny = ModelConfig.from_profile("tiny")
    dino = load_dino(tiny)
    table = extract_features_distributed(dino.encode_image, root, records, eval_transform(dino.preprocess),
                                         FeatureConfig(batch_size=4,
                                                       compute=ComputeSettings(num_workers=0)), context, output,
                                         module=dino.model)
    clip = load_clip(tiny)
    classifier = PromptTunedClassifier(copy.deepcopy(clip.visual), cde, num_prompts=4)
    views = MultiView((weak_transform(clip.preprocess), strong_transform(clip.preprocess)))
    config = TuningConfig(epochs=2, batch_size=8, micro_batch_size=2, lr=1e-2, seed=5,
                          compute=ComputeSettings(num_workers=0))
    history = train_prompts(classifier, root, records, views, _first_pixel_labels, config, context.device,
                            distributed=context)
    return table, classifier.trainable_state_dict(), [(s.images, s.loss) for s in history]


@pytest.fixture(scope="module")
def inputs():
    spec = load_dataset_spec(demo_dataset_path())
    records = list(build_manifest(spec, "unlabeled").records[:NUM_IMAGES])
    cde = torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    return spec.root, records, cde


def test_two_gloo_processes_match_one_process(inputs, tmp_path):
    root, records, cde = inputs
    single = _features_and_tuning(init_distributed("cpu"), root, records, cde, tmp_path / "one.safetensors")
    output = tmp_path / "two.safetensors"
    table, trained, history = launch(_features_and_tuning, 2, root, records, cde, output, device="cpu",
                                     backend="gloo")

    assert table.ids == single[0].ids == tuple(r.image_id for r in records)
    assert load_feature_table(output).ids == table.ids  # the merged store file, in record order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]  # shards gone
    assert table.features.dtype == torch.float16
    assert (table.features.float() - single[0].features.float()).abs().max() <= FEATURE_TOLERANCE
    assert set(trained) == set(single[1])
    for name, tensor in trained.items():
        assert (tensor - single[1][name]).abs().max() <= TRAINED_TOLERANCE, name
    assert [images for images, _ in history] == [NUM_IMAGES, NUM_IMAGES]  # every image once per epoch
    assert [loss for _, loss in history] == pytest.approx([loss for _, loss in single[2]], rel=1e-4)


def _local_world_size(context: DistributedContext) -> int:
    return context.local_world_size


def test_each_rank_knows_how_many_ranks_share_its_node():
    """`launch` (like torchrun) tells each rank LOCAL_WORLD_SIZE; `init_distributed` is where it is
    read, and the loops take it from the context to share the CPUs (`runtime.cpu_thread_budget`)."""
    assert launch(_local_world_size, 2, device="cpu", backend="gloo") == 2
    assert launch(_local_world_size, 1, device="cpu") == 1


def test_shards_and_step_plans_partition_the_data():
    contexts = [DistributedContext(rank, 3, rank, torch.device("cpu")) for rank in range(3)]
    shards = [shard_positions(10, c) for c in contexts]
    assert sorted(p for shard in shards for p in shard) == list(range(10))
    single = epoch_plan(23, 8, 2, seed=1, epoch=4)
    split = [epoch_plan(23, 8, 2, seed=1, epoch=4, rank=r, world_size=3) for r in range(3)]
    for step, (count, batches) in enumerate(single):
        mine = [key for plan in split for key in (k for b in plan[step][1] for k in b)]
        assert sorted(mine) == sorted(k for b in batches for k in b)  # same images, same seeds
        assert all(plan[step][0] == count for plan in split)
    assert epoch_plan(23, 8, 2, seed=1, epoch=5) != single  # a new order every epoch


def test_single_process_extraction_equals_plain_extraction(inputs, tmp_path):
    root, records, _ = inputs
    dino = load_dino(ModelConfig.from_profile("tiny"))
    config = FeatureConfig(batch_size=8, compute=ComputeSettings(num_workers=0))
    plain = extract_features(dino.encode_image, root, records[:6], eval_transform(dino.preprocess), config, "cpu")
    same = extract_features_distributed(dino.encode_image, root, records[:6], eval_transform(dino.preprocess),
                                        config, init_distributed("cpu"), tmp_path / "features.safetensors")
    assert same.ids == plain.ids and torch.equal(same.features, plain.features)



def _features_only(context: DistributedContext, root, records, output):
    dino = load_dino(ModelConfig.from_profile("tiny"))
    return extract_features_distributed(dino.encode_image, root, records, eval_transform(dino.preprocess),
                                        FeatureConfig(batch_size=3,
                                                      compute=ComputeSettings(num_workers=0)), context, output,
                                        module=dino.model).failed


def test_an_unreadable_image_in_one_shard_is_reported_once_and_the_rest_merged_in_order(inputs, tmp_path):
    root, records, _ = inputs
    copy_root = tmp_path / "data"
    for record in records[:9]:
        (copy_root / record.path).parent.mkdir(parents=True, exist_ok=True)
        (copy_root / record.path).write_bytes((root / record.path).read_bytes())
    (copy_root / records[4].path).write_bytes(b"not an image")  # rank 0's share: records 0, 2, 4, ...
    failed = launch(_features_only, 2, copy_root, records[:9], tmp_path / "two.safetensors", device="cpu",
                    backend="gloo")
    _features_only(init_distributed("cpu"), copy_root, records[:9], tmp_path / "one.safetensors")
    two, one = load_feature_table(tmp_path / "two.safetensors"), load_feature_table(tmp_path / "one.safetensors")
    assert failed == two.failed == one.failed == (records[4].image_id,)
    assert two.ids == one.ids == tuple(r.image_id for i, r in enumerate(records[:9]) if i != 4)
    assert (two.features.float() - one.features.float()).abs().max() <= FEATURE_TOLERANCE
