"""TFLite export (dynamic-range, float16, int8) and evaluation of the `.tflite` files with LiteRT.

    from utilities.compression import quantization
    path = quantization.export(model, "int8", folder.path("model_int8.tflite"), datasets.train)
    result = variant_eval.evaluate_variant(quantization.tflite_predict_fn(path), datasets, path, None, reference)

`Quantization(mode)` is the job's step: it only converts (`produce` → flatbuffer bytes); the driver
(`utilities.compression`) writes `{source}_{mode}.tflite` with `write_tflite` and evaluates it.

Modes:
- `dynamic`: weights stored as int8, activations float (no calibration data);
- `float16`: weights stored as float16 (half the size, float maths);
- `int8`: full-integer weights and activations, calibrated on ~100 training examples; the model
  keeps float inputs and outputs (quantize/dequantize ops at the edges), so callers feed raw pixels;
- `float32`: no optimisation — the baseline the others are compared with (tests, reports).
Every `.tflite` has one `serving_default` signature that takes raw fields, with the 28-column metadata
encoding inside the graph (`utilities.serving.metadata_columns`, as the SavedModel's `serving_raw`):
`image` float32 (1,S,S,3) 0..255 pixels, `age_approx` int32 (1,) whole years, `sex` int32 (1,) index
into `schema.SEXES`, `anatom_site_general` int32 (1,) index into `schema.SITES` — each −1 when unknown —,
and returns `probabilities` (1, 8) in `labels.txt` order. `tflite.json` beside the files (`serving.lite_record`) says so, with the
two vocabularies (TFLite has no string kernels under int8, and a phone app has indices at hand).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf  # utilities/__init__.py (run first, as our package) selected Keras 2
import tf_keras

from utilities import serving, storage
from utilities.data.schema import AGE_BINS, CLASS_NAMES, SEXES, SITES
from utilities.errors import CompressionError, one_line
from utilities.model import float32_copy
from utilities.run.config import QUANTIZE_MODES

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("float32", *QUANTIZE_MODES)
CALIBRATION_EXAMPLES = 100  # representative examples for int8 activation ranges


class QuantizationError(CompressionError):
    """A model that cannot be converted or run as TFLite; the message is one line."""


LITE_INPUTS = ("image", "age_approx", "sex", "anatom_site_general")


def lite_fields(features: dict[str, Any]) -> dict[str, np.ndarray]:
    """A features batch (`image`, 28-column `metadata`) → the `.tflite` inputs: the multi-hot read back
    into age in years and sex/site indices, −1 where a group is all zeros (unknown)."""
    hot = np.asarray(features["metadata"]) > 0.5
    ages, sites, sexes = np.split(hot, [len(AGE_BINS), len(AGE_BINS) + len(SITES)], axis=1)

    def index(group: np.ndarray, values) -> np.ndarray:
        return np.where(group.any(axis=1), np.asarray(values)[group.argmax(axis=1)], -1).astype(np.int32)

    return {
        "image": np.asarray(features["image"], dtype=np.float32),
        "age_approx": index(ages, AGE_BINS),
        "sex": index(sexes, range(len(SEXES))),
        "anatom_site_general": index(sites, range(len(SITES))),
    }


def lite_function(model: tf_keras.Model) -> tf.types.experimental.ConcreteFunction:
    """The graph every `.tflite` holds: raw fields (module docstring) → the encoding → `model` → probabilities."""
    try:
        size = int(model.get_layer("image").output.shape[1])
    except ValueError:
        raise QuantizationError(f"{model.name!r} has no 'image' input: not a model of this job") from None

    @tf.function(
        input_signature=[
            tf.TensorSpec([1, size, size, 3], tf.float32, "image"),
            *(tf.TensorSpec([1], tf.int32, name) for name in LITE_INPUTS[1:]),
        ]
    )
    def serve(image, age_approx, sex, anatom_site_general):
        metadata = serving.metadata_columns(serving.age_bin_of_years(age_approx), anatom_site_general, sex)
        return {"probabilities": model({"image": image, "metadata": metadata}, training=False)}

    return serve.get_concrete_function()


def representative_dataset(dataset: tf.data.Dataset, examples: int = CALIBRATION_EXAMPLES) -> Callable[[], Iterator]:
    """Generator factory for int8 calibration: the `.tflite` inputs (`lite_fields`), one example each.

    `dataset` yields `(features dict of batches, labels)` — the TRAINING split, so activation ranges
    come from data the model was fitted on, never from val/test.
    """

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for features, *_ in dataset.take(examples):  # batches of several; yielded one example at a time
            fields = lite_fields(features)
            for i in range(len(fields["image"])):
                yield {name: value[i : i + 1] for name, value in fields.items()}

    return lambda: itertools.islice(generate(), examples)


def has_examples(dataset: tf.data.Dataset) -> bool:
    """True if the dataset yields at least one batch (reads one batch; cheap)."""
    return any(True for _ in dataset.take(1))


def converter_for(
    model: tf_keras.Model, mode: str, calibration: tf.data.Dataset | None = None
) -> tf.lite.TFLiteConverter:
    """A configured converter; `calibration` (training batches) is required for int8 only."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    twin = float32_copy(model)  # no float16 kernels in TFLite
    converter = tf.lite.TFLiteConverter.from_concrete_functions([lite_function(twin)], twin)
    if mode == "float32":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        if calibration is None or not has_examples(calibration):
            raise QuantizationError("int8 quantization needs calibration examples, but the training split is empty")
        converter.representative_dataset = representative_dataset(calibration)
        # Integer kernels only: a conversion that would silently leave float ops fails instead.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def convert(model: tf_keras.Model, mode: str, calibration: tf.data.Dataset | None = None) -> bytes:
    """The flatbuffer of `model` converted in `mode` (see the module docstring)."""
    converter = converter_for(model, mode, calibration)
    # One opaque call, minutes for DenseNet121 on a CPU: say so before, and how long it took after.
    log.info("converting %s to TFLite %s (DenseNet121 on a CPU: ~1-2 min; MobileNetV3Small: seconds)", model.name, mode)
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            # TensorFlow's own calibrator uses the deprecated tf.lite.Interpreter, and float I/O around
            # an int8 graph is what we ask for; neither warning is actionable here.
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises ConverterError, ValueError, RuntimeError, …
        raise QuantizationError(f"TFLite {mode} conversion of {model.name!r} failed: {one_line(exc)}") from exc
    log.info("converted %s to TFLite %s in %.0f s", model.name, mode, time.monotonic() - started)
    return flatbuffer


