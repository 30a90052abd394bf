"""Class descriptions from any provider, cached per class, with provenance.

`describe_classes(classes, provider=..., prompt_set=..., domain=..., count=..., cache_dir=...)`
returns a `DescriptionSet`: `descriptions` (class → sentences, the plain mapping the CDE
classifier takes), `provenance`, and `content_hash` for downstream cache keys.

With a chat provider each class gets every question of the prompt set, each asking for `count`
one-line answers; answers are cleaned (see `clean.py`) and a class left with nothing usable
fails with its name. With `cache_dir`, each class's exchange is written as soon as it is done,
as a pretty JSON file keyed by sha256 over provider, model, prompt-set hash, class name, domain
(when the questions use it), count, temperature and max_tokens; it holds the prompts, the raw
answers and the provenance, so a team can commit the folder and rerun offline. Cached answers
are re-cleaned on load, so changing `CleanRules` (word limits, the class-name prefix) costs no
request. Cleaning prepends "{class}: " to a line that does not name its class (on by default,
`CleanRules.prefix_class_name`); `provenance["class_name_prefixed"]` counts those lines per class.
Descriptions from a file are used as written (see `_from_file`). A failure stops new requests
and raises `DescriptionError` naming the class; the classes already done stay cached, so a
rerun asks only for the others.

Files: `load_descriptions(path)` reads a plain JSON/YAML mapping or a saved `DescriptionSet`
(`DescriptionSet.save(path)`, format `nola.descriptions/1`).
`describe_image(provider, image, prompt)` is LatteCLIP's per-image / per-group text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .clean import CleanRules, clean_answer, dedupe, prefix_unnamed_lines
from .prompts import DEFAULT_PROMPT_SET, PromptSet, load_prompt_set, sha256_hex
from .providers import (
    ChatProvider,
    FileProvider,
    ImageInput,
    LLMError,
    Provider,
    TemplatesProvider,
    image_bytes,
)

log = logging.getLogger(__name__)

FORMAT = "nola.descriptions/1"
CACHE_FORMAT = "nola.llm-cache/1"


class DescriptionError(LLMError):
    """A class (named in the message) got no usable descriptions."""


@dataclass(frozen=True)
class DescriptionSet:
    """Descriptions per class plus where they came from. Treat as read-only."""

    descriptions: dict[str, list[str]]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON of `descriptions` only: provenance (dates) never
        changes downstream cache keys, the texts always do."""
        return sha256_hex(self.descriptions)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "content_hash": self.content_hash,
            "provenance": self.provenance,
            "descriptions": self.descriptions,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        _write_json(path, self.to_json())
        return path


def _write_json(path: Path, obj: Any) -> None:
    """Pretty, UTF-8, atomic (temporary file + rename): a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as tmp:
        json.dump(obj, tmp, indent=2, ensure_ascii=False)
        tmp.write("\n")
    os.replace(tmp.name, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_description_set(path: str | Path) -> DescriptionSet:
    """Read a saved `DescriptionSet` (provenance kept) or a plain mapping class → list of
    sentences (a single string is one sentence), from JSON or YAML."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {exc}") from exc
    provenance: dict[str, Any] = {"source": str(path)}
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        raw, provenance = raw.get("descriptions"), raw.get("provenance") or {}
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a non-empty mapping of class name to descriptions")
    descriptions = {}
    for name, values in raw.items():
        values = [values] if isinstance(values, str) else values
        if not isinstance(name, str) or not name.strip() or not isinstance(values, list):
            raise ValueError(f"{path}: class {name!r}: expected a class name and a list of sentences")
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{path}: class {name!r}: every description must be a string")
        descriptions[name] = dedupe(v.strip() for v in values if v.strip())
        if not descriptions[name]:
            raise ValueError(f"{path}: class {name!r} has no description")
    return DescriptionSet(descriptions, provenance)


def load_descriptions(path: str | Path) -> dict[str, list[str]]:
    """The plain mapping the CDE classifier takes, from any file `load_description_set` reads."""
    return load_description_set(path).descriptions


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text, flags=re.ASCII).strip("._")[:60] or "x"


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry.get("format") == CACHE_FORMAT and entry.get("key") == key:
            return entry
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring unreadable cache file %s: %s", path, exc)
    return None


