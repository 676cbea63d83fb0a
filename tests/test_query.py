"""Looking up new images against a published run: API, CLI single and batch modes."""

from __future__ import annotations

import glob
import json
import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import query
from pipeline.run import run
from pipeline.similarity_index import ModelMismatchError, RunError, SimilarityIndex
from tests.conftest import FAMILIES, export_tiny_model, shape_image, write_catalog

TOP_K = 5


def _features(run_dir):
    table = pq.read_table(sorted(glob.glob(f"{run_dir}/features/*.parquet")))
    ids = table.column("product_id").to_pylist()
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    return ids, vectors


def _exact(ids, vectors, query_vector, k):
    """Exact cosine search by brute force, ties by product id: the reference."""
    q = query_vector / np.linalg.norm(query_vector)
    sims = vectors @ q
    order = sorted(range(len(ids)), key=lambda i: (-round(float(sims[i]), 6), ids[i]))[:k]
    return [(ids[i], round(float(sims[i]), 4)) for i in order]


def _pairs(neighbors):
    return [(n["product_id"], n["similarity"]) for n in neighbors]


def _same_lists(got, want):
    """Equal ids and similarities; two products whose similarities differ by float
    rounding only may swap places."""
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=2e-4)
    assert sorted(p for p, _ in got) == sorted(p for p, _ in want) or \
        [p for p, _ in got[:-1]] == [p for p, _ in want[:-1]]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    directory = tmp_path_factory.mktemp("query_catalog")
    return write_catalog(directory, bad={"html": b"<html>not an image</html>"})


def _publish(catalog, root, model, *extra):
    manifest = run([f"--input={catalog}", f"--output={root}", f"--model={model}",
                    f"--top_k={TOP_K}", *extra])
    return os.path.join(str(root), "LATEST"), manifest


@pytest.fixture(scope="module")
def exact_run(catalog, tiny_model, tmp_path_factory):
    return _publish(catalog, tmp_path_factory.mktemp("exact"), tiny_model, "--search=exact")


@pytest.fixture(scope="module")
def annoy_run(catalog, tiny_model, tmp_path_factory):
    return _publish(catalog, tmp_path_factory.mktemp("annoy"), tiny_model, "--search=annoy")


@pytest.fixture(scope="module")
def pca_partition_run(catalog, tiny_model, tmp_path_factory):
    return _publish(catalog, tmp_path_factory.mktemp("pca"), tiny_model, "--search=annoy",
                    "--partition_by=family", "--pca_dim=8")


@pytest.mark.parametrize("which", ["exact_run", "annoy_run"])
def test_every_query_equals_exact_search_over_the_runs_features(which, request):
    latest, manifest = request.getfixturevalue(which)
    index = SimilarityIndex.open(latest, load_model_now=False)
    assert index.info.search == manifest["index"]["search"]
    ids, vectors = _features(latest)
    rng = np.random.default_rng(7)
    queries = list(vectors) + list(rng.normal(size=(20, vectors.shape[1])).astype(np.float32))
    queries += [v + 0.05 * rng.normal(size=v.shape).astype(np.float32) for v in vectors]
    for k in (1, TOP_K, 20, len(ids) + 5):
        for q in queries:
            _same_lists(_pairs(index.query_vector(q, k)), _exact(ids, vectors, q, k))


