"""The NoLA asset graph, one partition per dataset: every asset, by group.

Each asset is one stage of `nola_core.methods.nola.run_nola`: it calls the same `nola_core`
function, writes what it produced through the artifact store, and returns an `ArtifactRef`
inside a `MaterializeResult` with metadata and a data version. No training maths lives here.
One module per asset group, over `nola_assets.common` (decorator, pool, file names, keys):

    preflight (preflight_asset) ─> dataset_manifest (dataset_assets), class_descriptions

    dataset_manifest ─┬─> clip_features ─┬─> cde_pseudo_labels ─> alignment_checkpoint
                      └─> dino_features ─┘          ^                     │        (alignment_assets)
    class_descriptions ─> cde_classifier ───────────┘      prompt_tuned_encoder (tuning_assets)
          (text_assets)                (feature_assets)                   │
                                                           predictions ─> evaluation (result_assets)

The other methods and `method_comparison` (`method_assets.METHOD_ASSETS`) and the export
(export_assets) build on the same upstream assets.
"""

from nola_assets.alignment_assets import alignment_checkpoint, cde_pseudo_labels
from nola_assets.dataset_assets import dataset_manifest
from nola_assets.feature_assets import clip_features, dino_features
from nola_assets.result_assets import evaluation, predictions
from nola_assets.text_assets import cde_classifier, class_descriptions
from nola_assets.tuning_assets import prompt_tuned_encoder

NOLA_ASSETS = [
    dataset_manifest,
    class_descriptions,
    cde_classifier,
    clip_features,
    dino_features,
    cde_pseudo_labels,
    alignment_checkpoint,
    prompt_tuned_encoder,
    predictions,
    evaluation,
]
IMAGE_DEPENDENT_ASSETS = [a.key for a in NOLA_ASSETS if a not in (class_descriptions, cde_classifier)]
