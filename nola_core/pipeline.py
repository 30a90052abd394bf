"""Former home of NoLA's recipe, kept only as re-exports while callers move (no logic here).

NoLA: `nola_core.methods.nola`; dataset loading and features: `nola_core.data.loading`; a
dataset's texts: `nola_core.text.dataset`; shared scoring: `nola_core.predictions`; stage
names: `nola_core.stage_names`.
"""

from nola_core.data.loading import evaluation_records, image_features, load_dataset, training_ids, tuned_image_features
from nola_core.eval import RANDOM_MODEL_NOTE
from nola_core.methods.nola import (
    NolaConfig,
    NolaResult,
    apply_wiseft,
    build_prompt_classifier,
    cde_pseudo_labels,
    dino_pseudo_labeller,
    fixed_pseudo_labels,
    nola_stage_outputs,
    nola_tuning_config,
    run_nola,
    stage_predictions,
    tune_prompts,
    tuning_views,
)
from nola_core.predictions import (
    cosine_probabilities,
    cosine_top_classes,
    dl_network_probabilities,
    dl_network_top_classes,
    prediction_table,
    tuned_head_probabilities,
    tuned_head_top_classes,
)
from nola_core.stage_names import CDE_STAGE, ZERO_SHOT_STAGE
from nola_core.stage_names import NOLA_TUNED_STAGE as TUNED_STAGE
from nola_core.text.dataset import resolve_descriptions, text_checks, text_classifiers
