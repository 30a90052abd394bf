"""Label-free adaptation methods as composable recipes, sharing the core's components.

Each method is a frozen config dataclass with its paper's defaults plus plain stage functions
with explicit inputs and outputs (what a Dagster asset calls), and a `run_*` that chains them
from the shared inputs (features, text classifiers, descriptions) into a `MethodRun`:

    zero-shot   `zero_shot`:  ZeroShotConfig,  zero_shot_weights → run_zero_shot
    cde         `cde`:        CDEConfig,       cde_weights → run_cde
    lafter      `lafter`:     LaFTerConfig,    lafter_text_set → train_text_classifier →
                                               text_classifier_top_classes, build_lafter_classifier →
                                               tune_lafter → run_lafter
    latteclip   `latteclip`:  LatteCLIPConfig, latteclip_zero_shot, generate_latteclip_texts →
                                               tune_latteclip → latteclip_top_classes → run_latteclip
    nola        `nola`:       NolaConfig,      cde_pseudo_labels → train_alignment → tune_prompts →
                                               stage_predictions → run_nola_method (run_nola: on a folder)

A stage's predictions are each image's top class and its probability (`TopClasses`), scored
chunk by chunk over the (possibly memory-mapped, float16) feature tables: no recipe builds an
[N, C] probability matrix or a float32 copy of a feature table. LaFTer and LatteCLIP write the
embeddings of their tuned encoders to `tuned_output` as they compute them, when given one (the
Dagster assets give one), instead of holding them in RAM.

`evaluation` turns runs into the metrics table (`nola_core.eval`, the only place labels are
read, scores each stage on the transductive and the held-out split); `compare`
runs any subset of the methods over seeds on one dataset folder.
"""

from nola_core.methods.cde import CDEConfig, cde_weights, run_cde
from nola_core.methods.common import MethodRun, PseudoLabels, StageOutput
from nola_core.text import embed_texts
from nola_core.methods.compare import METHOD_NAMES, Comparison, ComparisonConfig, compare_methods
from nola_core.methods.evaluation import (
    EVALUATION_SCHEMA,
    EvaluationLabels,
    evaluate_run,
    evaluate_runs,
    evaluation_path,
    write_evaluation,
)
from nola_core.methods.lafter import (
    LaFTerConfig,
    TextClassifierConfig,
    build_lafter_classifier,
    lafter_config_for,
    lafter_pseudo_labeller,
    lafter_text_set,
    lafter_views,
    run_lafter,
    text_classifier_probabilities,
    text_classifier_top_classes,
    train_text_classifier,
    tune_lafter,
)
from nola_core.methods.latteclip import (
    LatteCLIPConfig,
    LatteTexts,
    class_text_weights,
    dual_pseudo_labels,
    flyp_loss,
    generate_latteclip_texts,
    latteclip_config_for,
    latteclip_groups,
    latteclip_top_classes,
    latteclip_zero_shot,
    mixer_weights,
    update_prototypes,
    prototype_text_embeddings,
    run_latteclip,
    train_latteclip_loop,
    tune_latteclip,
)
from nola_core.methods.nola import run_nola_method, selection_pseudo_labels
from nola_core.methods.zero_shot import ZeroShotConfig, run_zero_shot, zero_shot_weights

__all__ = [
    "CDEConfig",
    "Comparison",
    "ComparisonConfig",
    "EVALUATION_SCHEMA",
    "EvaluationLabels",
    "LaFTerConfig",
    "LatteCLIPConfig",
    "LatteTexts",
    "METHOD_NAMES",
    "MethodRun",
    "PseudoLabels",
    "StageOutput",
    "TextClassifierConfig",
    "ZeroShotConfig",
    "build_lafter_classifier",
    "cde_weights",
    "class_text_weights",
    "compare_methods",
    "dual_pseudo_labels",
    "embed_texts",
    "evaluate_run",
    "evaluate_runs",
    "evaluation_path",
    "flyp_loss",
    "generate_latteclip_texts",
    "lafter_config_for",
    "lafter_pseudo_labeller",
    "lafter_text_set",
    "lafter_views",
    "latteclip_config_for",
    "latteclip_groups",
    "latteclip_top_classes",
    "latteclip_zero_shot",
    "mixer_weights",
    "update_prototypes",
    "prototype_text_embeddings",
    "run_cde",
    "run_lafter",
    "run_latteclip",
    "run_nola_method",
    "run_zero_shot",
    "selection_pseudo_labels",
    "text_classifier_probabilities",
    "text_classifier_top_classes",
    "train_latteclip_loop",
    "train_text_classifier",
    "tune_lafter",
    "tune_latteclip",
    "write_evaluation",
    "zero_shot_weights",
]
