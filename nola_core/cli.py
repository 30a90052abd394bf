"""The `nola` command line: one argparse parser, one function per subcommand.

The commands here need no Dagster: init, describe, report, export, predict, weights. Where
Dagster is installed (`pip install 'nola[dagster]'`), run, demo and dev come from nola_assets.cli;
without it those names answer with the install command. Handlers import what they need when
they run.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path

DAGSTER_COMMANDS_MODULE = "nola_assets.cli"
"""Its `add_commands(subparsers)` adds the Dagster commands. Looked up by name, and only where
Dagster is importable: the core imports nothing of nola_assets (tests/test_core_imports.py)."""
DAGSTER_COMMANDS = ("run", "demo", "dev")
"""The commands it adds, named here so that without Dagster they say how to get them."""
DAGSTER_INSTALL = "pip install 'nola[dagster]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nola", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_init(subparsers)
    _add_describe(subparsers)
    _add_report(subparsers)
    _add_export(subparsers)
    _add_predict(subparsers)
    _add_weights(subparsers)
    _add_dagster_commands(subparsers)
    return parser


def _add_dagster_commands(subparsers: argparse._SubParsersAction) -> None:
    """nola_assets' commands where Dagster is importable, else a stand-in for each that names the extra."""
    if importlib.util.find_spec("dagster") is not None:
        importlib.import_module(DAGSTER_COMMANDS_MODULE).add_commands(subparsers)
        return
    for name in DAGSTER_COMMANDS:
        needs = f"needs Dagster: {DAGSTER_INSTALL}"
        p = subparsers.add_parser(name, help=needs, description=f"`nola {name}` runs the Dagster asset graph: it {needs}.")
        p.set_defaults(handler=functools.partial(_needs_dagster, name), any_arguments=True)


def _needs_dagster(name: str, args: argparse.Namespace) -> int:
    print(f"nola {name}: error: this command runs the Dagster asset graph, and Dagster is not installed "
          f"here: {DAGSTER_INSTALL} (in a checkout: pip install -e '.[dagster]')", file=sys.stderr)
    return 1


def _add_init(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "init",
        help="make a dataset of a folder of images: dataset.yaml, images under unlabeled/",
        description="Write FOLDER/dataset.yaml and put every image of FOLDER (any nesting) under "
        "FOLDER/unlabeled/: linked (relative symlinks, the default) or moved (--move), never copied. "
        "Subfolders named after classes can also become the evaluation split (--evaluate-class-folders): "
        "labeled/<class>/ then links to their images. Prints the command that runs NoLA on it.",
    )
    p.add_argument("folder", type=Path, help="the folder of images; dataset.yaml is written in it")
    classes = p.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help='class names, comma-separated, in order: "cat, dog, bird"')
    classes.add_argument("--classes-file", type=Path,
                         help="a text file of class names, one per line (or comma-separated; # comments)")
    p.add_argument("--move", action="store_true", help="move the images under unlabeled/ instead of linking them")
    p.add_argument("--evaluate-class-folders", action=argparse.BooleanOptionalAction,
                   help="use subfolders named after classes as the evaluation split (labeled/<class>/: accuracy "
                   "is reported on those images, never used to train or choose anything), or not (--no-...); "
                   "required when such subfolders exist")
    p.add_argument("--name", help="dataset name (default: the folder's name)")
    p.add_argument("--domain", help="what the images are, for the LLM's questions, e.g. 'satellite photo'")
    p.set_defaults(handler=_init)


