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
Every `.tflite` takes the same inputs as the Keras model (`image` (1,S,S,3) float 0..255,
`metadata` (1,28)) through its `serving_default` signature and returns probabilities (1, 8).
"""

from __future__ import annotations

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

from utilities import storage
from utilities.data.schema import CLASS_NAMES
from utilities.errors import CompressionError, one_line
from utilities.model import float32_copy
from utilities.run.config import QUANTIZE_MODES

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("float32", *QUANTIZE_MODES)
CALIBRATION_EXAMPLES = 100  # representative examples for int8 activation ranges


class QuantizationError(CompressionError):
    """A model that cannot be converted or run as TFLite; the message is one line."""


def representative_dataset(dataset: tf.data.Dataset, examples: int = CALIBRATION_EXAMPLES) -> Callable[[], Iterator]:
    """Generator factory for int8 calibration: dicts {input name: (1, …) float32}, one example each.

    `dataset` yields `(features dict of batches, labels)` — the TRAINING split, so activation ranges
    come from data the model was fitted on, never from val/test.
    """

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for features, *_ in dataset.unbatch().take(examples):
            yield {name: np.asarray(value, dtype=np.float32)[None] for name, value in features.items()}

    return generate


def has_examples(dataset: tf.data.Dataset) -> bool:
    """True if the dataset yields at least one batch (reads one batch; cheap)."""
    return any(True for _ in dataset.take(1))


def converter_for(
    model: tf_keras.Model, mode: str, calibration: tf.data.Dataset | None = None
) -> tf.lite.TFLiteConverter:
    """A configured converter; `calibration` (training batches) is required for int8 only."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    converter = tf.lite.TFLiteConverter.from_keras_model(float32_copy(model))  # no float16 kernels in TFLite
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
    log.info("converting %s to TFLite %s (DenseNet121 on a CPU: ~1-2 min)", model.name, mode)
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
    """Write atomically (a half-written .tflite never appears under its final name), and `labels.txt` beside it."""
    path = Path(path)
    storage.atomic_write(path, lambda fh: fh.write(flatbuffer))
    labels = "".join(f"{name}\n" for name in CLASS_NAMES).encode()
    storage.atomic_write(path.parent / LABELS_TXT, lambda fh: fh.write(labels))
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

    The signature has a fixed batch of 1 (as deployed); looping keeps it exactly that graph.
    """
    runner = signature_runner(path)
    (output_name,) = runner.get_output_details()  # one output: the fused probabilities
    input_names = list(runner.get_input_details())

    def predict(features: dict[str, Any]) -> np.ndarray:
        arrays = {name: np.asarray(features[name], dtype=np.float32) for name in input_names}
        rows = [
            runner(**{name: a[i : i + 1] for name, a in arrays.items()})[output_name]
            for i in range(len(arrays[input_names[0]]))
        ]
        return np.concatenate(rows, axis=0)  # (B, 8)

    return predict


__all__ = [
    "CALIBRATION_EXAMPLES",
    "MODES",
    "Quantization",
    "QuantizationError",
    "convert",
    "export",
    "representative_dataset",
    "signature_runner",
    "tflite_predict_fn",
    "write_tflite",
]
