"""Training the origins' autoencoders on a catalogue and embedding with the exported encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.models import autoencoder as ae
from pipeline.models.registry import load_model, resolve_model
from runners.train_autoencoder import in_validation, main
from tests.conftest import FAMILIES, shape_image, write_catalog

N_GOOD = len(FAMILIES) * 3
BAD = {"html": b"<html><body>404</body></html>", "empty": b""}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """Generated products, two broken images and one row whose file does not exist."""
    directory = tmp_path_factory.mktemp("ae_catalog")
    manifest = write_catalog(directory, bad=BAD)
    with open(manifest, "a") as handle:
        handle.write("ghost,images/ghost.jpg,bad\n")
    return manifest


def _train(catalog, out, *extra):
    assert main([f"--input={catalog}", f"--output={out}", "--epochs=2", "--seed=1", *extra]) == 0
    with open(out / "training.json") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def conv16(catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv16")
    return out, _train(catalog, out, "--arch=conv16", "--image_size=32", "--input_size=64",
                       "--batch_size=8")


@pytest.fixture(scope="module")
def pool128(catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool128")
    return out, _train(catalog, out, "--arch=pool128", "--input_size=56")


def test_training_curve_and_settings_are_recorded(conv16):
    out, report = conv16
    assert report["arch"] == "conv16" and report["epochs_run"] == len(report["history"]) == 2
    for entry in report["history"]:
        assert entry["seconds"] > 0
        assert np.isfinite(entry["loss"]) and np.isfinite(entry["val_loss"])
    best = min(e["val_loss"] for e in report["history"])
    assert report["final_val_loss"] == pytest.approx(best, abs=1e-6)
    assert report["history"][report["best_epoch"] - 1]["val_loss"] == pytest.approx(best)
    assert report["config"] == {"arch": "conv16", "image_size": 32, "channels": 3,
                                "latent_dim": 16, "input_size": 64, "loss": "mse"}
    assert report["settings"]["validation_split"] == 0.2 and report["settings"]["batch_size"] == 8
    assert report["timings"]["train_seconds"] > 0
    for name in ("training.png", "reconstructions.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_bad_images_are_skipped_and_counted(conv16):
    _, report = conv16
    images = report["images"]
    assert images["train"] + images["validation"] == N_GOOD
    assert images["skipped"] == 3
    assert images["skipped_by_reason"] == {"decode:empty": 1, "decode:not_an_image": 1,
                                           "read:missing_file": 1}
    assert set(images["skipped_examples"]) == {"html", "empty", "ghost"}


@pytest.mark.parametrize("fixture, dim, size", [("conv16", 16, 64), ("pool128", 128, 56)])
def test_exported_encoder_resolves_through_the_registry(request, fixture, dim, size):
    out, report = request.getfixturevalue(fixture)
    resolved = resolve_model(str(out))
    assert resolved.dim == dim == report["config"]["latent_dim"]
    assert resolved.input_size == size
    # Its preprocessing uses TFLite built-in ops only, so the pipeline's
    # faster TFLite engine runs it (it would fall back to TF otherwise).
    assert resolved.engine == "tflite"


def test_embeddings_are_deterministic_and_tell_images_apart(conv16):
    out, _ = conv16
    resolved = resolve_model(str(out))
    pictures = [shape_image(kind, colour, size=64) for kind, colour in FAMILIES[:4]]
    batch = np.stack([np.asarray(p, dtype=np.float32) / 255.0 for p in pictures])
    first = load_model(resolved)(batch)
    again = load_model(resolved)(batch)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(load_model(resolved)(batch[:1]), first[:1], rtol=1e-5, atol=1e-6)
    assert first.shape == (4, 16) and np.all(np.isfinite(first))
    assert len({tuple(np.round(v, 5)) for v in first}) == 4


def test_pool128_sees_grey_28_pixel_images(pool128):
    _, report = pool128
    assert report["config"]["image_size"] == 28 and report["config"]["channels"] == 1
    config = ae.make_config("pool128", input_size=56)
    colour = np.zeros((1, 56, 56, 3), np.float32)
    colour[..., 0] = 1.0
    grey = np.asarray(ae.preprocess(colour, config))
    assert grey.shape == (1, 28, 28, 1)
    np.testing.assert_allclose(grey, 0.2989, atol=1e-3)


def test_exported_encoder_runs_in_the_pipeline(conv16, catalog, tmp_path):
    from pipeline.run import run

    out, _ = conv16
    manifest = run([f"--input={catalog}", f"--output={tmp_path}", f"--model={out}",
                    "--top_k=3"])
    assert manifest["dim"] == 16 and manifest["counts"]["embedded"] == N_GOOD


def test_validation_split_is_a_stable_hash_of_the_product_id():
    ids = [f"sku-{i}" for i in range(4000)]
    chosen = [pid for pid in ids if in_validation(pid, 0.2)]
    assert 0.17 < len(chosen) / len(ids) < 0.23
    assert chosen == [pid for pid in reversed(ids) if in_validation(pid, 0.2)][::-1]
    assert not any(in_validation(pid, 0.0) for pid in ids)


def test_impossible_settings_fail_with_a_message(catalog, tmp_path, capsys):
    assert main([f"--input={catalog}", f"--output={tmp_path}", "--arch=pool128",
                 "--latent_dim=16"]) == 2
    assert "128" in capsys.readouterr().err
    assert main([f"--input={catalog}", f"--output={tmp_path}", "--image_size=100"]) == 2
    assert main([f"--input={tmp_path}/missing.csv", f"--output={tmp_path}"]) == 2


def test_a_catalogue_of_only_broken_images_is_one_sentence(tmp_path, capsys):
    broken = {f"b{i}": b"<html></html>" for i in range(4)}
    manifest = write_catalog(tmp_path, families=[], bad=broken)
    assert main([f"--input={manifest}", f"--output={tmp_path / 'model'}", "--epochs=1",
                 "--validation_split=0", "--image_size=16", "--input_size=32"]) == 2
    err = capsys.readouterr().err
    assert "no readable image" in err and "decode:not_an_image" in err
