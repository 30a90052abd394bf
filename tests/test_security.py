"""Model files load only through safetensors or torch.load(weights_only=True)."""

import pickle

import pytest
import torch

from nola_core.models import ModelConfig, UnsafeCheckpointError, load_clip, load_dino


class _Exploit:
    """Unpickling this runs `open(marker, "w")`: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("which", ["clip", "dino"])
def test_a_pickle_that_runs_code_on_load_is_refused(tmp_path, which):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "model.pt"
    with open(checkpoint, "wb") as handle:
        pickle.dump({"state_dict": _Exploit(marker)}, handle)
    config = ModelConfig.from_profile("tiny", **{f"{which}_checkpoint": str(checkpoint)})
    loader = load_clip if which == "clip" else load_dino
    with pytest.raises(UnsafeCheckpointError, match=f"{checkpoint}: refused.*safetensors"):
        loader(config)
    assert not marker.exists(), "the checkpoint's code ran"


def test_plain_state_dicts_still_load_with_weights_only(tmp_path):
    clip = load_clip(ModelConfig.from_profile("tiny"))
    path = tmp_path / "clip.pt"
    torch.save(clip.model.state_dict(), path)
    assert torch.equal(load_clip(ModelConfig.from_profile("tiny", clip_checkpoint=str(path))).model.visual.proj,
                       clip.model.visual.proj)
