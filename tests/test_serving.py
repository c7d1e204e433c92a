"""utilities/serving.py on a toy model: the in-graph decode and metadata encoding are tools.prepare's, and
a Vertex AI JSON request is answered through serving_raw (the exported DenseNet is checked against a
run's predictions in tests/test_training.py::test_serving_raw_answers_like_the_run).

.venv/bin/python -m pytest tests/test_serving.py -q
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from PIL import Image

from utilities import serving
from utilities.data.isic import load_image
from utilities.data.schema import AGE_BINS, CLASS_NAMES, IMAGE_DIR, SEXES, SITES, encode_metadata


def test_metadata_is_encoded_as_the_records_are():
    ages = [*AGE_BINS, math.nan]
    sexes, sites = [*SEXES, ""], [*SITES, ""]
    combos = list(itertools.product(ages, sexes, sites))
    got = serving.encode_metadata(
        tf.constant([a for a, _, _ in combos], tf.float32),
        tf.constant([s for _, s, _ in combos]),
        tf.constant([site for _, _, site in combos]),
    ).numpy()
    want = np.array([encode_metadata(None if math.isnan(a) else a, site or None, s or None) for a, s, site in combos])
    np.testing.assert_array_equal(got, want)
    # Between the bins: the nearest one; outside 0..85: the end bin; a value the CSV never has: unknown.
    odd = serving.encode_metadata(
        tf.constant([47.0, 92.0, -3.0]),
        tf.constant(["unknown", "Male", "male"]),
        tf.constant(["scalp", "", "head/neck"]),
    ).numpy()
    np.testing.assert_array_equal(
        odd, [encode_metadata(45, None, None), encode_metadata(85, None, None), encode_metadata(0, "head/neck", "male")]
    )


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_images_are_decoded_and_resized_as_prepare_stores_them(demo_dir, tmp_path):
    for path in sorted((demo_dir / IMAGE_DIR).glob("*.jpg"))[:12]:
        for size in (32, 48):
            ours = serving.decode_image(tf.constant(path.read_bytes()), size).numpy().astype(int)
            stored = np.frombuffer(load_image(path, size), np.uint8).reshape(size, size, 3).astype(int)
            assert np.abs(ours - stored).max() <= 1, path  # rounding of the resize only (48 px: identical)
            if size == 48:
                assert np.array_equal(ours, stored)
    big = (np.random.default_rng(0).random((300, 260, 3)) * 255).astype(np.uint8)  # PNG: no draft scale
    (tmp_path / "big.png").write_bytes(_png(big))
    ours = serving.decode_image(tf.constant(_png(big)), 64).numpy().astype(int)
    stored = np.frombuffer(load_image(tmp_path / "big.png", 64), np.uint8).reshape(64, 64, 3).astype(int)
    assert np.abs(ours - stored).max() <= 1


def _toy_model(size: int) -> tf_keras.Model:
    image = tf_keras.Input((size, size, 3), name="image")
    metadata = tf_keras.Input((28,), name="metadata")
    pooled = tf_keras.layers.GlobalAveragePooling2D()(image)
    joined = tf_keras.layers.Concatenate()([tf_keras.layers.Rescaling(1 / 255)(pooled), metadata])
    probs = tf_keras.layers.Dense(len(CLASS_NAMES), activation="softmax", name="fusion")(joined)
    return tf_keras.Model({"image": image, "metadata": metadata}, probs)


def test_a_vertex_request_is_answered_through_serving_raw(demo_dir):
    model = _toy_model(32)
    signature = serving.raw_signature(model, 32, threshold=0.4)
    jpeg = sorted((demo_dir / IMAGE_DIR).glob("*.jpg"))[0].read_bytes()
    png = _png(np.full((20, 20, 3), 200, np.uint8))
    body = json.dumps(
        {
            "instances": [
                {
                    "image_bytes": {"b64": base64.b64encode(jpeg).decode()},
                    "age_approx": 45,
                    "sex": "male",
                    "anatom_site_general": "head/neck",
                },
                {"image_bytes": {"b64": base64.b64encode(png).decode()}, "age_approx": None},  # metadata unknown
            ]
        }
    )
    inputs = serving.vertex_inputs(json.loads(body))
    response = serving.vertex_predictions(signature(**{k: tf.constant(v) for k, v in inputs.items()}))
    first, second = json.loads(json.dumps(response))["predictions"]
    features = {
        "image": tf.constant([np.frombuffer(load_image_bytes(jpeg), np.uint8).reshape(32, 32, 3)], tf.float32),
        "metadata": tf.constant([encode_metadata(45, "head/neck", "male")], tf.float32),
    }
    np.testing.assert_allclose(first["probabilities"], model(features).numpy()[0], atol=1e-3)
    assert first["class_names"] == list(CLASS_NAMES) and first["top_class"] in CLASS_NAMES
    assert second["malignant_flag"] == (second["malignant_score"] >= 0.4) and second[
        "malignant_threshold"
    ] == pytest.approx(0.4)
    assert first["melanoma_score"] == pytest.approx(first["probabilities"][0])


def load_image_bytes(data: bytes) -> bytes:
    """tools.prepare's pixels of an in-memory JPEG at 32 px."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.jpg"
        path.write_bytes(data)
        return load_image(path, 32)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "one object per image"),
        ({"instances": []}, "one object per image"),
        ({"instances": [{"age_approx": 45}]}, r"instances\[0\] must be an object with image_bytes"),
        ({"instances": [{"image_bytes": "abc"}]}, "b64"),
        ({"instances": [{"image_bytes": {"b64": "!!!"}}]}, "not base64"),
        ({"instances": [{"image_bytes": {"b64": ""}, "age": 3}]}, "unknown field"),
        ({"instances": [{"image_bytes": {"b64": ""}, "age_approx": "old"}]}, "not a number"),
        ({"instances": [{"image_bytes": {"b64": ""}, "sex": 1}]}, "must be text"),
    ],
)
def test_a_malformed_request_is_refused_in_one_line(body, message):
    with pytest.raises(serving.RequestError, match=message) as caught:
        serving.vertex_inputs(body)
    assert "\n" not in str(caught.value)
