"""Versioned prompt sets from `prompts/*.yaml`, and the hash that ties cached answers to them.

A prompt set is one YAML file: `questions` asked of a text LLM per class (slots `{c}`,
`{domain}`), the `instruction` appended to each (slots `{count}`, `{c}`, `{domain}`), an optional
`system` prompt, `templates` for the no-LLM source, and `image` / `group` / `classify` prompts
for a multimodal model. `DEFAULT_PROMPT_SET` is the one used unless another is named. A set's
`hash` is over the parsed content (comments and layout do not count), so editing a question
invalidates every cached answer made with it.

Where the files are found, first match wins: the `prompts_dir` argument (the edges pass the
`NOLA_PROMPTS_DIR` environment variable there: `nola describe` and `DescriptionsResource`; this
module reads no environment), `prompts/` of the source checkout this module lives in (editable
install), `./prompts` in the working directory, then `<sys.prefix>/share/nola/prompts`, where a
wheel (non-editable install) puts its copy of `prompts/`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROMPTS_ENV = "NOLA_PROMPTS_DIR"
DEFAULT_PROMPT_SET = "nola_v2"
"""Class descriptions are asked with this set unless another is named."""
INSTALLED_PROMPTS = Path("share") / "nola" / "prompts"
"""Where a wheel installs `prompts/`, relative to the environment's prefix (pyproject data-files)."""


def canonical_json(obj: Any) -> bytes:
    """One byte string per value, whatever the key order: the basis of every hash here."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def sha256_hex(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


@dataclass(frozen=True)
class PromptSet:
    name: str
    path: Path
    content: dict[str, Any]

    @property
    def hash(self) -> str:
        return sha256_hex(self.content)

    @property
    def questions(self) -> list[str]:
        return list(self.content.get("questions") or [])

    @property
    def templates(self) -> list[str]:
        return list(self.content.get("templates") or [])

    @property
    def system(self) -> str | None:
        return self.content.get("system")

    @property
    def questions_use_domain(self) -> bool:
        """Whether `{domain}` changes what the LLM is asked, so it belongs in cache keys."""
        texts = [*self.questions, self.system or "", self.content.get("instruction", "")]
        return any("{domain}" in t for t in texts)

    def domain(self, domain: str | None) -> str | None:
        return domain or self.content.get("default_domain")

    def render_questions(self, class_name: str, domain: str | None, count: int) -> list[str]:
        """The exact texts sent to the LLM for one class."""
        if not self.questions:
            raise ValueError(
                f"prompt set {self.name!r} ({self.path}) has no `questions` for a text LLM; "
                "use its templates with the `templates` provider, or another set"
            )
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        dom = self.domain(domain)
        tail = self.content.get("instruction", "").format(count=count, c=class_name, domain=dom)
        return [
            f"{q.format(c=class_name, domain=dom)}\n{tail}".strip() for q in self.questions
        ]

    def render_templates(self, class_name: str, domain: str | None) -> list[str]:
        if not self.templates:
            raise ValueError(f"prompt set {self.name!r} ({self.path}) has no `templates`")
        dom = self.domain(domain)
        return [t.format(c=class_name, domain=dom) for t in self.templates]

    def render_image_prompt(self, kind: str = "image", domain: str | None = None) -> str:
        """LatteCLIP's `image` or `group` prompt with the dataset's domain filled in."""
        if kind not in self.content:
            raise ValueError(f"prompt set {self.name!r} ({self.path}) has no {kind!r} prompt")
        return self.content[kind].format(domain=self.domain(domain))


def find_prompts_dir(explicit: str | Path | None = None) -> Path:
    """Resolve the prompts folder (see the module docstring for the order)."""
    candidates = [
        Path(explicit) if explicit else None,
        Path(__file__).resolve().parents[2] / "prompts",
        Path.cwd() / "prompts",
        Path(sys.prefix) / INSTALLED_PROMPTS,
    ]
    tried = [c for c in candidates if c is not None]
    for candidate in tried:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no prompts folder found (tried {', '.join(map(str, tried))}); "
        f"set {PROMPTS_ENV} to a copy of the repository's prompts/ folder"
    )


def load_prompt_set(name_or_path: str | Path, prompts_dir: str | Path | None = None) -> PromptSet:
    """Load `prompts/<name>.yaml`, or any YAML file given by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        folder = find_prompts_dir(prompts_dir)
        path = folder / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in folder.glob("*.yaml"))
            raise FileNotFoundError(f"unknown prompt set {name_or_path!r}; known in {folder}: {known}")
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict) or not isinstance(content.get("name"), str):
        raise ValueError(f"{path}: a prompt set is a YAML mapping with at least `name`")
    for field in ("questions", "templates"):
        values = content.get(field, [])
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ValueError(f"{path}: `{field}` must be a list of non-empty strings")
    return PromptSet(name=content["name"], path=path, content=content)
