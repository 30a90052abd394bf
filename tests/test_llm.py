"""Class descriptions from LLMs, through the real vendor clients and a fake HTTP layer.

Only the transport is fake (`httpx2.MockTransport` answering with the vendors' response
shapes); our providers, retries, cleaning and caching all run for real.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx2
import pytest
import yaml
from PIL import Image

import nola_core
from nola_core.cli import main
from nola_core.llm import (
    DEFAULT_PROMPT_SET,
    AnthropicProvider,
    CallPolicy,
    CleanRules,
    DescriptionError,
    DescriptionSet,
    FileProvider,
    LLMError,
    MissingAPIKeyError,
    OpenAIProvider,
    TemplatesProvider,
    clean_answer,
    clean_lines,
    describe_classes,
    describe_image,
    import_cupl,
    load_description_set,
    load_descriptions,
    load_prompt_set,
    make_provider,
    provider_from_env,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(nola_core.__file__).resolve().parent / "demo_data" / "fashion_mini"
CLASSES = ["t-shirt", "trouser", "sneaker", "bag"]


def anthropic_message(text: str, stop_reason: str = "end_turn") -> httpx2.Response:
    return httpx2.Response(
        200,
        json={
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 60},
        },
    )


def openai_completion(text: str | None, refusal: str | None = None) -> httpx2.Response:
    return httpx2.Response(
        200,
        json={
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion",
            "created": 1741570283,
            "model": "gpt-4.1-mini-2025-04-14",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": refusal, "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 25, "completion_tokens": 60, "total_tokens": 85},
        },
    )


ANSWER = {"anthropic": anthropic_message, "openai": openai_completion}
VENDORS = list(ANSWER)


class FakeAPI:
    """Answers requests with `respond(request, n)` and records them (thread-safe)."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[httpx2.Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        with self._lock:
            self.requests.append(request)
            n = len(self.requests)
        return self.respond(request, n)

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self))

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]

    def asked_classes(self) -> set[str]:
        return {class_in(r) for r in self.requests}


