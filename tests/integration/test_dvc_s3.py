"""A real S3 remote: moto's server on the loopback, DVC's own S3 client (dvc-s3) talking to it over
HTTP. An ingested dataset version is pushed, the local cache and the dataset are removed, and a pull
brings back the same bytes; the bucket holds a number of objects set by the shards, not the images."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medops.config import IngestConfig
from medops.ops import dvc
from medops.stages import ingest

pytestmark = [pytest.mark.dvc, pytest.mark.slow]

BUCKET = "medops-datasets"


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def s3(free_port, monkeypatch):
    """moto's S3 server on 127.0.0.1 and a bucket in it; the credentials are moto's fakes, in the
    environment, where DVC's S3 client (and a user's) reads them."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"endpoint": f"http://127.0.0.1:{port}", "client": client}
    finally:
        server.stop()


def test_push_to_s3_clear_the_cache_pull_back_the_same_bytes(s3, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from _small_export import write_small_export

    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    dvc.init(root)
    # the two lines a user changes for their own bucket (README): the URL, and the endpoint for an
    # S3-compatible store (none for AWS itself)
    dvc.ensure_remote(root, "storage", f"s3://{BUCKET}/medops")
    dvc.configure_remote(root, "storage", endpointurl=s3["endpoint"])

    dataset = root / "data" / "deidentified"
    res = ingest.run(IngestConfig(workers=1, image_size=8, shard_size=128),
                     source_dir=write_small_export(tmp_path / "src", 300), out_dir=dataset, key=b"k" * 32)
    assert (res.used, res.shards) == (300, 3)
    expected = _digests(dataset)
    version = dvc.version_dataset(root, dataset, push=True)

    objects = [o["Key"] for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
               for o in page.get("Contents", [])]
    # one object per file of the dataset (2 per shard + 4) and the folder's listing (.dir): 300
    # images, 11 objects
    assert len(objects) == len(expected) + 1 == 2 * res.shards + 4 + 1
    assert any(o.endswith(version.removesuffix(".dir")[2:] + ".dir") for o in objects)

    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(dataset)
    dvc.pull(root, [dataset])
    assert _digests(dataset) == expected
    assert dvc.status(root, cloud=True) == {}