def test_pca_and_partitions_are_the_runs_search_space(pca_partition_run):
    latest, _ = pca_partition_run
    index = SimilarityIndex.open(latest, load_model_now=False)
    assert index.info.pca_dim == 8 and index.info.search_dim == 8
    assert sorted(index.info.partitions) == sorted({f"f{f}" for f in range(len(FAMILIES))})
    mean = np.load(f"{latest}/index/pca_mean.npy")
    components = np.load(f"{latest}/index/pca_components.npy")
    parts = json.load(open(f"{latest}/index/partitions.json"))["partitions"]
    _, vectors = _features(latest)
    rng = np.random.default_rng(3)
    for q in list(vectors[:6]) + list(rng.normal(size=(6, vectors.shape[1]))):
        q = np.asarray(q, dtype=np.float32)
        projected = (q / np.linalg.norm(q) - mean) @ components
        everywhere_ids, everywhere_vecs = [], []
        for part in parts:
            part_ids = pq.read_table(f"{latest}/index/{part['dir']}/ids.parquet") \
                .column("product_id").to_pylist()
            part_vecs = np.load(f"{latest}/index/{part['dir']}/vectors.npy")
            got = _pairs(index.query_vector(q, 3, partition=part["value"]))
            _same_lists(got, _exact(part_ids, part_vecs, projected, 3))
            everywhere_ids += part_ids
            everywhere_vecs.append(part_vecs)
        _same_lists(_pairs(index.query_vector(q, 4)),
                    _exact(everywhere_ids, np.concatenate(everywhere_vecs), projected, 4))
    with pytest.raises(ValueError, match="partition"):
        index.query_vector(vectors[0], 3, partition="no-such-family")


def test_query_image_embeds_like_the_run(exact_run, catalog):
    latest, _ = exact_run
    index = SimilarityIndex.open(latest)
    ids, vectors = _features(latest)
    images = os.path.join(os.path.dirname(catalog), "images")
    for pid in ("p00-0", "p03-1", "p05-2"):
        path = os.path.join(images, f"{pid}.jpg")
        embedded = index.embed([path])[0]
        assert float(embedded @ vectors[ids.index(pid)]) > 0.9999
        top = index.query_image(path, k=TOP_K)
        assert top[0]["product_id"] == pid and top[0]["similarity"] >= 0.9999
        data = open(path, "rb").read()
        assert index.query_image(data, k=TOP_K) == top
        # PIL and array inputs are the decoded picture; same neighbours in front.
        pil = Image.open(path)
        assert index.query_image(pil, k=TOP_K)[0]["product_id"] == pid
        assert index.query_image(np.asarray(pil.convert("RGB")), k=TOP_K)[0]["product_id"] == pid


def test_neighbors_reads_the_precomputed_list(pca_partition_run, exact_run):
    for latest, _ in (exact_run, pca_partition_run):
        index = SimilarityIndex.open(latest, load_model_now=False)
        lines = [json.loads(line) for path in sorted(glob.glob(f"{latest}/neighbors/*.jsonl"))
                 for line in open(path)]
        assert lines
        for line in lines:
            assert index.neighbors(line["product_id"]) == line["neighbors"]
        assert index.neighbors("not-a-product") is None


def test_the_run_defines_the_catalogue(catalog, tiny_model, tmp_path):
    root = tmp_path / "root"
    old_latest, _ = _publish(catalog, root, tiny_model, "--search=exact")
    old_run = os.path.realpath(old_latest)
    # The next night: two products are gone.
    smaller = tmp_path / "smaller.csv"
    lines = open(catalog).read().splitlines()
    kept = [line for line in lines if not line.startswith(("p00-1,", "p02-2,"))]
    smaller.write_text("\n".join(kept) + "\n")
    images = os.path.join(os.path.dirname(catalog), "images")
    smaller_with_paths = tmp_path / "smaller_abs.csv"
    smaller_with_paths.write_text("\n".join(
        [kept[0]] + [line.replace("images/", images + "/", 1) for line in kept[1:]]) + "\n")
    new_latest, _ = _publish(smaller_with_paths, root, tiny_model, "--search=exact")
    query_image = os.path.join(images, "p00-1.jpg")
    new = SimilarityIndex.open(new_latest)
    returned = {n["product_id"] for n in new.query_image(query_image, k=50)}
    assert "p00-1" not in returned and "p02-2" not in returned
    assert new.neighbors("p00-1") is None
    old = SimilarityIndex.open(old_run)
    assert old.query_image(query_image, k=1)[0]["product_id"] == "p00-1"