def prompt_of(request: httpx2.Request) -> str:
    """The user text of an Anthropic or OpenAI request."""
    content = json.loads(request.content)["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return next(part["text"] for part in content if part["type"] == "text")


def class_in(request: httpx2.Request) -> str:
    prompt = prompt_of(request)
    return next(c for c in CLASSES if f"a {c}" in prompt)


def good_answer(request: httpx2.Request) -> str:
    c, question = class_in(request), prompt_of(request).splitlines()[0]
    return (
        f"Here are 3 answers:\n\n1. A {c} has a clear outline ({question})\n"
        f"2) \"A {c} looks plain in a product photo.\"\n- **A {c}** has visible seams and edges."
    )


def provider(vendor: str, api: FakeAPI, *, sleeps: list | None = None, **policy) -> AnthropicProvider | OpenAIProvider:
    cls = AnthropicProvider if vendor == "anthropic" else OpenAIProvider
    return cls(
        api_key="test-key",
        http_client=api.client(),
        policy=CallPolicy(**{"max_retries": 2, "base_delay_s": 0.0, **policy}),
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
    )


def answering(vendor: str, text=good_answer) -> FakeAPI:
    return FakeAPI(lambda request, n: ANSWER[vendor](text(request)))


# --- success, request shapes ---------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_describe_classes_cleans_answers_and_sends_the_prompt_set(vendor, tmp_path):
    api = answering(vendor)
    temperature = 0.99 if vendor == "openai" else None  # Anthropic's Messages API takes none
    result = describe_classes(
        ["sneaker", "bag"], provider=provider(vendor, api), prompt_set="lafter_v1", count=3,
        temperature=temperature, cache_dir=tmp_path,
    )
    assert len(api.requests) == 2 * 5  # LaFTer's five questions per class
    assert list(result.descriptions) == ["sneaker", "bag"]
    sneaker = result.descriptions["sneaker"]
    assert "A sneaker looks plain in a product photo." in sneaker
    assert "A sneaker has visible seams and edges." in sneaker
    assert all(not s[0].isdigit() and not s.startswith(("-", '"', "Here")) for s in sneaker)
    assert len(sneaker) == 5 + 2  # five distinct question-echo lines, two duplicates removed

    body = api.bodies()[0]
    assert body["model"] == ("claude-haiku-4-5" if vendor == "anthropic" else "gpt-4.1-mini")
    assert body.get("temperature") == temperature
    assert body["max_tokens" if vendor == "anthropic" else "max_completion_tokens"] == 1024
    prompts = {prompt_of(r) for r in api.requests}
    assert "Describe what a bag looks like\nWrite 3 different one-sentence answers" in "\n".join(prompts)
    assert result.provenance["provider"] == vendor
    assert result.provenance["prompt_set_hash"] == load_prompt_set("lafter_v1").hash
    assert len(result.content_hash) == 64


def test_temperature_for_anthropic_is_refused_before_any_request():
    api = answering("anthropic")
    with pytest.raises(ValueError, match="no temperature"):
        describe_classes(["bag"], provider=provider("anthropic", api), temperature=0.7)
    assert api.requests == []


def test_system_prompt_and_domain_reach_the_model():
    api = answering("anthropic")
    describe_classes(["bag"], provider=provider("anthropic", api), domain="satellite photo", count=2)
    body = api.bodies()[0]
    assert body["system"] == load_prompt_set(DEFAULT_PROMPT_SET).system
    assert "in a satellite photo" in prompt_of(api.requests[0])


# --- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize(("headers", "wait"), [({"retry-after": "7"}, 7.0), ({"retry-after-ms": "250"}, 0.25)])
def test_rate_limit_is_retried_after_the_wait_the_server_asks(vendor, headers, wait):
    def respond(request, n):
        if n == 1:
            return httpx2.Response(429, json={"error": {"type": "rate_limit_error", "message": "slow down"}}, headers=headers)
        return ANSWER[vendor]("A bag has two handles on top.")

    api, sleeps = FakeAPI(respond), []
    assert provider(vendor, api, sleeps=sleeps).complete("Describe a bag.") == "A bag has two handles on top."
    assert len(api.requests) == 2
    assert sleeps == [wait]


@pytest.mark.parametrize("vendor", VENDORS)
def test_server_errors_fail_clearly_after_the_retry_budget(vendor):
    api = FakeAPI(lambda request, n: httpx2.Response(500, json={"error": {"type": "api_error", "message": "boom"}}))
    sleeps: list[float] = []
    with pytest.raises(LLMError, match=r"failed after 4 attempts: HTTP 500"):
        provider(vendor, api, sleeps=sleeps, max_retries=3, base_delay_s=1.0).complete("Describe a bag.")
    assert len(api.requests) == 4
    # exponential backoff with jitter in [0.5, 1] x 1, 2, 4 seconds
    assert [0.5 <= s / 2**i <= 1.0 for i, s in enumerate(sleeps)] == [True] * 3


@pytest.mark.parametrize("vendor", VENDORS)
def test_timeouts_are_retried(vendor):
    def respond(request, n):
        if n == 1:
            raise httpx2.ReadTimeout("read timed out", request=request)
        return ANSWER[vendor]("A bag has two handles on top.")

    api = FakeAPI(respond)
    assert provider(vendor, api).complete("Describe a bag.") == "A bag has two handles on top."
    assert len(api.requests) == 2


@pytest.mark.parametrize("vendor", VENDORS)
def test_client_errors_are_not_retried(vendor):
    api = FakeAPI(lambda r, n: httpx2.Response(400, json={"error": {"type": "invalid_request_error", "message": "bad model"}}))
    with pytest.raises(LLMError, match="HTTP 400"):
        provider(vendor, api).complete("Describe a bag.")
    assert len(api.requests) == 1


# --- messy answers -------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_error_messages_never_carry_the_key(vendor):
    body = {"error": {"type": "authentication_error", "message": "invalid x-api-key: test-key"}}
    api = FakeAPI(lambda r, n: httpx2.Response(401, json=body))
    with pytest.raises(LLMError, match="HTTP 401") as caught:
        provider(vendor, api).complete("Describe a bag.")
    assert "test-key" not in str(caught.value)


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("body", [b'{"id": "msg_01", "content": [', b'{"unexpected": true}'])
def test_malformed_response_fails_naming_the_class(vendor, body):
    api = FakeAPI(lambda r, n: httpx2.Response(200, content=body, headers={"content-type": "application/json"}))
    with pytest.raises(DescriptionError, match=r"class 'bag'.*malformed"):
        describe_classes(["bag"], provider=provider(vendor, api), count=2)


@pytest.mark.parametrize(
    "refusal",
    [
        anthropic_message("I'm sorry, but I can't help with that.\nIt would not be appropriate here."),
        anthropic_message("", stop_reason="refusal"),
        openai_completion(None, refusal="I'm sorry, I cannot assist with that request."),
        openai_completion("As an AI language model, I cannot see images.\nBut bags exist in many forms."),
    ],
)
def test_refusals_leave_no_description_and_fail_naming_the_class(refusal):
    vendor = "anthropic" if b'"type":"message"' in refusal.content.replace(b" ", b"") else "openai"

    def respond(request, n):
        return refusal if class_in(request) == "bag" else ANSWER[vendor](good_answer(request))

    with pytest.raises(DescriptionError, match=r"class 'bag'.*no usable description"):
        describe_classes(["sneaker", "bag"], provider=provider(vendor, FakeAPI(respond)), count=2)


def test_cleaning_rules():
    answer = (
        "Sure! Here are some descriptions:\n\n"
        "1. A sneaker has a thick rubber sole.\n"
        "2) “A sneaker has laces across the top.”\n"
        "   * a SNEAKER has a   thick rubber sole\n"
        "- Red.\n"
        "• " + " ".join(["long"] * 61) + "\n"
        "(3) 'Sneakers often show a logo on the side.'\n"
    )
    assert clean_answer(answer) == [
        "A sneaker has a thick rubber sole.",
        "A sneaker has laces across the top.",
        "Sneakers often show a logo on the side.",
    ]
    assert "Red." in clean_answer(answer, CleanRules(min_words=1))
    assert clean_answer("Sure.\nI'm sorry, I can't describe a sneaker.\nA sneaker is a shoe.") == []
    assert clean_lines(["I cannot answer this question.", "A goldfish is a small orange fish."]) == [
        "A goldfish is a small orange fish."
    ]


# --- keys and provider choice --------------------------------------------------------------


@pytest.mark.parametrize(("vendor", "variable"), [("anthropic", "ANTHROPIC_API_KEY"), ("openai", "OPENAI_API_KEY")])
def test_missing_key_names_the_variable_before_any_request(vendor, variable):
    api = answering(vendor)
    with pytest.raises(MissingAPIKeyError, match=variable):
        make_provider(vendor, http_client=api.client())
    assert api.requests == []


def test_default_provider_follows_the_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert provider_from_env().name == "openai"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    assert provider_from_env().name == "anthropic"
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.warns(UserWarning, match="ANTHROPIC_API_KEY nor OPENAI_API_KEY"):
        assert isinstance(make_provider("auto"), TemplatesProvider)


def test_openai_compatible_server_gets_the_base_url_and_never_the_openai_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai-key")
    api = answering("openai")
    local = make_provider("openai-compatible", base_url="http://localhost:8000/v1", model="qwen2.5-7b", http_client=api.client())
    assert describe_classes(["bag"], provider=local, count=2).provenance["base_url"] == "http://localhost:8000/v1"
    request = api.requests[0]
    assert (request.url.host, request.url.port, request.url.path) == ("localhost", 8000, "/v1/chat/completions")
    assert "sk-real-openai-key" not in request.headers.get("authorization", "")
    body = json.loads(request.content)
    assert body["model"] == "qwen2.5-7b" and body["max_tokens"] == 1024


# --- cache, provenance, partial failure ----------------------------------------------------


def test_cache_hit_makes_no_request_and_files_carry_provenance(tmp_path):
    first = describe_classes(CLASSES, provider=provider("openai", answering("openai")), count=3, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 4
    entry = json.loads(files[0].read_text())
    assert files[0].read_text().startswith('{\n  "format"')  # pretty, reviewable in a diff
    assert entry["provenance"]["model"] == "gpt-4.1-mini" and entry["provenance"]["created"]
    assert entry["exchanges"][0]["prompt"].startswith("Describe what a")

    silent = FakeAPI(lambda r, n: httpx2.Response(500))
    again = describe_classes(CLASSES, provider=provider("openai", silent), count=3, cache_dir=tmp_path)
    assert silent.requests == []
    assert again.descriptions == first.descriptions and again.content_hash == first.content_hash
    assert again.provenance["from_cache"] == CLASSES


def test_cache_key_changes_with_prompt_text_count_and_model(tmp_path):
    describe_classes(["bag"], provider=provider("anthropic", answering("anthropic")), count=2, cache_dir=tmp_path)
    edited = tmp_path / "nola_v1_edited.yaml"
    content = yaml.safe_load((REPO / "prompts" / "nola_v1.yaml").read_text())
    content["questions"][0] = content["questions"][0].replace("Describe", "Tell me")
    edited.write_text(yaml.safe_dump(content))
    for kwargs in ({"prompt_set": edited}, {"count": 3}, {"domain": "sketch"}):
        api = answering("anthropic")
        describe_classes(["bag"], provider=provider("anthropic", api), cache_dir=tmp_path, **{"count": 2, **kwargs})
        assert len(api.requests) == 5, kwargs
    assert len(list(tmp_path.glob("bag.*.json"))) == 4


def test_failure_keeps_finished_classes_and_rerun_asks_only_for_the_rest(tmp_path):
    def flaky(request, n):
        if class_in(request) == "sneaker":
            return httpx2.Response(503, json={"error": {"message": "overloaded"}})
        return openai_completion(good_answer(request))

    with pytest.raises(DescriptionError, match=r"class 'sneaker'.*2 of 4 classes are cached"):
        describe_classes(CLASSES, provider=provider("openai", FakeAPI(flaky)), count=2, cache_dir=tmp_path, concurrency=1)
    assert {p.name.split(".")[0] for p in tmp_path.glob("*.json")} == {"t-shirt", "trouser"}

    healthy = answering("openai")
    result = describe_classes(CLASSES, provider=provider("openai", healthy), count=2, cache_dir=tmp_path, concurrency=1)
    assert healthy.asked_classes() == {"sneaker", "bag"}
    assert list(result.descriptions) == CLASSES


def test_concurrency_is_bounded():
    in_flight, peak, lock = [0], [0], threading.Lock()

    def slow(request, n):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return openai_completion(good_answer(request))

    api = FakeAPI(slow)
    describe_classes(CLASSES, provider=provider("openai", api), count=2, concurrency=2)
    assert len(api.requests) == 4 * 5 and peak[0] == 2


# --- images (LatteCLIP) --------------------------------------------------------------------


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("vendor", VENDORS)
def test_image_description_request_carries_the_image(vendor, tmp_path):
    image = tmp_path / "flower.png"
    image.write_bytes(png_bytes((200, 30, 90)))
    encoded = base64.b64encode(image.read_bytes()).decode()
    prompt = load_prompt_set("latteclip_v1").render_image_prompt("image", "flower")
    api = answering(vendor, lambda r: '"The flower is pink and yellow."')

    text = describe_image(provider(vendor, api), image, prompt, cache_dir=tmp_path / "cache")
    assert text == "The flower is pink and yellow."
    content = api.bodies()[0]["messages"][-1]["content"]
    if vendor == "anthropic":
        assert content[0] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": encoded}}
    else:
        assert content[1] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}
    assert prompt_of(api.requests[0]) == "Describe the flower in the photo concisely, using less than 20 words."

    describe_image(provider(vendor, api), image, prompt, cache_dir=tmp_path / "cache")
    assert len(api.requests) == 1  # cached by image content


def test_group_description_sends_every_image_and_converts_bmp():
    bmp = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 90, 0)).save(bmp, format="BMP")
    api = answering("anthropic", lambda r: "Bright, large, orange and yellow flowers with many petals.")
    prompt = load_prompt_set("latteclip_v1").render_image_prompt("group", "flower")
    describe_image(provider("anthropic", api), [png_bytes((255, 0, 0)), bmp.getvalue()], prompt)
    blocks = api.bodies()[0]["messages"][0]["content"]
    assert [b["type"] for b in blocks] == ["image", "image", "text"]
    assert blocks[1]["source"]["media_type"] == "image/png"
    assert base64.b64decode(blocks[1]["source"]["data"]).startswith(b"\x89PNG")