def _init(args: argparse.Namespace) -> int:
    """`nola init`: the core's init_dataset, its outcome and the next command. Class subfolders
    are never used or ignored silently: without either flag, nothing is done and the choice offered."""
    import shlex

    from nola_core.data import DatasetSpecError
    from nola_core.data.init import find_class_folders, init_dataset, parse_classes

    try:
        text = args.classes if args.classes is not None else args.classes_file.read_text(encoding="utf-8")
        classes = parse_classes(text)
        if args.evaluate_class_folders is None and args.folder.is_dir():
            found = find_class_folders(args.folder, classes)
            if found:
                print(f"nola init: {args.folder} has subfolders named after classes ({', '.join(found)}). Rerun with "
                      "--evaluate-class-folders to use them as the evaluation split (labeled/<class>/: accuracy "
                      "reported on them, never used to train), or --no-evaluate-class-folders to treat them as "
                      "unlabeled images only.", file=sys.stderr)
                return 2
        result = init_dataset(args.folder, classes, placement="move" if args.move else "link",
                              name=args.name, evaluate_class_folders=bool(args.evaluate_class_folders),
                              domain=args.domain)
    except (DatasetSpecError, OSError) as error:
        print(f"nola init: error: {error}", file=sys.stderr)
        return 1
    spec = result.spec
    verb = "moved" if result.placement == "move" else "linked"
    print(f"wrote {spec.root / 'dataset.yaml'}: dataset {spec.name!r}, {len(spec.classes)} classes")
    print(f"{verb} {result.placed} images under {spec.unlabeled_dir}")
    if result.labeled:
        print(f"evaluation split: {sum(result.labeled.values())} images linked under {spec.labeled_dir}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"next: nola run {shlex.quote(str(spec.root))}")
    return 0


def _add_describe(subparsers: argparse._SubParsersAction) -> None:
    from nola_core.llm import DEFAULT_PROMPT_SET, PROVIDER_NAMES

    p = subparsers.add_parser(
        "describe",
        help="write visual class descriptions with an LLM (or a file, or templates)",
        description="Describe every class of a dataset; prints the descriptions and writes them "
        "as JSON with provenance. Answers are cached per class, so a rerun after a failure asks "
        "only for the missing classes.",
    )
    p.add_argument("dataset", help="dataset folder (with dataset.yaml), its dataset.yaml, or the bundled demo name")
    p.add_argument("--provider", choices=PROVIDER_NAMES, default="auto",
                   help="auto: anthropic if ANTHROPIC_API_KEY is set, else openai if OPENAI_API_KEY, else templates")
    p.add_argument("--model", help="model name (defaults: claude-haiku-4-5, gpt-4.1-mini)")
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:11434/v1 (Ollama)")
    p.add_argument("--api-key-env", help="environment variable holding the key of an OpenAI-compatible server")
    p.add_argument("--source", help="descriptions file for --provider file (default: the dataset's `descriptions`)")
    p.add_argument("--prompt-set", default=DEFAULT_PROMPT_SET,
                   help=f"prompts/<name>.yaml or a YAML path (default {DEFAULT_PROMPT_SET})")
    p.add_argument("--prompts-dir", help="folder of prompt sets (default: see NOLA_PROMPTS_DIR)")
    p.add_argument("--domain", help="what the images are, e.g. 'satellite photo' (default: the dataset's domain)")
    p.add_argument("--count", type=int, default=10, help="answers asked per question (default 10)")
    p.add_argument("--temperature", type=float,
                   help="sampling temperature for openai(-compatible) models (default: the model's own)")
    p.add_argument("--max-tokens", type=int, default=1024, help="answer length limit per question")
    p.add_argument("--concurrency", type=int, default=4, help="classes asked at once (default 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--retries", type=int, default=4, help="retries on 429, 5xx and timeouts (default 4)")
    p.add_argument("--cache-dir", default=".nola_cache/descriptions",
                   help="per-class answer cache, readable JSON you may commit (default .nola_cache/descriptions)")
    p.add_argument("--out", help="output JSON (default ./<dataset name>.descriptions.json)")
    p.set_defaults(handler=_describe)


def _describe(args: argparse.Namespace) -> int:
    """`nola describe`: resolve the dataset, build the provider, describe, print, write."""
    from nola_core.data import DatasetSpecError, load_dataset_spec
    from nola_core.demo import DEMO_DATASET, demo_dataset_path
    from nola_core.llm import CallPolicy, LLMError, describe_classes, make_provider
    from nola_core.llm.prompts import PROMPTS_ENV

    try:
        target = Path(args.dataset)
        if target.name == "dataset.yaml":
            target = target.parent
        elif not target.exists() and args.dataset == DEMO_DATASET:
            target = demo_dataset_path()
        spec = load_dataset_spec(target)
        provider = make_provider(
            args.provider,
            model=args.model,
            base_url=args.base_url,
            api_key_env=args.api_key_env,
            path=args.source or spec.descriptions,
            policy=CallPolicy(timeout_s=args.timeout, max_retries=args.retries),
        )
        result = describe_classes(
            spec.classes,
            provider=provider,
            prompt_set=args.prompt_set,
            domain=args.domain or spec.domain,
            count=args.count,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            cache_dir=args.cache_dir,
            concurrency=args.concurrency,
            prompts_dir=args.prompts_dir or os.environ.get(PROMPTS_ENV) or None,  # an edge: reads it
        )
    except (DatasetSpecError, LLMError, ValueError, FileNotFoundError) as error:
        print(f"nola describe: error: {error}", file=sys.stderr)
        return 1
    for name, sentences in result.descriptions.items():
        print(f"{name} ({len(sentences)}):")
        print("\n".join(f"  - {s}" for s in sentences))
    out = result.save(args.out or f"{spec.name}.descriptions.json")
    print(f"wrote {out} ({provider.name}, content hash {result.content_hash[:12]})", file=sys.stderr)
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="which method wins where: the dataset x method table from every evaluation table",
        description="Query every evaluation table (parquet) under --root through one DuckDB view; print the "
        "dataset x method table of final-stage top-1 accuracy (mean +- std over seeds) and write it as "
        "report.md and report.png into --out.",
    )
    p.add_argument("--root",
                   help="folder or URL (s3://bucket/prefix/evaluation) of evaluation parquet files, searched "
                   "recursively (default: NOLA_EVALUATION_ROOT, else the artifact store's evaluation folder, "
                   "$NOLA_ARTIFACT_ROOT/evaluation, artifacts/evaluation by default: where `nola demo` and "
                   "`nola run` write); a URL is copied into NOLA_CACHE_DIR (default .nola_cache/objects) first")
    p.add_argument("--out", help="where report.md and report.png go (default: --root, or its copy in the cache)")
    p.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    """`nola report`: print the table, write the markdown and the chart."""
    from nola_core.artifact_refs import cache_dir
    from nola_core.report import default_evaluation_root, write_report
    from nola_core.storage import local_copy

    try:
        root = local_copy(args.root or default_evaluation_root(os.environ), cache_dir(os.environ))
        report = write_report(root, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"nola report: error: {error}", file=sys.stderr)
        return 1
    print(report.text)
    print(f"wrote {report.markdown} and {report.chart}", file=sys.stderr)
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="copy the adapted classifier of a dataset out of the artifact store into a folder",
        description="Copy the latest materialized `exported_classifier` of DATASET (classifier.json + "
        "trainable.safetensors: trainable tensors, base-model identity, preprocessing, class names, "
        "provenance) from the artifact store (NOLA_ARTIFACT_ROOT: a folder, default artifacts/, or a URL, "
        "s3://bucket/prefix, read through its copy in NOLA_CACHE_DIR, default .nola_cache/objects) to --to. "
        "`nola predict` or nola_core.export.load_classifier load it back.",
    )
    p.add_argument("dataset", help="dataset (partition) name, e.g. fashion_mini")
    p.add_argument("--to", required=True, type=Path, help="destination folder (created)")
    p.add_argument("--onnx", action="store_true",
                   help="also write vision.onnx (normalised images -> logits) and check it with onnxruntime "
                   "when installed (pip install 'nola[onnx]')")
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    """`nola export`: copy the export; optionally add and verify the ONNX vision path."""
    from nola_core.artifact_refs import artifact_root, cache_dir
    from nola_core.data import DatasetSpecError
    from nola_core.export import copy_export

    try:
        target = copy_export(artifact_root(os.environ), args.dataset, args.to, cache_dir(os.environ))
    except (FileNotFoundError, DatasetSpecError) as error:
        print(f"nola export: error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.dataset} to {target}")
    if args.onnx:
        import torch

        from nola_core.export import ONNX_NAME, export_onnx, load_classifier, onnx_max_abs_difference

        try:
            import onnx  # noqa: F401  (torch's exporter needs it)
        except ImportError:
            print("nola export: error: --onnx needs the onnx package: pip install 'nola[onnx]'", file=sys.stderr)
            return 1
        exported = load_classifier(target)
        path = export_onnx(exported, target / ONNX_NAME)
        print(f"wrote {path}")
        try:
            size = exported.preprocess.image_size
            difference = onnx_max_abs_difference(path, exported, torch.randn(2, 3, size, size))
        except ImportError:
            print("(onnxruntime not installed: the ONNX file was not verified)", file=sys.stderr)
        else:
            print(f"onnxruntime check: max |logit difference| = {difference:.2e}")
    return 0


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify images with an exported classifier (`nola export` folder)",
        description="Load the classifier in DIR with nola_core.export.load_classifier and print the top "
        "classes with their probabilities for every image.",
    )
    p.add_argument("export_dir", type=Path, help="a `nola export` folder (classifier.json)")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("-k", "--top", type=int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--clip-checkpoint", help="local copy of the base CLIP weights (instead of downloading them)")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    """`nola predict`: one line per image, `path<TAB>class (p) class (p) ...`."""
    from nola_core.export import load_classifier
    from nola_core.models.weights import WEIGHTS_DIR_ENV

    try:
        classifier = load_classifier(args.export_dir, args.device, args.clip_checkpoint,
                                     os.environ.get(WEIGHTS_DIR_ENV) or None)  # an edge: reads the variable
        probabilities = classifier.predict(args.images)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"nola predict: error: {error}", file=sys.stderr)
        return 1
    for path, top in zip(args.images, classifier.top_classes(probabilities, args.top)):
        print(f"{path}\t" + "  ".join(f"{name} ({p:.3f})" for name, p in top))
    return 0


def _add_weights(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "weights",
        help="pretrained weights for machines without internet",
        description="`nola weights download` on a connected machine writes a folder of weights; on the machine "
        "without internet, NOLA_WEIGHTS_DIR (or --weights-dir) makes every model load from it, each file "
        "checked against the SHA-256 of the folder's manifest.json.",
    )
    actions = p.add_subparsers(dest="action", required=True)
    download = actions.add_parser(
        "download",
        help="fetch a profile's (or named) open_clip and timm checkpoints into a folder, with a manifest",
        description="Fetch through open_clip's and timm's own download functions, write the files under --to "
        "with manifest.json (model names, tags, file names, SHA-256, sizes). Downloading into a folder again "
        "adds to its manifest.",
    )
    download.add_argument("--to", required=True, type=Path, help="the weights folder (created)")
    download.add_argument("--profile", choices=("paper", "tiny", "mini"),
                          help="the models of a profile (default: paper, unless --clip or --dino is given)")
    download.add_argument("--clip", action="append", default=[], metavar="NAME:TAG",
                          help="an open_clip architecture and pretrained tag, e.g. ViT-B-32:openai (repeatable)")
    download.add_argument("--dino", action="append", default=[], metavar="TIMM_NAME",
                          help="a timm name with its tag, e.g. vit_base_patch16_224.dino (repeatable)")
    download.set_defaults(handler=_weights_download)


def _weights_download(args: argparse.Namespace) -> int:
    """`nola weights download`: the requests of the profile and the named models, fetched in order."""
    from nola_core.models import ModelConfig
    from nola_core.models.weights import WEIGHTS_DIR_ENV, clip_request, dino_request, download_weights

    try:
        requests = []
        if args.profile or not (args.clip or args.dino):
            config = ModelConfig.from_profile(args.profile or "paper")
            if config.clip_pretrained is not None and config.clip_checkpoint is None:
                requests.append(clip_request(config.clip_name, config.clip_pretrained))
            if config.dino_pretrained and config.dino_checkpoint is None:
                requests.append(dino_request(config.dino_name))
        for named in args.clip:
            name, _, tag = named.partition(":")
            if not (name and tag):
                raise ValueError(f"--clip {named!r}: expected NAME:TAG, e.g. ViT-B-16:openai")
            requests.append(clip_request(name, tag))
        requests += [dino_request(name) for name in args.dino]
        if not requests:
            print(f"nothing to download: the {args.profile} profile's models are shipped or random")
            return 0
        download_weights(args.to, requests)
    except Exception as error:  # noqa: BLE001  (offline, unknown tag, disk full: one line, not a traceback)
        print(f"nola weights download: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.to / 'manifest.json'}; on the machine without internet: {WEIGHTS_DIR_ENV}={args.to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):  # a stand-in takes any: it only names the extra
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
