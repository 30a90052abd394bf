"""The data-root sensor on an s3:// data root and artifact root (moto server on localhost): datasets
registered and runs requested from listings and HEADs alone, no object read (counted on the server)."""

from __future__ import annotations

import io
import json

from dagster import DagsterInstance, build_sensor_context
from PIL import Image

from nola_assets.artifacts import ArtifactStore
from nola_assets.resources import DatasetsResource
from nola_assets.sensors import RERUN_ON_NEW_IMAGES, unlabeled_images_sensor
from nola_core.storage import open_storage

from tests.s3_server import s3_server  # noqa: F401  (module-scoped fixture)


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 7, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sensor_on_s3_registers_and_requests_without_reading_objects(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    data = open_storage(f"s3://{bucket}/data")
    spec = b"name: {name}\nclasses: [cat, dog]\n"
    for name, images in {"pets": 3, "more": 2}.items():
        data.publish(f"{name}/dataset.yaml", spec.replace(b"{name}", name.encode()))
        for i in range(images):
            data.publish(f"{name}/unlabeled/{i:03d}.png", _png(i))
    data.publish("notes/readme.txt", b"not a dataset: no dataset.yaml")
    data.publish("pets/unlabeled/.hidden.png", _png(99))
    stored = open_storage(f"s3://{bucket}/artifacts")  # "more" had a manifest (as a run on another machine left it)
    ref = {"asset": "dataset_manifest", "dataset": "more", "digest": "d1", "path": "/elsewhere", "key": {}, "facts": {}}
    stored.put("more/dataset_manifest/d1/ref.json", json.dumps(ref).encode())
    stored.put("refs/more/dataset_manifest.json", json.dumps(ref).encode())
    instance = DagsterInstance.ephemeral()
    resources = {"data": DatasetsResource(data_root=f"s3://{bucket}/data", sensor_quiet_seconds=0),
                 "artifacts": ArtifactStore(artifact_root=f"s3://{bucket}/artifacts", cache_dir=str(tmp_path / "cache"))}
    cursor = None

    def tick():
        nonlocal cursor
        mark = len(s3_server.requests)
        result = unlabeled_images_sensor(build_sensor_context(instance=instance, cursor=cursor, resources=resources))
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        cursor = result.cursor
        requests = s3_server.since(mark, bucket)
        assert requests and not [r for r in requests if r.reads_object]  # listings and HEADs only
        assert not (tmp_path / "cache").exists()  # nothing downloaded
        return result, requests

    first, requests = tick()
    [added] = first.dynamic_partitions_requests
    assert sorted(added.partition_keys) == ["more", "pets"]
    assert {(r.partition_key, r.tags["nola/images"]) for r in first.run_requests} == {("more", "2"), ("pets", "3")}
    selections = {r.partition_key: r.asset_selection for r in first.run_requests}
    assert selections["pets"] is None and selections["more"] == RERUN_ON_NEW_IMAGES  # the manifest: one HEAD
    gets = [r for r in requests if r.method == "GET"]
    assert all("list-type=2" in r.query for r in gets)  # every GET is a listing (ListObjectsV2)
    assert sum("delimiter=&" in r.query for r in gets) == 2  # one full listing per dataset folder

    assert tick()[0].run_requests == []  # nothing changed

    data.fs.pipe_file(data.path("pets/unlabeled/001.png"), _png(201))  # same size, new bytes: a new ETag
    [changed] = tick()[0].run_requests
    assert changed.partition_key == "pets" and changed.run_key.startswith("pets:2:")

    data.publish("more/unlabeled/new.png", _png(5))
    [grown] = tick()[0].run_requests
    assert grown.partition_key == "more" and grown.tags["nola/images"] == "3"
