"""``python -m pipeline.export … elasticsearch``: bulk files, mapping, and sending them.

The files are checked line by line against the ``_bulk`` format a cluster
accepts. Sending is tested against a small HTTP server on 127.0.0.1 that speaks
the part of the Elasticsearch API the official client uses here (info, index
exists/create, ``_bulk``, refresh), because no real cluster is available in the
test environment; it rejects chosen documents the way Elasticsearch does, with
HTTP 200 and a per-item error.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pipeline.export import main
from tests.export_fixtures import write_run


def read_bulk_dir(out: str) -> tuple[list[str], list[list[tuple[dict, dict]]]]:
    """The bulk files of an export, each checked for the _bulk framing and parsed into pairs."""
    names = sorted(n for n in os.listdir(out) if n.startswith("bulk-"))
    chunks = []
    for name in names:
        data = open(os.path.join(out, name), "rb").read()
        assert data.endswith(b"\n"), f"{name} must end with a newline for _bulk"
        lines = data.decode("utf-8").split("\n")[:-1]
        assert len(lines) % 2 == 0, f"{name} has an action line without its document"
        pairs = []
        for action_line, doc_line in zip(lines[::2], lines[1::2]):
            action, doc = json.loads(action_line), json.loads(doc_line)
            assert list(action) == ["index"] and set(action["index"]) == {"_index", "_id"}
            assert action["index"]["_id"] == doc["product_id"]
            pairs.append((action, doc))
        chunks.append(pairs)
    return names, chunks


def export(run_path: str, out: str, *extra: str) -> int:
    return main([f"--run={run_path}", "elasticsearch", f"--out={out}", *extra])


def test_bulk_files_hold_every_product_once_with_its_neighbours(tmp_path):
    run = write_run(str(tmp_path / "run"), count=30, top_k=5)
    out = str(tmp_path / "bulk")

    assert export(run.path, out, "--chunk_docs=7", "--index=shop_similar") == 0

    names, chunks = read_bulk_dir(out)
    assert names == [f"bulk-{i:05d}.ndjson" for i in range(5)]
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 2]
    docs = [doc for chunk in chunks for _, doc in chunk]
    assert all(a["index"]["_index"] == "shop_similar" for c in chunks for a, _ in c)
    assert sorted(d["product_id"] for d in docs) == sorted(run.ids)  # each once
    for doc in docs:
        assert doc["model"] == run.model
        assert "embedding" not in doc
        assert [(n["product_id"], n["similarity"]) for n in doc["neighbors"]] == \
            run.neighbors[doc["product_id"]]
    summary = json.load(open(os.path.join(out, "export.json")))
    assert summary["documents"] == 30 and summary["files"] == names


def test_mapping_declares_keywords_nested_neighbours_and_no_vector_by_default(tmp_path):
    run = write_run(str(tmp_path / "run"), count=5)
    out = str(tmp_path / "bulk")
    assert export(run.path, out) == 0
    body = json.load(open(os.path.join(out, "mapping.json")))
    props = body["mappings"]["properties"]
    assert props["product_id"] == {"type": "keyword"}
    assert props["model"] == {"type": "keyword"}
    assert props["neighbors"]["type"] == "nested"
    assert props["neighbors"]["properties"] == {"product_id": {"type": "keyword"},
                                                "similarity": {"type": "float"}}
    assert "embedding" not in props
    assert "settings" in body


def test_embeddings_match_the_features_and_the_dense_vector_mapping(tmp_path):
    run = write_run(str(tmp_path / "run"), count=12, dim=16)
    out = str(tmp_path / "bulk")
    assert export(run.path, out, "--with_embeddings") == 0

    vector_mapping = json.load(open(os.path.join(out, "mapping.json"))
                               )["mappings"]["properties"]["embedding"]
    assert vector_mapping == {"type": "dense_vector", "dims": 16, "index": True,
                              "similarity": "cosine"}
    _, chunks = read_bulk_dir(out)
    docs = [doc for chunk in chunks for _, doc in chunk]
    assert len(docs) == 12
    for doc in docs:
        assert len(doc["embedding"]) == 16
        # exact: the float32 values read back bit for bit
        np.testing.assert_array_equal(np.asarray(doc["embedding"], dtype=np.float32),
                                      run.vector(doc["product_id"]))


def test_chunk_bytes_limits_every_file(tmp_path):
    run = write_run(str(tmp_path / "run"), count=40, dim=32)
    out = str(tmp_path / "bulk")
    assert export(run.path, out, "--with_embeddings", "--chunk_bytes=4KB") == 0

    names, chunks = read_bulk_dir(out)
    sizes = [os.path.getsize(os.path.join(out, n)) for n in names]
    assert len(names) > 1 and max(sizes) <= 4000
    # Files are filled up to the limit: adding the next file's first pair would exceed it.
    for size, following in zip(sizes, names[1:]):
        lines = open(os.path.join(out, following), "rb").read().split(b"\n")
        assert size + len(lines[0]) + len(lines[1]) + 2 > 4000
    assert sum(len(c) for c in chunks) == 40


def test_document_and_byte_limits_apply_together(tmp_path):
    run = write_run(str(tmp_path / "run"), count=40, dim=32)
    out = str(tmp_path / "bulk")
    assert export(run.path, out, "--with_embeddings", "--chunk_bytes=4KB",
                  "--chunk_docs=3") == 0
    names, chunks = read_bulk_dir(out)
    assert max(len(c) for c in chunks) == 3
    assert max(os.path.getsize(os.path.join(out, n)) for n in names) <= 4000
    assert sum(len(c) for c in chunks) == 40


def test_a_document_larger_than_chunk_bytes_is_refused(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"), count=3, dim=64)
    assert export(run.path, str(tmp_path / "bulk"), "--with_embeddings",
                  "--chunk_bytes=200") == 2
    assert "chunk_bytes" in capsys.readouterr().err


def test_re_export_removes_chunks_of_a_larger_previous_export(tmp_path):
    out = str(tmp_path / "bulk")
    big = write_run(str(tmp_path / "big"), count=30)
    assert export(big.path, out, "--chunk_docs=5") == 0
    small = write_run(str(tmp_path / "small"), count=8, prefix="s")
    assert export(small.path, out, "--chunk_docs=5") == 0

    names, chunks = read_bulk_dir(out)
    assert names == ["bulk-00000.ndjson", "bulk-00001.ndjson"]
    assert sorted(d["product_id"] for c in chunks for _, d in c) == sorted(small.ids)


def test_incomplete_run_is_refused_with_one_sentence(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"), count=5, complete=False)
    out = str(tmp_path / "bulk")
    assert export(run.path, out) == 2
    err = capsys.readouterr().err.strip()
    assert "not a complete run" in err and len(err.splitlines()) == 1
    assert not os.path.exists(out)


def test_run_whose_files_disagree_with_its_manifest_is_not_marked_exported(tmp_path, capsys):
    run = write_run(str(tmp_path / "run"), count=5, manifest_products=6)
    out = str(tmp_path / "bulk")
    assert export(run.path, out) == 2
    assert "promises 6" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "export.json"))


# --- sending to a cluster -------------------------------------------------------------------

class FakeElasticsearch(ThreadingHTTPServer):
    """Just enough of Elasticsearch's REST API for index creation and ``_bulk`` loads."""

    daemon_threads = True

    def __init__(self, product_header: bool = True):
        super().__init__(("127.0.0.1", 0), _EsHandler)
        self.product_header = product_header
        self.indices: dict[str, dict] = {}  # name → creation body
        self.docs: dict[tuple[str, str], dict] = {}
        self.reject_ids: set[str] = set()
        self.bulk_requests = 0
        self.refreshed: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _EsHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeElasticsearch

    def log_message(self, format, *args):
        pass

    def _reply(self, status: int, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if self.server.product_header:
            self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _index_name(self) -> str:
        return self.path.split("?")[0].strip("/").split("/")[0]

    def do_GET(self):
        if self.path.split("?")[0] == "/":
            return self._reply(200, {"name": "fake", "cluster_name": "test",
                                     "version": {"number": "8.15.0"},
                                     "tagline": "You Know, for Search"})
        self._reply(404, {"error": {"type": "not_found"}, "status": 404})

    def do_HEAD(self):
        self._reply(200 if self._index_name() in self.server.indices else 404)

    def do_PUT(self):
        if self.path.split("?")[0].endswith("/_bulk"):  # the Python client sends PUT /_bulk
            return self._bulk()
        name = self._index_name()
        body = json.loads(self._body() or b"{}")
        if name in self.server.indices:
            return self._reply(400, {"error": {"type": "resource_already_exists_exception",
                                               "reason": f"index [{name}] already exists"},
                                     "status": 400})
        self.server.indices[name] = body
        self._reply(200, {"acknowledged": True, "shards_acknowledged": True, "index": name})

    def do_POST(self):
        path = self.path.split("?")[0]
        if path.endswith("/_refresh"):
            self.server.refreshed.append(self._index_name())
            return self._reply(200, {"_shards": {"total": 1, "successful": 1, "failed": 0}})
        if not path.endswith("/_bulk"):
            return self._reply(404, {"error": {"type": "not_found"}, "status": 404})
        self._bulk()

    def _bulk(self):
        self.server.bulk_requests += 1
        lines = self._body().decode("utf-8").splitlines()
        items = []
        for action_line, doc_line in zip(lines[::2], lines[1::2]):
            meta = json.loads(action_line)["index"]
            doc_id, index = meta["_id"], meta["_index"]
            if doc_id in self.server.reject_ids:
                items.append({"index": {"_index": index, "_id": doc_id, "status": 400, "error": {
                    "type": "document_parsing_exception",
                    "reason": "[1:42] failed to parse field [neighbors.similarity]"}}})
                continue
            self.server.docs[(index, doc_id)] = json.loads(doc_line)
            items.append({"index": {"_index": index, "_id": doc_id, "_version": 1,
                                    "result": "created", "status": 201}})
        self._reply(200, {"took": 1, "errors": any("error" in i["index"] for i in items),
                          "items": items})


@pytest.fixture
def fake_es():
    server = FakeElasticsearch()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_send_creates_the_index_and_indexes_every_product(tmp_path, fake_es, capsys):
    run = write_run(str(tmp_path / "run"), count=25, dim=8)
    out = str(tmp_path / "bulk")

    assert export(run.path, out, "--with_embeddings", "--chunk_docs=10",
                  f"--es_url={fake_es.url}") == 0

    assert fake_es.indices["similar_products"] == json.load(open(os.path.join(out,
                                                                              "mapping.json")))
    assert sorted(pid for _, pid in fake_es.docs) == sorted(run.ids)
    assert fake_es.bulk_requests == 3  # 10 + 10 + 5 documents
    for product_id in run.ids:
        sent = fake_es.docs[("similar_products", product_id)]
        assert [(n["product_id"], n["similarity"]) for n in sent["neighbors"]] == \
            run.neighbors[product_id]
        np.testing.assert_array_equal(np.asarray(sent["embedding"], dtype=np.float32),
                                      run.vector(product_id))
    assert fake_es.refreshed == ["similar_products"]
    assert "25 indexed, 0 failed" in capsys.readouterr().out


def test_a_rejected_document_is_reported_and_fails_the_load(tmp_path, fake_es, capsys):
    run = write_run(str(tmp_path / "run"), count=12)
    fake_es.reject_ids = {run.ids[4]}

    code = export(run.path, str(tmp_path / "bulk"), f"--es_url={fake_es.url}")

    assert code == 1
    err = capsys.readouterr().err
    assert "1 of 12 documents were rejected" in err
    assert run.ids[4] in err and "document_parsing_exception" in err
    assert len(fake_es.docs) == 11  # the others were indexed


def test_an_existing_index_is_kept_and_reloading_overwrites_by_id(tmp_path, fake_es):
    fake_es.indices["similar_products"] = {"mappings": {"properties": {}}}
    run = write_run(str(tmp_path / "run"), count=9)
    for _ in range(2):
        assert export(run.path, str(tmp_path / "bulk"), f"--es_url={fake_es.url}") == 0
    assert fake_es.indices["similar_products"] == {"mappings": {"properties": {}}}
    assert len(fake_es.docs) == 9


def test_a_server_that_is_not_elasticsearch_is_refused(tmp_path, capsys):
    server = FakeElasticsearch(product_header=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        run = write_run(str(tmp_path / "run"), count=4)
        assert export(run.path, str(tmp_path / "bulk"), f"--es_url={server.url}") == 1
        assert "not Elasticsearch" in capsys.readouterr().err
        assert server.docs == {}
    finally:
        server.shutdown()
        server.server_close()
