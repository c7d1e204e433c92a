"""What a downstream service calls: the exported SavedModel's raw-input signature, and Vertex AI's JSON.

    serving = tf.saved_model.load("…/model").signatures["serving_raw"]
    out = serving(image_bytes=tf.constant([jpeg]), age_approx=tf.constant([45.0]),
                  sex=tf.constant(["male"]), anatom_site_general=tf.constant(["head/neck"]))
    out["top_class"], out["probabilities"], out["malignant_flag"]

Inputs are what a clinic has: the image file (JPEG or PNG bytes; the `_bytes` suffix lets TF Serving
and Vertex AI take `{"b64": …}`) and the ISIC 2019 metadata CSV's own columns and values — age in
years (NaN: unknown; rounded to the nearest 5-year bin, 0–85, as the records are), sex and site as
text ("": unknown, as is any value not in `schema.SEXES` / `schema.SITES`). Inside the graph: the decode
and resize `tools.prepare` applies (a JPEG decoded with libjpeg's accurate integer IDCT at 1/2, 1/4 or
1/8 scale while still at least the model's size, as Pillow's draft mode does — the same pixels —, then
an antialiased bilinear resize to S×S rounded to uint8: within 1 grey level of Pillow's), and the 28-column metadata encoding of `schema.encode_metadata`. Outputs per image:
`probabilities` (8, calibrated when the run was), `class_names`, `top_class`, `melanoma_score`
(p[MEL]), `malignant_score` (p[MEL] + p[BCC] + p[SCC] + p[AK]), `malignant_flag` (score at or above the
operating threshold chosen on validation, `--operating-point`) and that `malignant_threshold`.

`vertex_inputs` turns a Vertex AI / TF Serving request (`{"instances": [{"image_bytes": {"b64": …},
"age_approx": 45, …}]}`) into the signature's keyword arguments; `vertex_predictions` the outputs into
its response. Both are plain Python (no TensorFlow), so a client can use them too.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utilities.data.schema import AGE_BINS, CLASS_NAMES, MALIGNANT_CLASSES, MELANOMA_CLASSES, SEXES, SITES
from utilities.errors import JobError

RAW_SIGNATURE = "serving_raw"
SERVING_JSON = "serving.json"  # beside the SavedModel: the signatures, the operating point, the classes
RAW_INPUTS = ("image_bytes", "age_approx", "sex", "anatom_site_general")
_AGE_STEP = sorted(AGE_BINS)[1] - sorted(AGE_BINS)[0]  # 5 years


class RequestError(JobError, ValueError):
    """A serving request that is not in the signature's shape; one line naming the instance and field."""


# ── inside the graph ─────────────────────────────────────────────────────────────────────────


def _jpeg_ratio(shape, size: int):
    """Pillow's draft scale: the largest of 8, 4, 2, 1 that keeps both sides at least `size`."""
    import tensorflow as tf

    scale = tf.minimum(shape[0] // size, shape[1] // size)
    return tf.add_n([tf.cast(scale >= s, tf.int32) for s in (2, 4, 8)])  # branch 0..3 ↔ ratio 1, 2, 4, 8


def decode_image(data, size: int):
    """One JPEG or PNG (scalar tf.string) → uint8 (size, size, 3), as `utilities.data.isic.load_image`."""
    import tensorflow as tf

    def jpeg():
        branches = [
            lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
            for r in (1, 2, 4, 8)
        ]
        return tf.switch_case(_jpeg_ratio(tf.image.extract_jpeg_shape(data), size), branches)

    pixels = tf.cond(tf.io.is_jpeg(data), jpeg, lambda: tf.io.decode_png(data, channels=3))
    pixels.set_shape([None, None, 3])

    def resized():
        scaled = tf.image.resize(pixels, (size, size), method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(scaled), 0, 255), tf.uint8)

    same = tf.reduce_all(tf.shape(pixels)[:2] == size)
    return tf.ensure_shape(tf.cond(same, lambda: pixels, resized), [size, size, 3])


def metadata_columns(age_bin, site, sex):
    """(B,) int32 indices, −1 unknown — age bin in 0, 5, …, 85 order, `schema.SITES`, `schema.SEXES` —
    → (B, 28) float32 multi-hot in `schema.METADATA_NAMES` order (an unknown field: all zeros in its group)."""
    import tensorflow as tf

    ages = tf.constant([sorted(AGE_BINS).index(a) for a in AGE_BINS], tf.int32)  # column → bin, text order
    columns = [
        tf.equal(age_bin[:, None], ages[None, :]),
        tf.equal(site[:, None], tf.range(len(SITES))[None, :]),
        tf.equal(sex[:, None], tf.range(len(SEXES))[None, :]),
    ]
    return tf.cast(tf.concat(columns, axis=1), tf.float32)


