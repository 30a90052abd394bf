"""One builder makes every artifact key (`nola_assets.common.artifact_key`, behind `allocate_or_reuse`).

The key must hold everything that changes an artifact's content, each fact once: a name given by
two parts would silently drop one fact, so it is an error. Keys are flat and named as before the
builder existed, so existing artifacts keep their digests (measured: every asset reused over an
artifact root written before the builder).
"""

import dataclasses

import pytest
import torch

from nola_core.alignment import AlignmentConfig
from nola_core.data import REDUCED_JPEG_DECODE
from nola_core.models import ModelConfig

from nola_assets.artifacts import ArtifactRef
from nola_assets.common import artifact_key, compute_facts

TINY = ModelConfig.from_profile("tiny")


def _ref(digest: str) -> ArtifactRef:
    return ArtifactRef(asset="upstream", dataset="ds", digest=digest, path="/nowhere")


def test_the_key_holds_every_part_under_its_name():
    key = artifact_key("3", upstream={"cde": _ref("c0de"), "manifest": _ref("f00d")}, clip=TINY, dino=TINY,
                       compute=compute_facts(torch.device("cpu"), "bf16", reads_images=True),
                       config=AlignmentConfig(), k=16)
    assert key == {
        "cde": "c0de", "manifest": "f00d",
        "clip": TINY.clip_identity(), "dino": TINY.dino_identity(),
        "device_type": "cpu", "precision": "bf16", "decode": REDUCED_JPEG_DECODE,
        "config": dataclasses.asdict(AlignmentConfig()), "k": 16,
        "code_version": "3",
    }


def test_compute_facts_name_only_what_the_step_depends_on():
    assert compute_facts(torch.device("cpu")) == {"device_type": "cpu"}  # no images read, no features extracted
    assert compute_facts(torch.device("cpu"), reads_images=True) == {"device_type": "cpu", "decode": REDUCED_JPEG_DECODE}


@pytest.mark.parametrize("parts", [
    {"upstream": {"clip": _ref("a")}, "clip": TINY},
    {"compute": {"device_type": "cpu"}, "device_type": "cuda"},
    {"upstream": {"code_version": _ref("a")}},
])
def test_a_name_given_twice_is_refused(parts):
    with pytest.raises(ValueError, match="given twice"):
        artifact_key("1", **parts)
