"""Class descriptions from language models, for the CDE classifier and LatteCLIP's texts.

Pure Python (no Dagster; torch loads only when `names_class` first runs, for the class-name folding
of `nola_core.text`). The vendor clients are imported only when a provider of
theirs is built. The whole surface:

    provider = provider_from_env()            # anthropic > openai > templates (with a warning)
    provider = make_provider("openai-compatible", base_url="http://localhost:8000/v1", model="qwen")
    result = describe_classes(["sneaker", "bag"], provider=provider, prompt_set="nola_v2",
                              domain="product photo", count=10, cache_dir="descriptions_cache")
    result.descriptions       # {"sneaker": [...], "bag": [...]}: what the CDE builder takes
    result.content_hash       # sha256 of the texts, for downstream cache keys
    result.provenance         # provider, model, prompt-set hash, questions, date, cache keys,
                              # lines prefixed with their class name per class
    result.save("descriptions.json"); load_descriptions("descriptions.json")
    describe_image(provider, "img.jpg", load_prompt_set("latteclip_v1").render_image_prompt("image", "flower"))
    import_cupl()             # CuPL's ImageNet descriptions from an installed clip-benchmark

Providers and retries: `providers.py`; caching and files: `describe.py`; cleaning rules:
`clean.py`; prompt sets and where `prompts/` is found: `prompts.py`.
"""

from .clean import CleanRules, clean_answer, clean_lines, names_class
from .cupl import import_cupl
from .describe import (
    DescriptionError,
    DescriptionSet,
    describe_classes,
    describe_image,
    load_description_set,
    load_descriptions,
)
from .prompts import DEFAULT_PROMPT_SET, PromptSet, find_prompts_dir, load_prompt_set
from .providers import (
    PROVIDER_NAMES,
    AnthropicProvider,
    CallPolicy,
    ChatProvider,
    FileProvider,
    LLMError,
    MissingAPIKeyError,
    OpenAIProvider,
    Provider,
    TemplatesProvider,
    make_provider,
    provider_from_env,
)

__all__ = [
    "DEFAULT_PROMPT_SET",
    "PROVIDER_NAMES",
    "AnthropicProvider",
    "CallPolicy",
    "ChatProvider",
    "CleanRules",
    "DescriptionError",
    "DescriptionSet",
    "FileProvider",
    "LLMError",
    "MissingAPIKeyError",
    "OpenAIProvider",
    "PromptSet",
    "Provider",
    "TemplatesProvider",
    "clean_answer",
    "clean_lines",
    "describe_classes",
    "describe_image",
    "find_prompts_dir",
    "import_cupl",
    "load_description_set",
    "load_descriptions",
    "load_prompt_set",
    "make_provider",
    "names_class",
    "provider_from_env",
]
