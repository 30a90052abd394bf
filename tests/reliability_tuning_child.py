"""Child process for tests/test_reliability.py: prompt tuning with a resume dir, killable mid-run.

usage: python reliability_tuning_child.py RESUME_DIR|- OUT.safetensors [STALL_AFTER_EPOCH]

Trains the tiny CLIP on the demo dataset (fixed seed); after STALL_AFTER_EPOCH has been saved it
writes `<OUT>.stalled` and sleeps, so the parent can SIGKILL it at a known point.
"""

import copy
import json
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from nola_core.data import MultiView, build_manifest, load_dataset_spec, strong_transform, weak_transform
from nola_core.demo import demo_dataset_path
from nola_core.models import ModelConfig, PromptTunedClassifier, load_clip
from nola_core.runtime import ComputeSettings
from nola_core.text import cde_classifier, get_templates
from nola_core.tuning import TuningConfig, train_prompts

EPOCHS = 4


def main() -> None:
    resume = None if sys.argv[1] == "-" else Path(sys.argv[1])
    out = Path(sys.argv[2])
    stall_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    clip = load_clip(ModelConfig.from_profile("tiny"))
    spec = load_dataset_spec(demo_dataset_path())
    records = build_manifest(spec, "unlabeled").records[:32]
    cde = cde_classifier(clip, spec.classes, get_templates("generic"), {c: [f"a {c} on white."] for c in spec.classes})
    classifier = PromptTunedClassifier(copy.deepcopy(clip.visual), cde, num_prompts=4)
    views = MultiView((weak_transform(clip.preprocess), strong_transform(clip.preprocess)))
    config = TuningConfig(epochs=EPOCHS, batch_size=16, micro_batch_size=16, lr=1e-2, seed=5,
                          compute=ComputeSettings(num_workers=0))
    ran = []

    def progress(stats):
        ran.append(stats.epoch)
        if stats.epoch == stall_after:
            out.with_name(out.name + ".stalled").write_text("", encoding="utf-8")
            time.sleep(600)

    labeller = lambda weak: (weak[:, 0, 0, 0] * 1000).long().remainder(len(spec.classes))  # noqa: E731
    history = train_prompts(classifier, spec.root, records, views, labeller, config, device="cpu",
                            progress=progress, resume_dir=resume)
    save_file({k: v.contiguous() for k, v in classifier.trainable_state_dict().items()}, str(out),
              metadata={"ran": json.dumps(ran), "history": json.dumps([s.epoch for s in history])})


if __name__ == "__main__":
    main()
