"""How long a run may take: the `dagster/max_runtime` tag, from a time limit per asset group.

A run's limit is the sum of the limits of the asset groups it materializes (its steps run one
after another, the GPU-bound ones through the single `gpu` slot). Run monitoring (the daemon, in
every instance file) fails a run past its limit and, `free_slots_after_run_end_seconds` later,
frees its pool slots, so a hung DDP/NCCL step never holds the `gpu` slot for ever. Each group's
limit is `NOLA_MAX_RUNTIME_SECONDS_<GROUP>` (e.g. `NOLA_MAX_RUNTIME_SECONDS_PROMPT_TUNING=7200`),
else its default below, sized for the paper profile on one GPU with room to spare; 0 for every
group removes the tag (no limit but the instance's own `max_runtime_seconds`, if any).
"""

import os
from typing import Collection, Mapping, Sequence

from dagster import AssetKey, AssetsDefinition
from dagster._core.storage.tags import MAX_RUNTIME_SECONDS_TAG

HOUR = 3600
MAX_RUNTIME_SECONDS = {
    "dataset": 1 * HOUR,
    "text_classifier": 1 * HOUR,
    "image_features": 4 * HOUR,
    "alignment": 2 * HOUR,
    "prompt_tuning": 12 * HOUR,
    "results": 2 * HOUR,
    "methods": 12 * HOUR,
    "export": 1 * HOUR,
}
OTHER_GROUP_SECONDS = 1 * HOUR  # a group not listed above


def group_max_runtime_seconds(group: str, env: Mapping[str, str] = os.environ) -> int:
    raw = env.get(f"NOLA_MAX_RUNTIME_SECONDS_{group.upper()}", "").strip()
    return int(raw) if raw else MAX_RUNTIME_SECONDS.get(group, OTHER_GROUP_SECONDS)


def max_runtime_tags(assets: Sequence[AssetsDefinition], selection: Collection[AssetKey] | None = None,
                     env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`{"dagster/max_runtime": seconds}` for a run of `selection` (None: all of `assets`)."""
    groups = {group for definition in assets for key, group in definition.group_names_by_key.items()
              if selection is None or key in selection}
    seconds = sum(group_max_runtime_seconds(group, env) for group in groups)
    return {MAX_RUNTIME_SECONDS_TAG: str(seconds)} if seconds else {}
