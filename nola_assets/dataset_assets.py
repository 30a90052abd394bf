"""The dataset group: `dataset_manifest`, every readable image of a dataset folder.

    preflight (nola_assets.preflight_asset) ─> dataset_manifest ─> every image-dependent asset
"""

import time

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from nola_core.data import Manifest, build_manifest, known_labels
from nola_core.data.loading import evaluation_records

from nola_assets import reporting
from nola_assets.artifacts import ArtifactStore, digest_of
from nola_assets.common import allocate_or_reuse, asset_result, image_progress, nola_asset
from nola_assets.datasets import LABELED_TABLE, UNLABELED_TABLE, image_set_version, load_manifests
from nola_assets.preflight_asset import preflight
from nola_assets.resources import DatasetsResource


def _removed_images(context: AssetExecutionContext, before: Manifest | None, now: Manifest) -> dict:
    """Name images gone since the last manifest, and say when fewer are here than the sensor saw."""
    metadata: dict = {}
    if before is not None:
        present = set(now.ids)
        removed = sorted(r.path for r in before.records if r.image_id not in present)
        if removed:
            context.log.warning(f"{len(removed)} image(s) gone since the last manifest: " + ", ".join(removed[:10]))
            metadata["removed_since_last_manifest"] = MetadataValue.json(removed[:100])
    seen_by_sensor = context.run.tags.get("nola/images") if context.run else None
    scanned = len(now) + len(now.skipped)  # the sensor counts image files, readable or not
    if seen_by_sensor is not None and int(seen_by_sensor) > scanned:
        missing = int(seen_by_sensor) - scanned
        context.log.warning(f"{missing} image(s) counted at the sensor tick are gone (deleted before this run)")
        metadata["gone_since_sensor_tick"] = missing
    return metadata


@nola_asset(group="dataset", version="1", kinds={"polars", "parquet"}, deps=[preflight])
def dataset_manifest(context: AssetExecutionContext, data: DatasetsResource, artifacts: ArtifactStore) -> MaterializeResult:
    """Every readable image of the dataset folder, identified by the SHA-256 of its bytes.

    `unlabeled/` holds the images to classify; `labeled/<class>/`, when present, is used only to
    report accuracy, never to train or choose. Unreadable files are listed, not fatal. A rescan
    re-hashes only files whose size or modification time changed.
    """
    started = time.perf_counter()
    name = context.partition_key
    spec = data.spec(name)
    previous = artifacts.load_ref("dataset_manifest", name)
    before_unlabeled, before_labeled = load_manifests(artifacts, previous) if previous else (None, None)
    unlabeled = build_manifest(spec, "unlabeled", previous=before_unlabeled,
                               progress=image_progress(context, "hashing unlabeled/"))
    labeled = build_manifest(spec, "labeled", previous=before_labeled) if spec.labeled_dir.is_dir() else None
    tables = {UNLABELED_TABLE: unlabeled.to_polars()}
    if labeled is not None:
        tables[LABELED_TABLE] = labeled.to_polars()
    spec_facts = {"name": spec.name, "classes": list(spec.classes), "templates": spec.templates, "domain": spec.domain}
    ref, reused = allocate_or_reuse(
        context, artifacts, spec=spec_facts,
        # Paths, ids, labels and skip reasons: what downstream reads (sizes and mtimes are not).
        **{table: digest_of(frame.select("path", "image_id", "label", "skipped").rows())
           for table, frame in tables.items()})
    if not reused:  # a reused manifest keeps the sizes and mtimes it first saw: only the key's columns matter
        for table, frame in tables.items():
            artifacts.write_table(ref, table, frame)
    version = image_set_version(unlabeled)
    ref = ref.with_facts(classes=list(spec.classes), has_labels=labeled is not None, image_set_version=version)

    held_out = len(evaluation_records(unlabeled, labeled)) - len(unlabeled)
    metadata = {
        "images": len(unlabeled),
        "skipped_files": len(unlabeled.skipped),
        "classes": reporting.per_class_table({"index": list(range(len(spec.classes))), "class": list(spec.classes)}),
        "labelled_images": len(labeled) if labeled is not None else 0,
        "labelled_copies_of_unlabeled": len(known_labels(unlabeled, labeled)) if labeled is not None else 0,
        "held_out_labelled_images": held_out,
        "image_set_fingerprint": unlabeled.fingerprint,
        "image_set_version": version,
        "dataset_dir": MetadataValue.path(str(spec.root)),
    }
    metadata.update(_removed_images(context, before_unlabeled, unlabeled))
    if unlabeled.skipped:
        context.log.warning(f"{len(unlabeled.skipped)} file(s) under unlabeled/ left out: "
                            + "; ".join(f"{s.path} ({s.reason})" for s in unlabeled.skipped[:10]))
        metadata["skipped"] = MetadataValue.md(reporting.markdown_table(
            ["file", "reason"], [(s.path, s.reason) for s in unlabeled.skipped[:200]]))
    return asset_result(ref, started, metadata, reused=reused)
