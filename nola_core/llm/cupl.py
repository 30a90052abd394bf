"""Import the CuPL ImageNet descriptions that the `clip-benchmark` package ships.

CuPL (Pratt et al., "What does a platypus look like?", arXiv 2209.03320) asked GPT-3
(text-davinci-002, temperature 0.99, 10 samples per question) to describe each ImageNet class;
LaFTer builds on the same idea. `clip-benchmark` (MIT) redistributes them as
`clip_benchmark/datasets/cupl_prompts.json` = {"imagenet1k": {class name: [sentences]}}
(1.6.2: 998 classes, 150 sentences each; the two duplicated ImageNet names share one entry).
clip-benchmark is not a dependency: `pip install clip-benchmark`, or pass the JSON path.
The raw sentences hold some noise ("#TODO.", "."), so they go through the same cleaning rules
as LLM answers; the number dropped is recorded in the provenance.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

from .clean import CleanRules, clean_lines
from .describe import DescriptionSet

CUPL_FILE = "datasets/cupl_prompts.json"
LICENCE = (
    "Redistributed by clip-benchmark under the MIT licence (Copyright (c) 2022 Mehdi Cherti). "
    "The original CuPL repository (github.com/sarahpratt/CuPL) carries no licence file; the "
    "texts were generated with the OpenAI API. Check both before redistributing them."
)


def find_cupl_file() -> Path:
    """The JSON inside an installed clip-benchmark, without importing the package."""
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "clip-benchmark is not installed: `pip install clip-benchmark`, or pass the path of its "
            f"clip_benchmark/{CUPL_FILE}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / CUPL_FILE


def import_cupl(
    path: str | Path | None = None, *, dataset: str = "imagenet1k", rules: CleanRules = CleanRules()
) -> DescriptionSet:
    """CuPL descriptions as a `DescriptionSet` (save it with `.save(path)` to commit it)."""
    path = Path(path) if path is not None else find_cupl_file()
    raw_bytes = path.read_bytes()
    raw = json.loads(raw_bytes)
    if not isinstance(raw, dict) or not isinstance(raw.get(dataset), dict):
        raise ValueError(f"{path}: expected CuPL's layout {{{dataset!r}: {{class: [sentences]}}}}")
    descriptions, dropped = {}, 0
    for name, sentences in raw[dataset].items():
        kept = clean_lines(sentences, rules)
        dropped += len(sentences) - len(kept)
        if kept:
            descriptions[name] = kept
    try:
        version = importlib.metadata.version("clip-benchmark")
    except importlib.metadata.PackageNotFoundError:
        version = None
    provenance = {
        "provider": "file",
        "model": "text-davinci-002 (GPT-3), via CuPL",
        "source": "CuPL, Pratt et al., arXiv 2209.03320, https://github.com/sarahpratt/CuPL",
        "distributed_by": "clip-benchmark (https://github.com/LAION-AI/CLIP_benchmark)",
        "clip_benchmark_version": version,
        "source_file": str(path),
        "source_sha256": hashlib.sha256(raw_bytes).hexdigest(),
        "dataset": dataset,
        "licence": LICENCE,
        "cleaning": {"min_words": rules.min_words, "max_words": rules.max_words, "dropped_sentences": dropped},
        "classes_without_usable_sentences": sorted(set(raw[dataset]) - set(descriptions)),
    }
    return DescriptionSet(descriptions, provenance)