def _usable(answers: Sequence[str], rules: CleanRules, class_name: str) -> tuple[list[str], int]:
    """The cleaned lines of one class's answers, and how many got the class name prepended."""
    lines = dedupe(line for answer in answers for line in clean_answer(answer, rules))
    if not lines:
        raise LLMError(
            f"no usable description: all {len(answers)} answers were empty, refusals or outside "
            f"{rules.min_words}-{rules.max_words} words"
        )
    return prefix_unnamed_lines(lines, class_name) if rules.prefix_class_name else (lines, 0)


def _check_classes(classes: Sequence[str]) -> list[str]:
    classes = list(classes)
    if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise ValueError(f"classes must be a non-empty list of non-blank names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names: {sorted({c for c in classes if classes.count(c) > 1})}")
    return classes


def describe_classes(
    classes: Sequence[str],
    *,
    provider: Provider,
    prompt_set: str | Path = DEFAULT_PROMPT_SET,
    domain: str | None = None,
    count: int = 10,
    temperature: float | None = None,
    max_tokens: int = 1024,
    cache_dir: str | Path | None = None,
    concurrency: int = 4,
    rules: CleanRules = CleanRules(),
    prompts_dir: str | Path | None = None,
) -> DescriptionSet:
    """Descriptions for `classes` (in their order) from `provider`.

    `count` is the number of answers asked per question (CuPL samples 10). `temperature` None
    leaves sampling to the model (1.0 for current OpenAI models, near CuPL's 0.99); set it only
    for providers with `supports_temperature` (Anthropic's Messages API takes none).
    `concurrency` bounds the classes asked at once.
    """
    classes = _check_classes(classes)
    if isinstance(provider, FileProvider):
        return _from_file(classes, provider.path)
    prompts = load_prompt_set(prompt_set, prompts_dir)
    if isinstance(provider, TemplatesProvider):
        return DescriptionSet(
            {c: prompts.render_templates(c, domain) for c in classes},
            {
                "provider": provider.name,
                "model": None,
                "prompt_set": prompts.name,
                "prompt_set_hash": prompts.hash,
                "domain": prompts.domain(domain),
                "templates": prompts.templates,
            },
        )
    return _from_llm(
        classes, provider, prompts, domain, count, temperature, max_tokens,
        Path(cache_dir) if cache_dir is not None else None, concurrency, rules,
    )


def _from_file(classes: list[str], path: Path) -> DescriptionSet:
    """The file's texts as written: no class-name prefix. A file is a set someone chose (the
    reference's own JSON files, which it embeds unchanged; CuPL's; a saved `DescriptionSet`, already
    cleaned when it was made), and its content hash must stay the hash of what was committed."""
    source = load_description_set(path)
    missing = [c for c in classes if c not in source.descriptions]
    if missing:
        raise DescriptionError(f"{path} has no descriptions for classes {missing}")
    return DescriptionSet(
        {c: source.descriptions[c] for c in classes},
        {
            "provider": "file",
            "model": None,
            "source": str(path),
            "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "source_provenance": source.provenance,
        },
    )


