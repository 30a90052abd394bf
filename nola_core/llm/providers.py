"""Description providers: who writes the texts, and how calls to them are made dependable.

Chat providers answer one prompt at a time, optionally with images, through the vendors'
official clients (both take an injected `httpx2.Client` as `http_client`, which is how tests
serve canned responses through `httpx2.MockTransport`):

- `AnthropicProvider(model, *, api_key=None, base_url=None, http_client=None, policy, sleep)`:
  Claude through the Messages API; the key comes from `ANTHROPIC_API_KEY` unless passed.
- `OpenAIProvider(model, *, base_url=None, api_key=None, api_key_env=None, http_client=None,
  policy, sleep)`: OpenAI through Chat Completions, or any OpenAI-compatible server (vLLM,
  llama.cpp server, Ollama) when `base_url` is given. Chat Completions rather than Responses
  because every compatible server implements `/v1/chat/completions`: one code path for all.
  The key comes from `OPENAI_API_KEY` for OpenAI itself; a compatible server gets a key only
  from `api_key` or the variable named by `api_key_env` (never your OpenAI key by accident).

Sources that need no model: `FileProvider(path)` (a JSON/YAML mapping class → descriptions) and
`TemplatesProvider()` (the prompt set's template sentences). `provider_from_env()` picks the
default, `make_provider(name, ...)` builds one from configuration (CLI, Dagster).

The API keys are the one environment this core module reads itself, by the vendor SDKs' own
convention (`ANTHROPIC_API_KEY`, `OPENAI_API_KEY`, the `api_key_env` variable), not at the edges.
A missing key raises `MissingAPIKeyError` naming the variable when the provider is built, so
before any request. Retries are done here, not by the vendor clients (built with
`max_retries=0`), so the budget and the waiting are configurable and testable: HTTP 408, 409,
429, 5xx, timeouts and connection errors are retried up to `CallPolicy.max_retries` times with
exponential backoff and jitter, or after the server's `Retry-After` when it sends one (capped at
`max_delay_s`); other HTTP errors fail at once. Both clients are thread-safe, so one provider
serves a thread pool.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, Union

log = logging.getLogger(__name__)

DEFAULT_ANTHROPIC_MODEL = "claude-haiku-4-5"
DEFAULT_OPENAI_MODEL = "gpt-4.1-mini"
PROVIDER_NAMES = ("auto", "anthropic", "openai", "openai-compatible", "file", "templates")
RETRY_STATUSES = frozenset({408, 409, 429})

ImageInput = Union[str, os.PathLike, bytes]
T = TypeVar("T")


class LLMError(RuntimeError):
    """A provider could not deliver usable text.

    `transient` is False when asking again cannot help (a rejected key, a bad request, a model
    that does not exist: HTTP 4xx other than 408/409/429), so callers fail at once instead of
    waiting out an outage that is not one.
    """

    def __init__(self, message: str, *, transient: bool = True):
        super().__init__(message)
        self.transient = transient


class MissingAPIKeyError(LLMError):
    """Raised before any request when the key a provider needs is not set."""


@dataclass(frozen=True)
class CallPolicy:
    """Per-request timeout and retry budget (attempts = 1 + max_retries)."""

    timeout_s: float = 60.0
    max_retries: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0


class ChatProvider(Protocol):
    """What describing classes and images needs from a language model."""

    name: str
    model: str
    base_url: str | None
    supports_temperature: bool

    def complete(
        self,
        prompt: str,
        *,
        system: str | None = None,
        images: Sequence[ImageInput] = (),
        temperature: float | None = None,
        max_tokens: int = 1024,
    ) -> str: ...


@dataclass(frozen=True)
class FileProvider:
    """Descriptions read from a JSON/YAML file: hand-written, imported (CuPL) or committed."""

    path: Path
    name: ClassVar[str] = "file"
    model: ClassVar[None] = None


@dataclass(frozen=True)
class TemplatesProvider:
    """No LLM: the prompt set's template sentences ("a photo of a {c}.")."""

    name: ClassVar[str] = "templates"
    model: ClassVar[None] = None


Provider = Union[ChatProvider, FileProvider, TemplatesProvider]


def _key_from_env(variable: str, who: str) -> str:
    key = os.environ.get(variable, "").strip()
    if not key:
        raise MissingAPIKeyError(f"the {who} provider needs an API key: set {variable} (or pass api_key)")
    return key


def image_bytes(image: ImageInput) -> bytes:
    return bytes(image) if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