def test_safe_from_several_threads(annoy_run, catalog):
    latest, _ = annoy_run
    index = SimilarityIndex.open(latest, lanes=2, threads=2)
    images = sorted(glob.glob(os.path.join(os.path.dirname(catalog), "images", "p*.jpg")))
    expected = {path: index.query_image(path, k=TOP_K) for path in images}
    results, failures = [], []

    def worker(seed):
        order = np.random.default_rng(seed).permutation(len(images))
        try:
            for i in list(order) * 3:
                results.append((images[i], index.query_image(images[i], k=TOP_K)))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert len(results) == 8 * 3 * len(images)
    for path, got in results:
        assert got == expected[path]


def test_cli_prints_one_line_per_image_and_reports_failures(exact_run, catalog, tmp_path,
                                                            capsys):
    latest, _ = exact_run
    images = os.path.join(os.path.dirname(catalog), "images")
    good = os.path.join(images, "p01-0.jpg")
    broken = os.path.join(images, "html.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good, "rb").read()[:400])
    missing = str(tmp_path / "missing.jpg")
    private = "http://127.0.0.1:9/image.jpg"
    code = query.main([f"--run={latest}", "--top_k=3", good, broken, str(truncated), missing,
                       private])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == query.EXIT_SOME_FAILED
    assert [line["image"] for line in lines] == [good, broken, str(truncated), missing, private]
    assert lines[0]["neighbors"][0]["product_id"] == "p01-0"
    assert len(lines[0]["neighbors"]) == 3
    assert [line.get("reason") for line in lines[1:]] == [
        "not_an_image", "truncated", "missing_file", "private_host"]
    assert all(line["error"] for line in lines[1:])
    assert query.main([f"--run={latest}", good]) == query.EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert len(out["neighbors"]) == 20 or len(out["neighbors"]) == len(_features(latest)[0])
    assert query.main([f"--run={latest}", "--min_similarity=0.999", good]) == query.EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert all(n["similarity"] >= 0.999 for n in out["neighbors"])


def test_urls_go_through_the_fetcher_and_its_private_host_guard(exact_run, catalog, capsys):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    latest, _ = exact_run
    images = os.path.join(os.path.dirname(catalog), "images")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=images))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/p02-0.jpg"
        assert query.main([f"--run={latest}", url]) == query.EXIT_SOME_FAILED
        line = json.loads(capsys.readouterr().out)
        assert line["image"] == url and line["reason"] == "private_host"
        assert query.main([f"--run={latest}", "--allow_private_hosts", url,
                           url.replace("p02-0", "nothing")]) == query.EXIT_SOME_FAILED
        found, missing = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert found["neighbors"][0]["product_id"] == "p02-0"
        assert missing["reason"] == "http_404"
    finally:
        server.shutdown()
        server.server_close()


def test_model_mismatch_and_bad_runs_are_usage_errors(exact_run, catalog, tiny_model,
                                                      tmp_path, capsys):
    latest, _ = exact_run
    other = export_tiny_model(str(tmp_path / "other_model"), dim=16)
    with pytest.raises(ModelMismatchError, match="model mismatch"):
        SimilarityIndex.open(latest, model=other)
    good = os.path.join(os.path.dirname(catalog), "images", "p01-0.jpg")
    assert query.main([f"--run={latest}", f"--model={other}", good]) == query.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: model mismatch") and err.count("\n") == 1
    # The run records its model's input size; a run claiming another is refused.
    run_dir = os.path.realpath(latest)
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(run_dir, copy)
    manifest = json.load(open(copy / "manifest.json"))
    manifest["input_size"] = 224
    json.dump(manifest, open(copy / "manifest.json", "w"))
    with pytest.raises(ModelMismatchError, match="px"):
        SimilarityIndex.open(str(copy))
    # No run there, and a run built without an index.
    assert query.main([f"--run={tmp_path / 'nothing'}", good]) == query.EXIT_USAGE
    assert "not a published run" in capsys.readouterr().err
    features_only = tmp_path / "features_only"
    run([f"--input={catalog}", f"--output={features_only}", f"--model={tiny_model}",
         "--features_only"])
    with pytest.raises(RunError, match="without an index"):
        SimilarityIndex.open(str(features_only / "LATEST"))
    assert query.main([f"--run={features_only}/LATEST", good]) == query.EXIT_USAGE
    assert query.main([f"--run={latest}"]) == query.EXIT_USAGE
    assert query.main([f"--run={latest}", "--input=x.csv"]) == query.EXIT_USAGE
    assert query.main([f"--run={latest}", "--top_k=0", good]) == query.EXIT_USAGE