def test_image_refusal_is_an_error():
    api = answering("openai", lambda r: "I'm sorry, I can't help with identifying people in images.")
    with pytest.raises(LLMError, match="no usable image description"):
        describe_image(provider("openai", api), png_bytes((1, 2, 3)), "Describe the person in the photo.")


# --- offline sources -------------------------------------------------------------------------


def test_templates_provider_is_deterministic_and_uses_the_domain():
    a = describe_classes(CLASSES, provider=TemplatesProvider(), domain="satellite photo")
    b = describe_classes(CLASSES, provider=make_provider("templates"), domain="satellite photo")
    assert a == b and a.content_hash == b.content_hash
    assert a.descriptions["bag"][0] == "a satellite photo of a bag."
    assert describe_classes(["bag"], provider=TemplatesProvider(), prompt_set="lafter_v1").descriptions == {
        "bag": ["a photo of a bag."]
    }


def test_description_files_plain_yaml_and_saved_sets(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("sneaker:\n  - A sneaker has a rubber sole.\n  - ' A sneaker has a rubber sole. '\nbag: A bag has handles.\n")
    assert load_descriptions(plain) == {"sneaker": ["A sneaker has a rubber sole."], "bag": ["A bag has handles."]}

    saved = DescriptionSet({"bag": ["A bag has handles."]}, {"provider": "anthropic", "model": "m"})
    path = saved.save(tmp_path / "set.json")
    assert load_description_set(path) == saved

    via_provider = describe_classes(["bag"], provider=FileProvider(path))
    assert via_provider.content_hash == saved.content_hash
    assert via_provider.provenance["source_provenance"] == saved.provenance
    with pytest.raises(DescriptionError, match="sneaker"):
        describe_classes(["sneaker", "bag"], provider=FileProvider(path))

    (tmp_path / "bad.json").write_text(json.dumps({"bag": []}))
    with pytest.raises(ValueError, match=r"bad.json: class 'bag' has no description"):
        load_descriptions(tmp_path / "bad.json")


def test_shipped_demo_descriptions_match_the_demo_classes():
    spec = yaml.safe_load((DEMO / "dataset.yaml").read_text())
    shipped = load_description_set(DEMO / "descriptions.json")
    assert list(shipped.descriptions) == spec["classes"]
    assert all(len(v) >= 5 and clean_lines(v) == v for v in shipped.descriptions.values())
    assert "hand-written" in shipped.provenance["source"] and "not LLM output" in shipped.provenance["source"]


def test_import_cupl_keeps_provenance_and_licence_and_drops_noise(tmp_path):
    cupl = tmp_path / "cupl_prompts.json"
    cupl.write_text(json.dumps({"imagenet1k": {
        "goldfish": ["A goldfish is a small orange fish.", "MURDERER.", ".", "I cannot answer this question.",
                     "A goldfish is a small orange fish"],
        "tench": ["A tench is a freshwater fish of the carp family."],
    }}))
    result = import_cupl(cupl)
    assert result.descriptions == {
        "goldfish": ["A goldfish is a small orange fish."],
        "tench": ["A tench is a freshwater fish of the carp family."],
    }
    assert "MIT" in result.provenance["licence"] and "2209.03320" in result.provenance["source"]
    assert result.provenance["cleaning"]["dropped_sentences"] == 4


# --- prompt sets ---------------------------------------------------------------------------


def test_prompt_sets_hold_the_papers_wording(monkeypatch, tmp_path):
    assert load_prompt_set("lafter_v1").questions == [
        "Describe what a {c} looks like",
        "How can you identify a {c}?",
        "What does a {c} look like?",
        "Describe an image from the internet of a {c}",
        "A caption of an image of a {c}:",
    ]
    latte = load_prompt_set("latteclip_v1")
    assert latte.render_image_prompt("group", "pet") == (
        "Describe the common visual attributes of the pet in all the photos concisely, in fewer than 20 words."
    )
    with pytest.raises(ValueError, match="no `questions`"):
        describe_classes(["bag"], provider=provider("openai", answering("openai")), prompt_set="latteclip_v1")

    (tmp_path / "mine_v1.yaml").write_text("name: mine_v1\nquestions: ['What is a {c}?']\n")
    monkeypatch.setenv("NOLA_PROMPTS_DIR", str(tmp_path))  # read at the edges only, never by the core
    with pytest.raises(FileNotFoundError, match="unknown prompt set 'mine_v1'"):
        load_prompt_set("mine_v1")
    assert load_prompt_set("mine_v1", tmp_path).questions == ["What is a {c}?"]
    with pytest.raises(FileNotFoundError, match="mine_v1"):
        load_prompt_set("lafter_v9", tmp_path)


def test_nola_describe_finds_prompt_sets_in_nola_prompts_dir(tmp_path, monkeypatch):
    """The CLI is an edge: it passes NOLA_PROMPTS_DIR down as `prompts_dir`; --prompts-dir wins."""
    monkeypatch.chdir(tmp_path)
    mine, other = tmp_path / "mine", tmp_path / "other"
    for folder, word in ((mine, "mine"), (other, "other")):
        folder.mkdir()
        (folder / "set_v1.yaml").write_text(f"name: set_v1\ntemplates: ['a {{c}}, {word}.']\n")
    out = tmp_path / "out.json"
    monkeypatch.setenv("NOLA_PROMPTS_DIR", str(mine))
    args = ["describe", str(DEMO), "--provider", "templates", "--prompt-set", "set_v1", "--out", str(out)]
    assert main(args) == 0
    assert load_descriptions(out)["bag"] == ["a bag, mine."]
    assert main([*args, "--prompts-dir", str(other)]) == 0
    assert load_descriptions(out)["bag"] == ["a bag, other."]


# --- CLI -----------------------------------------------------------------------------------


def test_cli_describe_writes_and_prints(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.json"
    assert main(["describe", str(DEMO), "--provider", "file", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sneaker (" in printed and "  - A sneaker is a low athletic shoe" in printed
    assert load_descriptions(out) == load_descriptions(DEMO / "descriptions.json")

    assert main(["describe", str(DEMO / "dataset.yaml"), "--provider", "templates", "--out", str(out)]) == 0
    assert load_descriptions(out)["bag"][0] == "a grayscale product photo of a bag."

    assert main(["describe", str(DEMO), "--provider", "anthropic"]) == 1
    assert "ANTHROPIC_API_KEY" in capsys.readouterr().err
