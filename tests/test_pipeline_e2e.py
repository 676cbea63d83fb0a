"""End-to-end runs on generated catalogues: the output contract users load into their stores."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.models.engines import lanes_for, preferred_batch
from pipeline.run import main, run
from tests.conftest import FAMILIES, TINY_DIM, write_catalog


def _jsonl(pattern):
    lines = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as handle:
            lines.extend(json.loads(line) for line in handle if line.strip())
    return lines


def _features(out):
    return pq.read_table(sorted(glob.glob(f"{out}/features/*.parquet"))).to_pylist()


def _run(catalog, out, model, *extra):
    return run([f"--input={catalog}", f"--output={out}", f"--model={model}", "--top_k=5",
                *extra])


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    directory = tmp_path_factory.mktemp("catalog")
    good = directory / "good.jpg"
    from tests.conftest import shape_image
    shape_image("disc", (10, 10, 10)).save(good, quality=90)
    truncated = good.read_bytes()[:300]
    return write_catalog(directory, bad={
        "empty": b"",
        "html": b"<html><body>404 not found</body></html>",
        "truncated": truncated,
    })


@pytest.fixture(scope="module")
def first_run(catalog, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("out")
    manifest = _run(catalog, root, tiny_model)
    return manifest["run_dir"], manifest


def test_every_row_is_embedded_or_reported(first_run):
    out, manifest = first_run
    n_good = len(FAMILIES) * 3
    counts = manifest["counts"]
    assert counts["input"] == n_good + 3
    assert counts["embedded"] == n_good
    assert counts["failed"] == 3
    assert counts["embedded"] + counts["failed"] == counts["input"]
    errors = {e["product_id"]: e for e in _jsonl(f"{out}/errors/*.jsonl")}
    assert set(errors) == {"empty", "html", "truncated"}
    assert all(e["stage"] == "decode" and e["error"] and e["image"].endswith(".jpg")
               for e in errors.values())
    assert errors["truncated"]["reason"] == "truncated"
    assert errors["empty"]["reason"] == "empty"


def test_features_follow_the_contract(first_run, tiny_model):
    out, manifest = first_run
    rows = _features(out)
    assert len(rows) == len(FAMILIES) * 3
    schema = pq.read_schema(sorted(glob.glob(f"{out}/features/*.parquet"))[0])
    assert schema.metadata[b"embedding_dim"] == str(TINY_DIM).encode()
    embedding_type = schema.field("embedding").type
    assert pa.types.is_list(embedding_type) and embedding_type.value_type == pa.float32()
    for row in rows:
        vector = np.asarray(row["embedding"], dtype=np.float32)
        assert vector.shape == (TINY_DIM,)
        assert abs(np.linalg.norm(vector) - 1) < 1e-5
        assert row["model"] == manifest["model"]
        assert len(row["sha256"]) == 64
        assert (row["width"], row["height"]) == (96, 96)
        assert row["family"].startswith("f")  # carried manifest column
    assert manifest["model"].startswith(os.path.basename(tiny_model))


def test_feature_files_are_compressed_without_a_dictionary_on_vectors(first_run):
    # A dictionary of float vectors never pays off and makes every later read slower.
    out, _ = first_run
    meta = pq.ParquetFile(sorted(glob.glob(f"{out}/features/*.parquet"))[0]).metadata
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
               for i in range(meta.num_columns)}
    embedding = next(c for path, c in columns.items() if path.startswith("embedding"))
    assert embedding.compression == "SNAPPY"
    assert not any("DICTIONARY" in e for e in embedding.encodings)
    assert any("DICTIONARY" in e for e in columns["product_id"].encodings)


def test_neighbors_agree_with_exact_cosine(first_run):
    out, _ = first_run
    features = _features(out)
    ids = [r["product_id"] for r in features]
    vectors = np.asarray([r["embedding"] for r in features], dtype=np.float32)
    sims = vectors @ vectors.T
    records = _jsonl(f"{out}/neighbors/*.jsonl")
    assert sorted(r["product_id"] for r in records) == sorted(ids)
    for record in records:
        i = ids.index(record["product_id"])
        neighbors = record["neighbors"]
        assert len(neighbors) == 5
        assert record["product_id"] not in [n["product_id"] for n in neighbors]
        values = [n["similarity"] for n in neighbors]
        assert values == sorted(values, reverse=True)
        exact = np.delete(np.sort(sims[i])[::-1], 0)  # drop self (cosine 1)
        np.testing.assert_allclose(values, np.round(exact[:5], 4), atol=2e-4)
        for n in neighbors:
            assert abs(n["similarity"] - sims[i, ids.index(n["product_id"])]) < 1e-4


def test_near_copies_are_each_others_top_neighbors(first_run):
    out, _ = first_run
    for record in _jsonl(f"{out}/neighbors/*.jsonl"):
        family = record["product_id"].split("-")[0]
        top2 = [n["product_id"].split("-")[0] for n in record["neighbors"][:2]]
        assert top2 == [family, family], record


def test_flat_pairs_match_neighbor_lists(first_run):
    out, _ = first_run
    flat = _jsonl(f"{out}/similar_products-*.jsonl")
    records = _jsonl(f"{out}/neighbors/*.jsonl")
    expected = [{"similarity": n["similarity"], "master_pi": r["product_id"],
                 "similar_pi": n["product_id"]} for r in records for n in r["neighbors"]]
    assert sorted(flat, key=json.dumps) == sorted(expected, key=json.dumps)
    assert set(flat[0]) == {"similarity", "master_pi", "similar_pi"}


def test_index_files_and_meta(first_run):
    out, manifest = first_run
    meta = json.load(open(f"{out}/index/meta.json"))
    assert meta["metric"] == "angular" and meta["dim"] == TINY_DIM
    assert meta["count"] == manifest["counts"]["embedded"]
    assert meta["model"] == manifest["model"]
    assert {"annoy.ann", "vectors.npy", "ids.parquet"} <= set(os.listdir(f"{out}/index"))
    ids = pq.read_table(f"{out}/index/ids.parquet").column("product_id").to_pylist()
    assert ids == sorted(ids)


def test_same_input_same_neighbors_and_rerun_replaces_output(first_run, catalog, tiny_model,
                                                             tmp_path):
    out, _ = first_run
    second = _run(catalog, tmp_path / "second", tiny_model, "--search=annoy",
                  "--full_rebuild")["run_dir"]
    names = sorted(os.path.relpath(p, second) for p in glob.glob(f"{second}/neighbors/*"))
    assert names == sorted(os.path.relpath(p, out) for p in glob.glob(f"{out}/neighbors/*"))
    for name in names:
        assert open(f"{second}/{name}", "rb").read() == open(f"{out}/{name}", "rb").read()
    # Running again with an existing run id is refused (issue 15): it never touches that run.
    from pipeline.run import UsageError

    run_id = os.path.basename(second)
    with pytest.raises(UsageError, match="already exists"):
        _run(catalog, tmp_path / "second", tiny_model, "--search=annoy", "--full_rebuild",
             f"--run_id={run_id}")
    assert len(_features(second)) == len(FAMILIES) * 3


def test_glob_input_and_two_worker_processes(catalog, tiny_model, tmp_path):
    pattern = os.path.join(os.path.dirname(catalog), "images", "p0*.jpg")
    manifest = _run(pattern, tmp_path / "out", tiny_model, "--direct_num_workers=2",
                    "--direct_running_mode=multi_processing")
    assert manifest["counts"]["input"] == len(FAMILIES) * 3
    assert manifest["counts"]["embedded"] == len(FAMILIES) * 3
    ids = {r["product_id"] for r in _jsonl(f"{tmp_path}/out/LATEST/neighbors/*.jsonl")}
    assert "p00-0" in ids


def test_unusable_catalog_exits_2_with_one_sentence(tmp_path, tiny_model, capsys):
    manifest = tmp_path / "c.csv"
    manifest.write_text("sku,url\n1,a.jpg\n")
    code = main([f"--input={manifest}", f"--output={tmp_path / 'o'}", f"--model={tiny_model}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: manifest") and "--id_column" in err
    assert "Traceback" not in err


def test_model_calls_take_the_engines_measured_batch_by_default(first_run):
    _, manifest = first_run
    assert manifest["engine"] == "tflite"
    assert manifest["batch_size"] == preferred_batch("tflite") == 2
    # One process uses every core, as one single-threaded interpreter per core.
    assert manifest["model_threads"] == (os.cpu_count() or 1)
    assert manifest["model_lanes"] == lanes_for("tflite", manifest["model_threads"])


def test_model_lanes_option_is_honoured_and_checked(catalog, tiny_model, tmp_path, capsys):
    manifest = _run(catalog, tmp_path / "one", tiny_model, "--features_only",
                    "--model_lanes=1", "--model_threads=2")
    assert (manifest["model_lanes"], manifest["model_threads"]) == (1, 2)
    assert manifest["counts"]["embedded"] == len(FAMILIES) * 3
    assert main([f"--input={catalog}", f"--output={tmp_path / 'bad'}", f"--model={tiny_model}",
                 "--model_lanes=-1"]) == 2
    assert "--model_lanes must be at least 1" in capsys.readouterr().err


def test_features_only_run_stops_after_features(catalog, tiny_model, tmp_path):
    manifest = _run(catalog, tmp_path / "f", tiny_model, "--features_only", "--batch_size=5")
    assert manifest["batch_size"] == 5
    assert manifest["counts"]["embedded"] == len(FAMILIES) * 3
    assert "neighbors" not in manifest and "index" not in manifest
    assert len(_features(manifest["run_dir"])) == len(FAMILIES) * 3
    assert not os.path.exists(os.path.join(manifest["run_dir"], "neighbors"))


def test_run_evaluates_itself_when_labels_are_given(catalog, tiny_model, tmp_path):
    manifest = _run(catalog, tmp_path / "e", tiny_model, "--eval_label_column=family")
    evaluation = json.load(open(os.path.join(manifest["run_dir"], "evaluation.json")))
    assert evaluation["label_column"] == "family"
    assert evaluation["products"] == len(FAMILIES) * 3
    # On a catalogue this small the published lists are the exact ones.
    assert evaluation["precision@10_exact"] == evaluation["precision@10_published"]
    assert evaluation["recall@5"] == 1.0 and evaluation["coverage"] == 1.0


def test_missing_input_or_output_is_one_sentence(capsys):
    assert main(["--output=/tmp/x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --input is required (see --help)"


def test_summary_points_at_the_run_and_its_counts(first_run):
    from pipeline.run import summarize

    run_dir, manifest = first_run
    text = summarize(manifest)
    assert f"Outputs in {run_dir}:" in text
    lines = text.splitlines()
    header = lines.index(next(l for l in lines if l.split()[:2] == ["input", "embedded"]))
    values = dict(zip(lines[header].split(), lines[header + 1].split()))
    assert (values["input"], values["embedded"], values["failed"]) == ("21", "18", "3")
    assert any(l.startswith("  failures  ") for l in lines)  # top reasons, counted
    assert "LATEST now points to this run" in text


def test_direct_runs_never_try_to_download_prism(catalog, tiny_model, tmp_path, monkeypatch):
    # Beam's DirectRunner would first try Prism, which downloads a binary from GitHub:
    # a nightly job on an offline machine must not depend on (or wait for) that.
    from apache_beam.runners.portability import prism_runner

    started = []

    def refuse(self, *args, **kwargs):
        started.append(True)
        raise RuntimeError("no network here")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse)
    manifest = _run(catalog, tmp_path / "out", tiny_model, "--runner=DirectRunner")
    assert manifest["counts"]["embedded"] == len(FAMILIES) * 3
    assert started == []