def test_batch_mode_agrees_with_single_images(annoy_run, catalog, tmp_path, capsys):
    latest, _ = annoy_run
    new_dir = tmp_path / "new_arrivals"
    new_dir.mkdir()
    # Today's arrivals: new pictures in the catalogue's families, one broken, one duplicate.
    rows = ["product_id,image"]
    for f, (kind, color) in enumerate(FAMILIES):
        shape_image(kind, tuple(max(0, c - 25) for c in color), size=120).save(
            new_dir / f"new{f}.jpg", quality=85)
        rows.append(f"new{f},new{f}.jpg")
    (new_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rows += ["broken,broken.jpg", "new0,new1.jpg", "gone,missing.jpg"]
    (new_dir / "today.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = query.main([f"--run={latest}", f"--input={new_dir / 'today.csv'}",
                       f"--output={out}", "--top_k=4"])
    assert code == query.EXIT_SOME_FAILED
    manifest = json.load(open(out / "query_manifest.json"))
    counts = manifest["counts"]
    assert counts["input"] == len(rows) - 1
    assert counts["embedded"] == len(FAMILIES)
    assert counts["embedded"] + counts["failed"] == counts["input"]
    errors = [json.loads(line) for path in glob.glob(f"{out}/errors/*.jsonl")
              for line in open(path)]
    assert sorted((e["product_id"], e["reason"]) for e in errors) == [
        ("broken", errors_reason(errors, "broken")),
        ("gone", "missing_file"), ("new0", "duplicate_product_id")]
    lines = {json.loads(line)["product_id"]: json.loads(line)
             for path in glob.glob(f"{out}/neighbors/*.jsonl") for line in open(path)}
    assert sorted(lines) == sorted(f"new{f}" for f in range(len(FAMILIES)))
    index = SimilarityIndex.open(latest)
    for pid, line in lines.items():
        single = index.query_image(str(new_dir / f"{pid}.jpg"), k=4)
        assert line["neighbors"] == single
        family = int(pid[3:])
        assert line["neighbors"][0]["product_id"].startswith(f"p{family:02d}-")


def errors_reason(errors, product_id):
    """The reason the pipeline gave for one product (decode reasons vary by bytes)."""
    reason = next(e["reason"] for e in errors if e["product_id"] == product_id)
    assert reason in ("corrupt", "truncated", "not_an_image")
    return reason


def test_default_model_run_is_queried_through_tflite_without_tensorflow(tmp_path):
    """The default model, end to end: a published run, then a fresh process that opens
    it and looks an image up from the cached TFLite conversion, never importing TF."""
    import subprocess
    import sys

    directory = tmp_path / "catalog"
    catalog = write_catalog(directory, families=FAMILIES[:3], copies=2)
    latest, manifest = _publish(catalog, tmp_path / "root", "efficientnet_lite0")
    assert manifest["engine"] == "tflite" and manifest["input_size"] == 224
    image = str(directory / "images" / "p01-1.jpg")
    code = ("import json, sys\n"
            "from pipeline.similarity_index import SimilarityIndex\n"
            "index = SimilarityIndex.open(sys.argv[1])\n"
            "print(json.dumps({'tf': 'tensorflow' in sys.modules, 'engine': index.info.engine,"
            " 'top': index.query_image(sys.argv[2], k=3)}))\n")
    out = subprocess.run([sys.executable, "-c", code, latest, image], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tf"] is False and result["engine"] == "tflite"
    assert result["top"][0] == {"product_id": "p01-1", "similarity": 1.0}
    ids, vectors = _features(latest)
    index = SimilarityIndex.open(latest)
    _same_lists(_pairs(index.query_image(image, k=4)),
                _exact(ids, vectors, index.embed([image])[0], 4))