def _from_llm(
    classes: list[str],
    provider: ChatProvider,
    prompts: PromptSet,
    domain: str | None,
    count: int,
    temperature: float | None,
    max_tokens: int,
    cache_dir: Path | None,
    concurrency: int,
    rules: CleanRules,
) -> DescriptionSet:
    if temperature is not None and not provider.supports_temperature:
        raise ValueError(f"the {provider.name} provider takes no temperature; leave it None")
    settings = {
        "provider": provider.name,
        "model": provider.model,
        "prompt_set": prompts.name,
        "prompt_set_hash": prompts.hash,
        "domain": prompts.domain(domain) if prompts.questions_use_domain else None,
        "count": count,
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    keys = {c: sha256_hex({**settings, "class_name": c}) for c in classes}
    paths = {c: cache_dir / f"{_slug(c)}.{keys[c][:16]}.json" for c in classes} if cache_dir else {}
    entries = {c: e for c in paths if (e := _read_cache(paths[c], keys[c])) is not None}
    from_cache = [c for c in classes if c in entries]
    missing = [c for c in classes if c not in entries]
    log.info("descriptions: %d classes cached, asking %s for %d", len(entries), provider.name, len(missing))

    questions = {c: prompts.render_questions(c, domain, count) for c in missing}
    failed = threading.Event()  # after one failure, classes not yet started are skipped

    def ask(class_name: str) -> dict[str, Any] | None:
        if failed.is_set():
            return None
        try:
            exchanges = [
                {
                    "prompt": prompt,
                    "answer": provider.complete(
                        prompt, system=prompts.system, temperature=temperature, max_tokens=max_tokens
                    ),
                }
                for prompt in questions[class_name]
            ]
            descriptions, _ = _usable([e["answer"] for e in exchanges], rules, class_name)
        except Exception:
            failed.set()
            raise
        entry = {
            "format": CACHE_FORMAT,
            "key": keys[class_name],
            "class_name": class_name,
            "provenance": {**settings, "base_url": provider.base_url, "system": prompts.system, "created": _now(),
                           "prefix_class_name": rules.prefix_class_name},
            "descriptions": descriptions,
            "exchanges": exchanges,
        }
        if cache_dir is not None:
            _write_json(paths[class_name], entry)
        return entry

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {c: pool.submit(ask, c) for c in missing}
    errors = {c: f.exception() for c, f in futures.items() if f.exception() is not None}
    entries.update((c, f.result()) for c, f in futures.items() if c not in errors and f.result() is not None)
    if errors:
        name, error = next(iter(errors.items()))
        if not isinstance(error, LLMError):
            raise error
        kept = (
            f"{len(entries)} of {len(classes)} classes are cached in {cache_dir}; a rerun asks only for the others"
            if cache_dir is not None
            else "no cache_dir was given, so finished classes are not kept"
        )
        also = f"; also failed: {list(errors)[1:]}" if len(errors) > 1 else ""
        raise DescriptionError(f"class {name!r}: {error} ({kept}{also})",
                               transient=all(getattr(e, "transient", True) for e in errors.values())) from error

    descriptions, prefixed = {}, {}
    for c in classes:
        try:
            descriptions[c], prefixed[c] = _usable([e["answer"] for e in entries[c]["exchanges"]], rules, c)
        except LLMError as exc:
            raise DescriptionError(f"class {c!r} (cached in {paths.get(c)}): {exc}") from exc
    return DescriptionSet(
        descriptions,
        {
            **settings,
            "base_url": provider.base_url,
            "created": _now(),
            "system": prompts.system,
            "instruction": prompts.content.get("instruction"),
            "questions": prompts.questions,
            "cache_keys": keys,
            "from_cache": from_cache,
            "prefix_class_name": rules.prefix_class_name,
            "class_name_prefixed": prefixed,
        },
    )


def describe_image(
    provider: ChatProvider,
    image: ImageInput | Sequence[ImageInput],
    prompt: str,
    *,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int = 300,
    rules: CleanRules = CleanRules(min_words=1),
    cache_dir: str | Path | None = None,
) -> str:
    """One description of one image, or of several shown together (LatteCLIP's group text).

    Render `prompt` with `PromptSet.render_image_prompt`. The answer is cleaned like class
    descriptions (one-word minimum: "Industrial factory" is a fine group text) and joined into
    one line; a refusal or empty answer raises `LLMError`. With `cache_dir`, answers are cached
    by the images' sha256 together with provider, model, prompt and sampling settings.
    """
    images = [image] if isinstance(image, (str, bytes, bytearray, os.PathLike)) else list(image)
    data = [image_bytes(i) for i in images]
    digests = [hashlib.sha256(d).hexdigest() for d in data]
    settings = {
        "provider": provider.name,
        "model": provider.model,
        "prompt": prompt,
        "system": system,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "images_sha256": digests,
    }
    key = sha256_hex(settings)
    path = Path(cache_dir) / f"image.{digests[0][:12]}.{key[:16]}.json" if cache_dir is not None else None
    cached = _read_cache(path, key) if path is not None else None
    if cached is not None:
        answer = cached["answer"]
    else:
        answer = provider.complete(prompt, system=system, images=data, temperature=temperature, max_tokens=max_tokens)
    lines = clean_answer(answer, rules)
    if not lines:
        raise LLMError(f"{provider.name} {provider.model} gave no usable image description: {answer[:120]!r}")
    if path is not None and cached is None:
        provenance = {**settings, "base_url": provider.base_url, "created": _now()}
        entry = {"format": CACHE_FORMAT, "key": key, "provenance": provenance, "answer": answer}
        _write_json(path, {**entry, "description": " ".join(lines)})
    return " ".join(lines)
