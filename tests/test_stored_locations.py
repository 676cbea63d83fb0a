"""Credentials and tokens in image URLs are never stored, in features or errors (issue 15).

A URL with ``user:password@`` in its authority is refused before any
connection; but credentials and secrets can also ride in a fragment (never
sent), in a URL nested in the query, or as a signed URL's token. Those URLs
are fetched as given, and what is stored is the redacted location.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.locations import redact_location
from pipeline.run import run
from tests.http_fixtures import http_server  # noqa: F401 - fixture

SECRETS = ("hunter2", "S3CR3T", "AKIAXYZ", "sigvalue")


def test_redaction_rule():
    cases = {
        "http://u:hunter2@h.example/a.jpg": "http://***@h.example/a.jpg",
        "http://h.example/a.jpg#u:hunter2@x": "http://h.example/a.jpg#***",
        "http://h.example/a.jpg?next=http://u:hunter2@y/": "http://h.example/a.jpg?next=http://***@y/",
        "https://b.s3.example/a.jpg?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=S3CR3T&w=200":
            "https://b.s3.example/a.jpg?X-Amz-Credential=***&X-Amz-Signature=***&w=200",
        "https://h.example/a.jpg?sig=sigvalue;token=S3CR3T": "https://h.example/a.jpg?sig=***;token=***",
        "https://h.example/a.jpg?size=large&page=2": "https://h.example/a.jpg?size=large&page=2",
        "/data/images/u:p@x?token=1.jpg": "/data/images/u:p@x?token=1.jpg",  # a file name, not a URL
    }
    for given, stored in cases.items():
        assert redact_location(given) == stored, given


def test_fetched_urls_with_secrets_are_stored_redacted(tmp_path, http_server, tiny_model):  # noqa: F811
    urls = [http_server.url("image.jpg") + "#u:hunter2@x",
            http_server.url("image.jpg") + "?next=http://u:hunter2@y/&n=1",
            http_server.url("image.jpg") + "?X-Amz-Credential=AKIAXYZ&X-Amz-Signature=S3CR3T",
            http_server.url("image.jpg") + "?sig=sigvalue&n=3",
            http_server.url("status/404") + "?token=S3CR3T"]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,image\n" + "".join(f"p{i},{u}\n" for i, u in enumerate(urls)))
    manifest = run([f"--input={catalog}", f"--output={tmp_path / 'out'}", f"--model={tiny_model}",
                    "--allow_private_hosts", "--top_k=2", "--force_publish", "--no_progress"])
    assert manifest["counts"]["embedded"] == 4 and manifest["counts"]["failed"] == 1
    run_dir = manifest["run_dir"]
    stored = {}
    for shard in glob.glob(os.path.join(run_dir, "features", "*.parquet")):
        for row in pq.read_table(shard, columns=["product_id", "image"]).to_pylist():
            stored[row["product_id"]] = row["image"]
    for shard in glob.glob(os.path.join(run_dir, "errors", "*.jsonl")):
        with open(shard, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                stored[record["product_id"]] = record["image"]
    assert stored == {f"p{i}": redact_location(u) for i, u in enumerate(urls)}
    paths = [p for p in glob.glob(os.path.join(run_dir, "**", "*"), recursive=True)
             if os.path.isfile(p)]
    everything = b"".join(Path(p).read_bytes() for p in paths).decode("latin-1")
    for secret in SECRETS:
        assert secret not in everything
