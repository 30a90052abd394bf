"""Every stage name of every method, defined once.

A stage name is a row of the evaluation table (`nola_core.eval.STAGE_SCHEMA`), a key of
`methods.nola.stage_predictions`, and what the checks, the export gate and the report look up;
they all import these constants instead of retyping the text.
"""

# Shared baselines: the zero-shot and CDE methods, and NoLA's first two scored stages.
ZERO_SHOT_STAGE = "zero-shot (templates)"
CDE_STAGE = "CDE (descriptions)"

# NoLA (`methods.nola`), in the order of its stage table.
NOLA_SELECTION_STAGE = "top-k pseudo-labels"
NOLA_DL_STAGE = "DL network (DINO)"
NOLA_TUNED_STAGE = "NoLA prompt-tuned"
NOLA_TEMPLATES_STAGE = "tuned encoder + templates"

# LaFTer (`methods.lafter`).
LAFTER_TEXT_STAGE = "LaFTer text classifier"
LAFTER_TUNED_STAGE = "LaFTer prompt-tuned"

# LatteCLIP (`methods.latteclip`): its own single-template zero-shot, then the final prototypes.
LATTECLIP_ZERO_SHOT_STAGE = "zero-shot (class template)"
LATTECLIP_FINAL_STAGE = "LatteCLIP prototypes"
