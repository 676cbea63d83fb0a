"""Issue 15, HANG and LEAK classes, through a whole pipeline run.

One run over a manifest whose rows are the hostile inputs of those classes
(FIFOs, sockets, devices and system files named as images, data: and other
unsupported schemes, URLs whose authority parsers disagree about, URLs with
credentials, servers that trickle their status line, headers or chunk
trailers, redirects to private hosts, a text file holding a secret) next to
valid rows. Every row must end as exactly one feature row or one error line
with the expected reason; no connection may leave 127.0.0.1; nothing written
may contain the credentials or the secret; and the run must finish in about
the fetch deadline, not hang. A glob run checks that a FIFO matched by a glob
is refused the same way.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.run import run
from tests.http_fixtures import JPEG, LocalHttpServer
from tests.test_bad_inputs import loopback_only, write_manifest

SECRET = "sk_live_4f9a8b7c6d5e"
PASSWORD = "hunter2pw"  # as tests/http_fixtures.py's /redirect-with-credentials sends it
TOTAL_TIMEOUT = 2


def cases(directory: Path, server: LocalHttpServer) -> list[tuple[str, str, str | None]]:
    """(id, image cell, expected reason or None for embedded) for every row."""
    images = directory / "images"
    images.mkdir()
    (images / "good.jpg").write_bytes(JPEG)
    (images / "secret.jpg").write_text(f"API_KEY={SECRET}\n")
    os.mkfifo(images / "pipe.jpg")
    (images / "to-pipe.jpg").symlink_to(images / "pipe.jpg")
    (images / "to-zero.jpg").symlink_to("/dev/zero")
    (images / "folder.jpg").mkdir()
    base = server.url("").rstrip("/")
    port = server.port
    return [
        ("good-file", "images/good.jpg", None),
        ("good-url", f"{base}/image.jpg", None),
        ("good-chunked", f"{base}/chunked", None),
        ("fifo", "images/pipe.jpg", "is_fifo"),
        ("symlink-to-fifo", "images/to-pipe.jpg", "is_fifo"),
        ("socket", "images/sock.jpg", "is_socket"),
        ("symlink-to-dev-zero", "images/to-zero.jpg", "system_path"),
        ("directory", "images/folder.jpg", "is_directory"),
        ("dev-stdin", "/dev/stdin", "system_path"),
        ("dev-zero", "/dev/zero", "system_path"),
        ("proc-environ", "/proc/self/environ", "system_path"),
        ("data-url", "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==", "data_url"),
        ("hdfs", "hdfs://namenode/a.jpg", "filesystem_unavailable"),
        ("mailto", "mailto:shop@example.com", "forbidden_scheme"),
        ("ftp", "ftp://127.0.0.1/a.jpg", "forbidden_scheme"),
        ("backslash-at", f"http://127.0.0.1:{port}\\@decoy.example/image.jpg", "ambiguous_url"),
        ("backslash-path", f"{base}/a\\image.jpg", "ambiguous_url"),
        ("credentials", f"http://shop:{PASSWORD}@127.0.0.1:{port}/image.jpg", "credentials_in_url"),
        ("at-decoy", f"http://decoy.example@127.0.0.1:{port}/image.jpg", "credentials_in_url"),
        ("percent-host", f"http://127.0.0%2e1:{port}/image.jpg", "ambiguous_url"),
        ("trickle-status", f"{base}/trickle-status", "timeout"),
        ("trickle-headers", f"{base}/trickle-headers", "timeout"),
        ("endless-trailers", f"{base}/endless-trailers", "timeout"),
        ("not-http", f"{base}/not-http", "bad_response"),
        ("redirect-credentials", f"{base}/redirect-with-credentials", "credentials_in_url"),
        ("redirect-backslash", f"{base}/redirect-to?http://127.0.0.1:{port}\\@decoy.example/", "ambiguous_url"),
        ("secret-text", "images/secret.jpg", "not_an_image"),
    ]


def read_outputs(run_dir: str) -> tuple[dict, list, str]:
    """Feature rows by id, error lines, and every byte the run wrote (as text, for leak checks)."""
    tables = [pq.read_table(p) for p in sorted(glob.glob(f"{run_dir}/features/*.parquet"))]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    errors = []
    for path in sorted(glob.glob(f"{run_dir}/errors/*.jsonl")):
        errors += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    written = ""
    for path in glob.glob(f"{run_dir}/**/*", recursive=True):
        if os.path.isfile(path):
            written += Path(path).read_bytes().decode("utf-8", "replace")
    return {r["product_id"]: r for r in rows}, errors, written


@pytest.fixture(scope="module")
def hardening_run(tmp_path_factory, tiny_model):
    directory = tmp_path_factory.mktemp("hardening")
    server = LocalHttpServer().start()
    sock = socket.socket(socket.AF_UNIX)
    try:
        table = cases(directory, server)
        sock.bind(str(directory / "images" / "sock.jpg"))
        sock.listen(1)
        manifest = directory / "catalog.csv"
        write_manifest(manifest, [(pid.encode(), cell.encode(), b"x") for pid, cell, _ in table])
        # Only the allow-listed test server is exempt; 127.0.0.1 is still "private" for the rest.
        started = time.monotonic()
        with loopback_only() as (attempts, refused):
            result = run([f"--input={manifest}", f"--output={directory / 'out'}", f"--model={tiny_model}",
                          "--allow_private_hosts", "--fetch_timeout=1", f"--fetch_total_timeout={TOTAL_TIMEOUT}",
                          "--fetch_retries=1", "--top_k=1", "--force_publish"])
        elapsed = time.monotonic() - started
        features, errors, written = read_outputs(result["run_dir"])
        yield dict(table=table, result=result, features=features, errors=errors, written=written,
                   refused=refused, elapsed=elapsed, hits=dict(server.hits))
    finally:
        sock.close()
        server.stop()


def test_every_row_is_one_feature_row_or_one_error_with_its_reason(hardening_run):
    features, errors = hardening_run["features"], hardening_run["errors"]
    by_id: dict = {}
    for line in errors:
        by_id.setdefault(line["product_id"], []).append(line)
    for pid, _, reason in hardening_run["table"]:
        if reason is None:
            assert pid in features and pid not in by_id, (pid, by_id.get(pid))
        else:
            assert pid not in features, pid
            assert len(by_id.get(pid, [])) == 1, (pid, by_id.get(pid))
            assert by_id[pid][0]["reason"] == reason, (pid, by_id[pid][0])
            assert len(by_id[pid][0]["error"]) >= 20
    counts = hardening_run["result"]["counts"]
    assert counts["input"] == len(hardening_run["table"]) == counts["embedded"] + counts["failed"]
    assert "read:internal_error" not in counts["failed_by_reason"]


def test_no_credentials_secret_or_inline_content_is_written(hardening_run):
    written = hardening_run["written"]
    assert PASSWORD not in written and SECRET not in written and "iVBORw0KGgo" not in written
    images = {e["product_id"]: e["image"] for e in hardening_run["errors"]}
    assert images["credentials"].startswith("http://***@127.0.0.1:")


def test_nothing_hangs_and_no_connection_leaves_loopback(hardening_run):
    assert hardening_run["refused"] == []
    # Trickling servers end at the deadline; FIFOs and devices are never opened.
    assert hardening_run["elapsed"] < 60, hardening_run["elapsed"]
    assert hardening_run["hits"].get("/image.jpg", 0) == 1  # only the good row; no redirect got there


def test_a_fifo_matched_by_a_glob_is_refused_not_waited_on(tmp_path, tiny_model):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(JPEG)
    os.mkfifo(images / "b.jpg")
    result = run([f"--input={images}/*.jpg", f"--output={tmp_path / 'out'}", f"--model={tiny_model}",
                  "--top_k=1", "--force_publish"])
    features, errors, _ = read_outputs(result["run_dir"])
    assert set(features) == {"a"}
    assert [(e["product_id"], e["reason"]) for e in errors] == [("b", "is_fifo")]
