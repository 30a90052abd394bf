"""Turn messy LLM answers into description sentences a text encoder should see.

Models number their lines, add bullets, markdown, quotes and preambles ("Here are 10
descriptions:"), sometimes refuse, and repeat themselves. CLIP's text encoder takes 77 tokens,
so very long lines are truncated anyway; very short ones ("Red.") carry no description.
A line that does not name its class ("It has two handles.") is prefixed with the name
("bag: It has two handles."), as NoLA's reference descriptions name their class in ~93 % of lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# "1.", "2)", "(3)", "-", "*", "•", "a)" ... at the start of a line, repeated ("1. - ").
_MARKER = re.compile(r"^\s*(?:[-*•·–—+>#]+|(?:\(?\d{1,3}[.):\]]|\(?[a-z]\))(?=\s))\s*")
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("`", "`")]
_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry\b|i apologi[sz]e|as an ai\b|as a (?:large )?language model"
    r"|i (?:cannot|can'?t|can not|am unable|'m unable|won'?t)\b|unfortunately,? i\b)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class CleanRules:
    """Word limits for one description (lines outside them are dropped), and whether a line that
    does not name its class gets the name prepended ("{class}: ...", the form of the reference's
    `gen_labels_with_descrptions_and_clsname`, fazliimam/NoLA utils/model_utils.py)."""

    min_words: int = 3
    max_words: int = 60
    prefix_class_name: bool = True


def is_refusal(line: str) -> bool:
    return bool(_REFUSAL.match(line.replace("’", "'")))


def strip_markup(line: str) -> str:
    """Remove numbering, bullets, markdown emphasis and surrounding quotes from one line."""
    line = line.strip()
    while (stripped := _MARKER.sub("", line, count=1)) != line:
        line = stripped
    line = line.replace("**", "").replace("__", "").strip()
    changed = True
    while changed and len(line) >= 2:
        changed = False
        for left, right in _QUOTES:
            if line.startswith(left) and line.endswith(right):
                line, changed = line[1:-1].strip(), True
    return line


def _dedupe_key(line: str) -> str:
    return " ".join(line.casefold().split()).rstrip(".!;, ")


def dedupe(lines: Iterable[str]) -> list[str]:
    """Keep the first of lines equal up to case, spacing and final punctuation."""
    seen: set[str] = set()
    kept = []
    for line in lines:
        key = _dedupe_key(line)
        if key not in seen:
            seen.add(key)
            kept.append(line)
    return kept


def clean_lines(lines: Iterable[str], rules: CleanRules = CleanRules()) -> list[str]:
    """Line by line: strip markup, drop empties, preambles, refusals and bad lengths, dedupe."""
    kept = []
    for raw in lines:
        line = strip_markup(raw)
        if not line or line.endswith(":") or is_refusal(line):
            continue
        if rules.min_words <= len(line.split()) <= rules.max_words:
            kept.append(line)
    return dedupe(kept)


def clean_answer(answer: str, rules: CleanRules = CleanRules()) -> list[str]:
    """One model answer. An answer that refuses anywhere is dropped whole: its other lines
    ("It would not be appropriate ...") are not descriptions either."""
    lines = answer.splitlines()
    if any(is_refusal(strip_markup(line)) for line in lines):
        return []
    return clean_lines(lines, rules)


def _number_forms(name: str) -> set[str]:
    """The name in the singular and in a plain English plural, whichever it is given in."""
    forms = {name, name + "s", name + "es"}
    if name.endswith("y"):
        forms.add(name[:-1] + "ies")
    if name.endswith("ies"):
        forms.add(name[:-3] + "y")
    if name.endswith("s"):
        forms.update({name[:-1], name[:-2]} if name.endswith("es") else {name[:-1]})
    return forms


def names_class(line: str, class_name: str) -> bool:
    """Whether `line` names `class_name` as whole words, after the folding of
    `normalise_class_name` (case, Unicode form, spaces, hyphens, underscores), in the singular or
    plural: "T-Shirts are ..." names "t-shirt"."""
    # Imported here: `nola_core.text` loads torch, and `import nola_core.llm` stays free of it.
    from nola_core.text.limits import normalise_class_name

    folded, name = normalise_class_name(line), normalise_class_name(class_name)
    return any(re.search(rf"(?<!\w){re.escape(form)}(?!\w)", folded) for form in _number_forms(name))


def prefix_unnamed_lines(lines: Iterable[str], class_name: str) -> tuple[list[str], int]:
    """Lines with "{class_name}: " prepended to each that does not name the class; and how many."""
    kept, prefixed = [], 0
    for line in lines:
        if names_class(line, class_name):
            kept.append(line)
        else:
            kept.append(f"{class_name}: {line}")
            prefixed += 1
    return kept, prefixed