LABELS_TXT = "labels.txt"  # beside every .tflite: its output columns' class names, one per line


def write_tflite(path: Path, flatbuffer: bytes) -> Path:
    """Write atomically (a half-written .tflite never appears under its final name), `labels.txt` and
    `tflite.json` beside it."""
    path = Path(path)
    storage.atomic_write(path, lambda fh: fh.write(flatbuffer))
    labels = "".join(f"{name}\n" for name in CLASS_NAMES).encode()
    storage.atomic_write(path.parent / LABELS_TXT, lambda fh: fh.write(labels))
    record = (json.dumps(serving.lite_record(), indent=2) + "\n").encode()
    storage.atomic_write(path.parent / serving.LITE_JSON, lambda fh: fh.write(record))
    log.info("wrote %s (%s bytes)", path.name, f"{len(flatbuffer):,}")
    return path


def export(model: tf_keras.Model, mode: str, path: Path, calibration: tf.data.Dataset | None = None) -> Path:
    """Convert and write atomically."""
    return write_tflite(path, convert(model, mode, calibration))


@dataclass(frozen=True)
class Quantization:
    """The `{source}_{mode}` variants' step: `model` converted in `mode`, int8 calibrated on `data.train`."""

    mode: str

    def produce(self, model: tf_keras.Model, data, strategy=None) -> tuple[bytes, dict[str, Any]]:
        return convert(model, self.mode, data.train), {}


def signature_runner(path: Path) -> Any:
    """LiteRT `serving_default` runner of a .tflite file, called with keyword inputs."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        return Interpreter(model_path=str(path)).get_signature_runner()
    except (ValueError, RuntimeError) as exc:
        raise QuantizationError(f"cannot load TFLite model {path}: {one_line(exc)}") from exc


def tflite_predict_fn(path: Path) -> Callable[[dict[str, Any]], np.ndarray]:
    """Batch predictor (features dict (B, …) → probs (B, 8)) running the file example by example.

    The signature has a fixed batch of 1 (as deployed); looping keeps it exactly that graph. A file of
    this job takes raw fields (`lite_fields` of the batch); one written before it did, `image` and the
    28-column `metadata` as they are.
    """
    runner = signature_runner(path)
    (output_name,) = runner.get_output_details()  # one output: the fused probabilities
    dtypes = {name: detail["dtype"] for name, detail in runner.get_input_details().items()}
    raw = "metadata" not in dtypes

    def predict(features: dict[str, Any]) -> np.ndarray:
        given = lite_fields(features) if raw else features
        arrays = {name: np.asarray(given[name], dtype=dtype) for name, dtype in dtypes.items()}
        rows = [
            runner(**{name: a[i : i + 1] for name, a in arrays.items()})[output_name]
            for i in range(len(arrays["image"]))
        ]
        return np.concatenate(rows, axis=0)  # (B, 8)

    return predict


__all__ = [
    "CALIBRATION_EXAMPLES",
    "LABELS_TXT",
    "LITE_INPUTS",
    "MODES",
    "Quantization",
    "QuantizationError",
    "convert",
    "export",
    "lite_fields",
    "lite_function",
    "representative_dataset",
    "signature_runner",
    "tflite_predict_fn",
    "write_tflite",
]