def encode_image(image: ImageInput) -> tuple[str, str]:
    """(media type, base64) in a format both vendors accept: PNG, JPEG, GIF or WebP as they
    are, anything else Pillow reads (BMP, TIFF, ...) converted to PNG."""
    data = image_bytes(image)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        media = "image/png"
    elif data.startswith(b"\xff\xd8\xff"):
        media = "image/jpeg"
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        media = "image/gif"
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        media = "image/webp"
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:
                buffer = io.BytesIO()
                img.convert("RGB").save(buffer, format="PNG")
        except UnidentifiedImageError as exc:
            where = image if not isinstance(image, (bytes, bytearray)) else f"{len(data)} bytes"
            raise ValueError(f"not an image: {where}") from exc
        data, media = buffer.getvalue(), "image/png"
    return media, base64.b64encode(data).decode("ascii")


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The wait a server asks for: `retry-after-ms`, `retry-after` seconds or HTTP date."""
    if value := headers.get("retry-after-ms"):
        try:
            return float(value) / 1000
        except ValueError:
            pass
    if value := headers.get("retry-after"):
        try:
            return float(value)
        except ValueError:
            try:
                return (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
            except (TypeError, ValueError):
                return None
    return None


def call_with_retries(
    call: Callable[[], T],
    *,
    what: str,
    policy: CallPolicy,
    sleep: Callable[[float], None],
    status_error: type[Exception],
    connection_error: type[Exception],
    secret: str = "",
) -> T:
    """Run `call`, retrying transient failures of one vendor's client (see module docstring).
    `secret` (the API key) is masked in every message, should a server echo it back."""
    attempt = 0
    while True:
        try:
            return call()
        except (status_error, connection_error) as exc:
            status = exc.status_code if isinstance(exc, status_error) else None  # type: ignore[attr-defined]
            message = re.sub(r"^Error code: \d+ - ", "", exc.message)  # type: ignore[attr-defined]
            summary = f"HTTP {status}: {message}" if status else message
            if secret:
                summary = summary.replace(secret, "***")
            # `from None`: the vendor's exception repeats the server's body unmasked (a server may echo
            # the key), and Dagster stores the whole cause chain in its event log and compute logs.
            if status is not None and status not in RETRY_STATUSES and status < 500:
                raise LLMError(f"{what} failed: {summary}", transient=False) from None
            if attempt >= policy.max_retries:
                raise LLMError(f"{what} failed after {attempt + 1} attempts: {summary}") from None
            response = getattr(exc, "response", None)
            asked = _retry_after_s(response.headers) if response is not None else None
            if asked is not None and asked >= 0:
                delay = min(asked, policy.max_delay_s)
            else:
                delay = min(policy.max_delay_s, policy.base_delay_s * 2**attempt) * random.uniform(0.5, 1)
            log.warning("%s: %s; retry %d of %d in %.1fs", what, summary, attempt + 1, policy.max_retries, delay)
            sleep(delay)
            attempt += 1
        except ValueError as exc:  # the clients raise JSONDecodeError on a body that is not JSON
            raise LLMError(f"{what} returned a malformed response: {exc}") from exc


class AnthropicProvider:
    """Claude through the official client's Messages API (images as base64 blocks)."""

    name = "anthropic"
    supports_temperature = False  # the Messages API of anthropic>=2 takes no sampling parameters

    def __init__(
        self,
        model: str = DEFAULT_ANTHROPIC_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        http_client: Any = None,
        policy: CallPolicy = CallPolicy(),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import anthropic

        key = api_key or _key_from_env("ANTHROPIC_API_KEY", self.name)
        self.model, self.base_url, self.policy, self._sleep = model, base_url, policy, sleep
        self._errors, self._key = (anthropic.APIStatusError, anthropic.APIConnectionError), key
        self._client = anthropic.Anthropic(
            api_key=key, base_url=base_url, http_client=http_client, max_retries=0, timeout=policy.timeout_s
        )

    def complete(
        self,
        prompt: str,
        *,
        system: str | None = None,
        images: Sequence[ImageInput] = (),
        temperature: float | None = None,
        max_tokens: int = 1024,
    ) -> str:
        content: list[dict[str, Any]] = [
            {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
            for media, data in map(encode_image, images)
        ]
        content.append({"type": "text", "text": prompt})
        request: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        }
        if temperature is not None:
            raise ValueError("the anthropic Messages API takes no temperature; leave it None")
        if system:
            request["system"] = system
        message = call_with_retries(
            lambda: self._client.messages.create(**request),
            what=f"anthropic {self.model} request",
            policy=self.policy,
            sleep=self._sleep,
            status_error=self._errors[0],
            connection_error=self._errors[1],
            secret=self._key,
        )
        if message.stop_reason == "refusal":
            return ""
        if not isinstance(message.content, list):
            raise LLMError(f"anthropic {self.model} returned a malformed message: no content list")
        return "\n".join(block.text for block in message.content if getattr(block, "type", None) == "text")


class OpenAIProvider:
    """OpenAI, or an OpenAI-compatible server at `base_url`, through Chat Completions."""

    supports_temperature = True

    def __init__(
        self,
        model: str = DEFAULT_OPENAI_MODEL,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        http_client: Any = None,
        policy: CallPolicy = CallPolicy(),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import openai

        self.name = "openai" if base_url is None else "openai-compatible"
        variable = api_key_env or ("OPENAI_API_KEY" if base_url is None else None)
        # Local servers without auth accept any token, but the client insists on one.
        key = api_key or (_key_from_env(variable, self.name) if variable else "unused")
        self.model, self.base_url, self.policy, self._sleep = model, base_url, policy, sleep
        self._errors, self._key = (openai.APIStatusError, openai.APIConnectionError), key
        self._client = openai.OpenAI(
            api_key=key, base_url=base_url, http_client=http_client, max_retries=0, timeout=policy.timeout_s
        )
        # api.openai.com refuses `max_tokens` for reasoning models; compatible servers know it.
        self._max_tokens_field = "max_completion_tokens" if base_url is None else "max_tokens"

    def complete(
        self,
        prompt: str,
        *,
        system: str | None = None,
        images: Sequence[ImageInput] = (),
        temperature: float | None = None,
        max_tokens: int = 1024,
    ) -> str:
        user: Any = prompt
        if images:
            user = [{"type": "text", "text": prompt}] + [
                {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
                for media, data in map(encode_image, images)
            ]
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        request: dict[str, Any] = {"model": self.model, "messages": messages, self._max_tokens_field: max_tokens}
        if temperature is not None:
            request["temperature"] = temperature
        completion = call_with_retries(
            lambda: self._client.chat.completions.create(**request),
            what=f"{self.name} {self.model} request",
            policy=self.policy,
            sleep=self._sleep,
            status_error=self._errors[0],
            connection_error=self._errors[1],
            secret=self._key,
        )
        choices = completion.choices
        if not isinstance(choices, list) or not choices or choices[0].message is None:
            raise LLMError(f"{self.name} {self.model} returned a malformed completion: no message")
        message = choices[0].message
        if getattr(message, "refusal", None) or choices[0].finish_reason == "content_filter":
            return ""
        return message.content or ""


def provider_from_env(
    *,
    model: str | None = None,
    http_client: Any = None,
    policy: CallPolicy = CallPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> Provider:
    """The default: Anthropic if `ANTHROPIC_API_KEY` is set, else OpenAI if `OPENAI_API_KEY`
    is, else template sentences with a warning (the run still works, with weaker texts)."""
    common = {"http_client": http_client, "policy": policy, "sleep": sleep}
    if os.environ.get("ANTHROPIC_API_KEY", "").strip():
        return AnthropicProvider(model or DEFAULT_ANTHROPIC_MODEL, **common)
    if os.environ.get("OPENAI_API_KEY", "").strip():
        return OpenAIProvider(model or DEFAULT_OPENAI_MODEL, **common)
    warnings.warn(
        "neither ANTHROPIC_API_KEY nor OPENAI_API_KEY is set: class descriptions fall back to "
        "template sentences only (no LLM), which usually classify worse; set one of them, or "
        "choose the `file` or `openai-compatible` provider",
        stacklevel=2,
    )
    return TemplatesProvider()


def make_provider(
    name: str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    path: str | Path | None = None,
    http_client: Any = None,
    policy: CallPolicy = CallPolicy(),
    sleep: Callable[[float], None] = time.sleep,
) -> Provider:
    """Build a provider from configuration; `name` is one of `PROVIDER_NAMES`."""
    common = {"http_client": http_client, "policy": policy, "sleep": sleep}
    if name == "auto":
        return provider_from_env(model=model, **common)
    if name == "anthropic":
        return AnthropicProvider(model or DEFAULT_ANTHROPIC_MODEL, api_key=api_key, base_url=base_url, **common)
    if name == "openai" and base_url is None:
        return OpenAIProvider(model or DEFAULT_OPENAI_MODEL, api_key=api_key, api_key_env=api_key_env, **common)
    if name in ("openai", "openai-compatible"):
        if not base_url or not model:
            raise ValueError("the openai-compatible provider needs base_url and model (the server's model name)")
        return OpenAIProvider(model, base_url=base_url, api_key=api_key, api_key_env=api_key_env, **common)
    if name == "file":
        if path is None:
            raise ValueError("the file provider needs a path to a JSON/YAML descriptions file")
        return FileProvider(Path(path))
    if name == "templates":
        return TemplatesProvider()
    raise ValueError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDER_NAMES)}")