def age_bin_of_years(years):
    """(B,) int32 whole years, negative unknown → bin index (nearest 5 years, 85 and over: 85), −1 unknown."""
    import tensorflow as tf

    return tf.where(years < 0, -1, tf.minimum((years + _AGE_STEP // 2) // _AGE_STEP, len(AGE_BINS) - 1))


def _vocabulary_index(values, vocabulary):
    import tensorflow as tf

    hits = tf.equal(values[:, None], tf.constant(vocabulary)[None, :])
    return tf.where(tf.reduce_any(hits, axis=1), tf.argmax(tf.cast(hits, tf.int32), axis=1, output_type=tf.int32), -1)


def encode_metadata(age_approx, sex, anatom_site_general):
    """(B,) age (float years, NaN unknown), sex, site (text, any other value unknown) → (B, 28) float32."""
    import tensorflow as tf

    bins = tf.clip_by_value(tf.round(age_approx / _AGE_STEP), 0, len(AGE_BINS) - 1)
    age_bin = tf.where(tf.math.is_nan(age_approx), -1, tf.cast(tf.where(tf.math.is_nan(bins), 0.0, bins), tf.int32))
    return metadata_columns(age_bin, _vocabulary_index(anatom_site_general, SITES), _vocabulary_index(sex, SEXES))


def raw_signature(model, image_size: int, threshold: float | None):
    """The `serving_raw` tf.function of a Keras model taking {"image": float 0..255, "metadata": (B, 28)}.

    `threshold` None (validation had no malignant or no benign image): no image is ever flagged.
    """
    import tensorflow as tf

    limit = math.inf if threshold is None else float(threshold)
    melanoma = [CLASS_NAMES.index(c) for c in MELANOMA_CLASSES]
    malignant = [CLASS_NAMES.index(c) for c in MALIGNANT_CLASSES]
    specs = [
        tf.TensorSpec([None], tf.string, "image_bytes"),
        tf.TensorSpec([None], tf.float32, "age_approx"),
        tf.TensorSpec([None], tf.string, "sex"),
        tf.TensorSpec([None], tf.string, "anatom_site_general"),
    ]

    @tf.function(input_signature=specs)
    def serve(image_bytes, age_approx, sex, anatom_site_general):
        images = tf.map_fn(
            lambda data: decode_image(data, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
        )
        features = {
            "image": tf.cast(images, tf.float32),
            "metadata": encode_metadata(age_approx, sex, anatom_site_general),
        }
        probs = tf.cast(model(features, training=False), tf.float32)
        batch = tf.shape(probs)[0]
        names = tf.constant(CLASS_NAMES)
        malignant_score = tf.reduce_sum(tf.gather(probs, malignant, axis=1), axis=1)
        threshold_b = tf.fill([batch], tf.constant(limit, tf.float32))
        return {
            "probabilities": probs,
            "class_names": tf.tile(names[None, :], [batch, 1]),
            "top_class": tf.gather(names, tf.argmax(probs, axis=1)),
            "melanoma_score": tf.reduce_sum(tf.gather(probs, melanoma, axis=1), axis=1),
            "malignant_score": malignant_score,
            "malignant_flag": malignant_score >= threshold_b,
            "malignant_threshold": threshold_b,
        }

    return serve


def serving_record(image_size: int, threshold: float | None, specificity: float, calibrated: bool) -> dict[str, Any]:
    """serving.json: how to call the export, and the operating point it flags at."""
    return {
        "signatures": {
            "serving_default": {
                "inputs": {
                    "image": f"float32 (B, {image_size}, {image_size}, 3), 0..255",
                    "metadata": "float32 (B, 28) multi-hot",
                },
                "outputs": "probabilities (B, 8)",
            },
            RAW_SIGNATURE: {
                "inputs": {
                    "image_bytes": "string (B,) JPEG or PNG",
                    "age_approx": "float32 (B,), NaN unknown",
                    "sex": "string (B,), '' unknown",
                    "anatom_site_general": "string (B,), '' unknown",
                },
                "outputs": [
                    "probabilities",
                    "class_names",
                    "top_class",
                    "melanoma_score",
                    "malignant_score",
                    "malignant_flag",
                    "malignant_threshold",
                ],
            },
        },
        "class_names": list(CLASS_NAMES),
        "image_size": image_size,
        "calibrated": calibrated,
        "operating_point": {
            "task": "malignant",
            "classes": list(MALIGNANT_CLASSES),
            "specificity_on_val": specificity,
            "threshold": threshold,
        },
        "sexes": list(SEXES),
        "sites": list(SITES),
    }


LITE_JSON = "tflite.json"  # beside every .tflite (utilities.compression.quantization): how to call it


def lite_record() -> dict[str, Any]:
    """tflite.json: every `.tflite`'s one signature — raw fields in, the encoding inside the graph."""
    return {
        "signature": "serving_default",
        "inputs": {
            "image": "float32 (1, S, S, 3), raw 0..255 RGB pixels resized to S (the model's size)",
            "age_approx": "int32 (1,), whole years (nearest 5-year bin, 85 and over: 85); -1 unknown",
            "sex": "int32 (1,), index into sexes; -1 unknown",
            "anatom_site_general": "int32 (1,), index into sites; -1 unknown",
        },
        "outputs": {"probabilities": "float32 (1, 8) in labels.txt order"},
        "sexes": list(SEXES),
        "sites": list(SITES),
        "labels": list(CLASS_NAMES),
    }


def write_serving_record(folder: Path, record: Mapping[str, Any]) -> None:
    (Path(folder) / SERVING_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


# ── Vertex AI / TF Serving JSON (plain Python) ─────────────────────────────────────────────────


def _image(value: Any, where: str) -> bytes:
    if not (isinstance(value, Mapping) and set(value) == {"b64"} and isinstance(value["b64"], str)):
        raise RequestError(f'{where}.image_bytes must be {{"b64": "<base64 of the JPEG or PNG file>"}}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}.image_bytes.b64 is not base64") from None


def _age(value: Any, where: str) -> float:
    if value is None or value == "":
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RequestError(f"{where}.age_approx must be a number of years (or null)")
    try:
        return float(value)
    except ValueError:
        raise RequestError(f"{where}.age_approx {value!r} is not a number") from None


def _text(value: Any, where: str, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"{where}.{name} must be text (or null)")
    return value


def vertex_inputs(request: Mapping[str, Any]) -> dict[str, list]:
    """`{"instances": [{"image_bytes": {"b64": …}, "age_approx": 45, "sex": "male", "anatom_site_general": …}]}`
    → the `serving_raw` keyword arguments as lists (wrap each in `tf.constant`). A missing or null
    metadata field is unknown; an unknown key or a malformed value is refused (`RequestError`)."""
    instances = request.get("instances") if isinstance(request, Mapping) else None
    if not isinstance(instances, list) or not instances:
        raise RequestError('a request is {"instances": [ … one object per image … ]}')
    columns: dict[str, list] = {name: [] for name in RAW_INPUTS}
    for i, instance in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(instance, Mapping) or "image_bytes" not in instance:
            raise RequestError(f"{where} must be an object with image_bytes")
        unknown = sorted(set(instance) - set(RAW_INPUTS))
        if unknown:
            raise RequestError(f"{where} has unknown field(s) {', '.join(unknown)}; expected {', '.join(RAW_INPUTS)}")
        columns["image_bytes"].append(_image(instance["image_bytes"], where))
        columns["age_approx"].append(_age(instance.get("age_approx"), where))
        columns["sex"].append(_text(instance.get("sex"), where, "sex"))
        columns["anatom_site_general"].append(_text(instance.get("anatom_site_general"), where, "anatom_site_general"))
    return columns


def vertex_predictions(outputs: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The signature's outputs (tensors or arrays, batch first) → `{"predictions": [one object per image]}`."""

    def plain(value: Any) -> Any:
        value = value.numpy() if hasattr(value, "numpy") else value
        value = value.tolist() if hasattr(value, "tolist") else value
        if isinstance(value, bytes):
            return value.decode("utf-8")
        return [plain(v) for v in value] if isinstance(value, list) else value

    columns = {name: plain(value) for name, value in outputs.items()}
    count = len(next(iter(columns.values())))
    return {"predictions": [{name: values[i] for name, values in columns.items()} for i in range(count)]}
