"""The embed step's model lanes: concurrent calls, each row out once, windows kept."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window

from pipeline.models import engines
from pipeline.models.registry import load_model, resolve_model
from pipeline.records import DecodedRow
from tests.conftest import TINY_SIZE
from transforms.embed import EmbedImages
from transforms.errors import ERRORS


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (TINY_SIZE, TINY_SIZE, 3),
                                                dtype=np.uint8)


def test_tflite_runs_one_single_threaded_interpreter_per_thread_by_default():
    assert engines.lanes_for("tflite", 4) == 4
    assert engines.lanes_for("tflite", 0) == 1
    assert engines.lanes_for("tflite", 4, requested=1) == 1
    # TensorFlow runs one call at a time over its own thread pools, whatever is asked.
    assert engines.lanes_for("savedmodel", 4) == engines.lanes_for("savedmodel", 4, 3) == 1


def test_concurrent_calls_on_lanes_give_each_caller_its_own_answer(tiny_model):
    resolved = resolve_model(tiny_model, engine="tflite")
    lanes = load_model(resolved, threads=2, lanes=2)
    assert lanes.lanes == 2
    single = load_model(resolved, threads=1)
    batches = [[_pixels(2 * i), _pixels(2 * i + 1)] for i in range(40)]
    expected = [single.embed_pixels(batch) for batch in batches]
    # Four callers on two interpreters: calls queue for a free lane and never share one.
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lanes.embed_pixels, batches))
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


def _row(i: int, pixels: np.ndarray) -> DecodedRow:
    return DecodedRow(f"p{i}", f"/img/{i}.jpg", {}, f"{i:064x}", None, None, pixels,
                      TINY_SIZE, TINY_SIZE)


@pytest.mark.parametrize("lanes", [1, 2])
def test_every_row_comes_out_once_in_its_own_window(tiny_model, lanes):
    resolved = resolve_model(tiny_model, engine="tflite")
    # Rows spread over three one-minute windows; results are emitted a few batches
    # later than their input, and must still land in their own row's window.
    rows = [window.TimestampedValue(_row(i, _pixels(i)), 60 * (i % 3) + 1) for i in range(23)]
    with TestPipeline() as p:
        out = (p
               | beam.Create(rows)
               | beam.WindowInto(window.FixedWindows(60))
               | EmbedImages(resolved, batch_size=2, threads=2, lanes=lanes))
        placed = out.features | "Where" >> beam.Map(
            lambda f, w=beam.DoFn.WindowParam: (f.product_id, int(w.start), len(f.embedding)))
        assert_that(placed, equal_to([(f"p{i}", 60 * (i % 3), resolved.dim) for i in range(23)]),
                    label="features")
        assert_that(out[ERRORS], equal_to([]), label="errors")


def test_an_image_the_model_rejects_costs_one_error_row_not_its_batch(tiny_model):
    resolved = resolve_model(tiny_model, engine="tflite")
    wrong = np.zeros((TINY_SIZE + 1, TINY_SIZE, 3), np.uint8)  # the model takes 32 x 32
    rows = [_row(i, wrong if i == 4 else _pixels(i)) for i in range(9)]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | EmbedImages(resolved, batch_size=3, threads=2, lanes=2)
        assert_that(out.features | "Ids" >> beam.Map(lambda f: f.product_id),
                    equal_to([f"p{i}" for i in range(9) if i != 4]), label="features")
        assert_that(out[ERRORS] | "Why" >> beam.Map(
            lambda e: (e.product_id, e.stage, e.reason, "shape" in e.error)),
            equal_to([("p4", "embed", "model_error", True)]), label="errors")
