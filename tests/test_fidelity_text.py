"""Text side of NoLA against its reference code (issue 14, items 9 and 10).

Template sets: each dataset name gives the reference's per-dataset set, word for word. The
counts and strings below are copied by hand from fazliimam/NoLA, utils/data_utils.py,
`ds_specific_templates` (first and last entry of each set), not read from our own file.

Descriptions: NoLA's reference descriptions name their class in ~93 % of lines; ours are asked
to, and a line that still does not gets "<class>: " prepended. The LLM is faked at the HTTP layer
only (the vendors' real clients, `httpx2.MockTransport` or a local HTTP server).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_llm import FakeAPI, openai_completion, prompt_of, provider

from nola_core.data.benchmarks import get_benchmark
from nola_core.llm import (
    DEFAULT_PROMPT_SET,
    CleanRules,
    DescriptionSet,
    FileProvider,
    describe_classes,
    load_prompt_set,
    names_class,
)
from nola_core.text import get_templates

IMAGENET_FAMILY = (7, "a bad photo of the {}.", "itap of a {}.")
# our dataset name: (reference key's set size, its first template, its last template)
REFERENCE_SETS = {
    "imagenet": IMAGENET_FAMILY,  # 'ImageNet'
    "imagenet_a": IMAGENET_FAMILY,  # 'ImageNetA'
    "imagenet_r": IMAGENET_FAMILY,  # 'ImageNetR'
    "imagenet_sketch": IMAGENET_FAMILY,  # 'ImageNetSketch'
    "cifar10": (18, "a photo of a {}.", "a photo of the big {}."),  # 'CIFAR10_local'
    "cifar100": (81, "a photo of a {}", "a tattoo of the {}."),  # 'CIFAR100_local'; no period in the first
    "caltech101": (7, "a bad photo of the {}.", "itap of a {}."),  # 'Caltech101'
    "dtd": (8, "a photo of a {} texture.", "a photo of the {} object."),  # 'DescribableTextures'
    "eurosat": (6, "a satellite photo of {}.", "a aerial image of {}."),  # 'EuroSAT'
    # 'OxfordFlowers'
    "flowers102": (1, "a photo of a {}, a type of flower.", "a photo of a {}, a type of flower."),
    "sun397": (2, "a photo of a {}.", "a photo of the {}."),  # 'SUN397'
    "ucf101": (48, "a photo of a person {}.", "a demonstration of the person practicing {}."),  # 'UCF101'
    "oxford_pets": (2, "Describe what a pet {} looks like ", "Visually describe a {}, a type of pet."),  # 'OxfordPets'
    "stanford_cars": (9, "How can you identify a(n) {}?", "Describe what a {}, a type of car, looks like"),  # 'Stanford-Cars'
}


@pytest.mark.parametrize("dataset", sorted(REFERENCE_SETS))
def test_each_known_dataset_gets_the_reference_template_set(dataset):
    count, first, last = REFERENCE_SETS[dataset]
    templates = get_templates(get_benchmark(dataset).templates)
    assert (len(templates), templates[0], templates[-1]) == (count, first, last)


def test_clip_sets_stay_available_under_their_own_names():
    assert len(get_templates("imagenet_openai80")) == 80
    assert get_templates("cifar100_openai18") == get_templates("cifar10")
    assert len(get_templates("caltech101_openai34")) == 34
    assert get_templates("eurosat_openai3") == (
        "a centered satellite photo of {}.", "a centered satellite photo of a {}.", "a centered satellite photo of the {}.")


@pytest.mark.parametrize(("line", "class_name", "named"), [
    ("BAGS often hang from a shoulder strap.", "bag", True),  # case, plural
    ("T-Shirts have short sleeves.", "t-shirt", True),  # hyphen folded, plural
    ("A butterfly rests with folded wings.", "butterflies", True),  # plural class name, singular line
    ("Its annual crop land shows stripes.", "Annual_Crop_Land", True),  # underscores folded
    ("A handbag has a clasp.", "bag", False),  # whole words only
    ("It has two handles.", "bag", False),
])
def test_a_line_names_its_class_whatever_the_case_spacing_or_number(line, class_name, named):
    assert names_class(line, class_name) is named


def _answer_per_class(request):
    """One answer for every question: a line without the class name and two with it."""
    c = next(name for name in ("t-shirt", "bag") if f"a {name}" in prompt_of(request))
    plural = "T-Shirts" if c == "t-shirt" else "BAGS"
    return openai_completion(
        f"Here are 3 answers:\n1. It is often shown flat on a white background.\n"
        f"2. {plural} often come in many colours.\n3. A {c} has clear edges in a photo.")


def test_llm_lines_without_the_class_name_get_it_prepended_and_are_counted(tmp_path):
    api = FakeAPI(lambda request, n: _answer_per_class(request))
    result = describe_classes(["t-shirt", "bag"], provider=provider("openai", api), count=3, cache_dir=tmp_path)
    assert result.descriptions["bag"] == [
        "bag: It is often shown flat on a white background.",
        "BAGS often come in many colours.",
        "A bag has clear edges in a photo.",
    ]
    assert result.descriptions["t-shirt"][:2] == [
        "t-shirt: It is often shown flat on a white background.", "T-Shirts often come in many colours."]
    assert result.provenance["prefix_class_name"] is True
    assert result.provenance["class_name_prefixed"] == {"t-shirt": 1, "bag": 1}
    assert all('Every sentence must contain the name "bag".' in prompt_of(r)
               for r in api.requests if "a bag" in prompt_of(r))


def test_switch_off_keeps_lines_as_written_and_costs_no_request(tmp_path):
    api = FakeAPI(lambda request, n: _answer_per_class(request))
    describe_classes(["bag"], provider=provider("openai", api), count=3, cache_dir=tmp_path)
    silent = FakeAPI(lambda request, n: pytest.fail("a request was sent"))
    off = describe_classes(["bag"], provider=provider("openai", silent), count=3, cache_dir=tmp_path,
                           rules=CleanRules(prefix_class_name=False))
    assert off.descriptions["bag"][0] == "It is often shown flat on a white background."
    assert off.provenance["prefix_class_name"] is False
    assert off.provenance["class_name_prefixed"] == {"bag": 0}


def test_descriptions_from_a_file_are_used_as_written(tmp_path):
    path = DescriptionSet({"bag": ["It has two handles and a zip."]}).save(tmp_path / "bag.json")
    assert describe_classes(["bag"], provider=FileProvider(path)).descriptions == {"bag": ["It has two handles and a zip."]}


def test_the_default_prompt_set_asks_for_the_class_name_and_is_a_new_version():
    prompts = load_prompt_set(DEFAULT_PROMPT_SET)
    assert all('contain the name "sneaker"' in q for q in prompts.render_questions("sneaker", None, 5))
    assert prompts.hash != load_prompt_set("nola_v1").hash  # cached v1 answers are not reused


class _OpenAICompatibleServer(BaseHTTPRequestHandler):
    """A local OpenAI-compatible chat server answering as `_answer_per_class` does, for any class."""

    def do_POST(self):
        prompt = json.loads(self.rfile.read(int(self.headers["content-length"])))["messages"][-1]["content"]
        c = prompt.split('contain the name "')[1].split('"')[0]
        body = openai_completion(f"1. It is often shown flat on a white background.\n2. A {c} has clear edges.").content
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def llm_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAICompatibleServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_class_descriptions_asset_reports_prefixed_lines_and_keys_the_switch(tmp_path, llm_server):
    from assets_helpers import copy_demo, materialize_partition, resources_for_test, table_rows

    from nola_assets.artifacts import ArtifactStore
    from nola_assets.assets import class_descriptions
    from nola_assets.resources import DescriptionsResource

    copy_demo(tmp_path / "data", "ds")
    resources = resources_for_test(tmp_path / "data", tmp_path / "artifacts")
    runs = {}
    for switch in (True, False):
        resources["descriptions"] = DescriptionsResource(
            descriptions="openai-compatible", descriptions_base_url=llm_server, descriptions_model="local",
            descriptions_count=2, descriptions_cache=str(tmp_path / "cache"), descriptions_prefix_class=switch)
        result = materialize_partition(resources, [class_descriptions], "ds")
        metadata = result.asset_materializations_for_node("class_descriptions")[0].metadata
        runs[switch] = ({k: v.value for k, v in metadata.items()},
                        ArtifactStore(artifact_root=str(tmp_path / "artifacts")).require_ref("class_descriptions", "ds"))
    on, off = runs[True][0], runs[False][0]
    assert (on["descriptions"], on["class_name_prefixed"], on["lines_naming_class"]) == (8, 4, 1.0)
    assert (off["descriptions"], off["class_name_prefixed"], off["lines_naming_class"]) == (8, 0, 0.5)
    assert ("bag", 2, 1) in [row[:3] for row in table_rows(on["per_class"])]  # class, descriptions, prefixed
    assert runs[True][1].key["prefix_class_name"] is True and runs[False][1].key["prefix_class_name"] is False
    assert runs[True][1].digest != runs[False][1].digest
