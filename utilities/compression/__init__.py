"""Compressed variants of the trained model: magnitude pruning, a distilled student, TFLite files.

    variants = compression.run_variants(config, model, datasets, folder, strategy, tracker)
    # {"pruned": VariantResult, "student": …, "model_int8": …, "pruned_int8": …, …}

A step only produces a model: `step.produce(model, datasets, strategy)` → (Keras model or TFLite
flatbuffer bytes, extra metrics such as sparsity). The steps live beside what they run
(`pruning.Pruning`, `distillation.Distillation`, `quantization.Quantization`); this driver alone
saves what they produce, evaluates it (`utilities.evaluation.variants`), sizes it and records it:

- a Keras model is saved as the float model is (`save_recalibrated`: `pruned/model.keras`,
  `student/model.keras`, BatchNorm statistics re-estimated when they trained), so
  `gzip_ratio_vs_float` compares files of one format; TFLite bytes are written atomically to
  `{source}_{mode}.tflite`;
- order: pruning → distillation → (--calibrate: a temperature fitted and folded into the float model
  and each Keras variant, `utilities.evaluation.calibration`) → quantization, which converts the float model and
  every Keras model produced before it, so TFLite variants carry the temperature;
- a step that fails becomes that variant's `VariantMetrics(error="<Type>: <one line>")`, logged in one line;
  the other steps still run and their files stay written.

Modules: `pruning` (schedule, wrappers, `prune`), `distillation` (student, loss, Distiller,
`train_student`), `replica_loop` (the per-replica distillation loop), `quantization` (TFLite).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import tensorflow as tf  # utilities/__init__.py (run first, as our package) selected Keras 2
import tf_keras

from utilities.compression import distillation, pruning, quantization
from utilities.compression.distillation import load_teacher
from utilities.data.pipeline import Datasets
from utilities.errors import one_line
from utilities.evaluation import metrics as evaluation
from utilities.evaluation import variants as variant_eval
from utilities.evaluation.calibration import calibrate
from utilities.evaluation.results import VariantMetrics
from utilities.evaluation.variants import VariantResult
from utilities.model import save_recalibrated
from utilities.run.config import Config
from utilities.run.folder import RunFolder

log = logging.getLogger(__name__)


class Step(Protocol):
    """Produces one variant's model from `model` (the float model, or a model to convert)."""

    def produce(
        self, model: tf_keras.Model, data, strategy: tf.distribute.Strategy
    ) -> tuple[tf_keras.Model | bytes, dict[str, Any]]: ...


# ====================================================================== input checks


def check_inputs(config: Config, train_examples: int | None = None, load_teacher_model: bool = True) -> None:
    """Reject what cannot work before any training (training.run calls it once the data is built).

    Raises ConfigError (`Config.check_train_examples`: variants that need training examples) or
    ModelError (a `--teacher` that does not load or does not fit the data), one line each.
    `train_examples=None` skips the data-dependent check.
    """
    if train_examples is not None:
        config.check_train_examples(train_examples)
    c = config.compression
    if c.distill and c.teacher and load_teacher_model:
        load_teacher(c.teacher, config.data.image_size, trust_code=c.trust_model_code)


# ====================================================================== driver


def run_variants(
    config: Config, model, datasets, folder: RunFolder, strategy, tracker, reference: VariantResult | None = None
) -> dict[str, VariantResult]:
    """Run the chosen steps; {variant: its VariantResult, metrics only an `error` line if it failed}.

    `reference` is the float model's VariantResult (pass the one already computed to skip
    re-evaluating the float model); its val probabilities give every variant's `agreement`.
    """
    # No check_inputs here: the float model is already trained and saved, so an impossible variant
    # (e.g. int8 without training examples) is recorded as that variant's error, not raised.
    resamples = config.evaluation.bootstrap
    if reference is None:
        reference = float_reference(model, datasets, folder.path("model"), resamples)
    driver = Driver(datasets, folder, strategy, reference, sources={"model": model}, resamples=resamples)
    for name, step in keras_steps(config, folder.checkpoints, tracker):
        driver.run(name, step, model)
    if config.evaluation.calibrate:  # after distillation (its teacher stays uncalibrated), before conversion
        for source, keras_model in driver.sources.items():
            result = reference if source == "model" else driver.results[source]
            calibrate(keras_model, result, folder.path(source), getattr(datasets, "identities", None), resamples)
    for source, keras_model in list(driver.sources.items()):
        for mode in config.compression.quantize:
            driver.run(f"{source}_{mode}", quantization.Quantization(mode), keras_model, source=source, mode=mode)
    return driver.results


def keras_steps(config: Config, checkpoints: Path, tracker) -> Iterator[tuple[str, Step]]:
    """(variant name, step) of the Keras variants asked for, in the order they must run."""
    if config.compression.prune:
        yield "pruned", pruning.Pruning(config, checkpoints, tracker)
    if config.compression.distill:
        yield "student", distillation.Distillation(config, checkpoints, tracker)


@dataclass
class Driver:
    """Runs steps and records their variants; `sources` collects the Keras models quantization converts."""

    datasets: Datasets
    folder: RunFolder
    strategy: tf.distribute.Strategy
    reference: VariantResult  # the float model's: val probabilities, gzip_bytes
    sources: dict[str, tf_keras.Model]
    results: dict[str, VariantResult] = field(default_factory=dict)
    resamples: int = variant_eval.RESAMPLES  # bootstrap resamples per interval (--bootstrap)

    def run(self, name: str, step: Step, model: tf_keras.Model, **extra: Any) -> None:
        """`step.produce(model)`, saved, evaluated and sized as variant `name`, or its one-line error."""
        try:
            product, info = step.produce(model, self.datasets, self.strategy)
            result = self.evaluate(name, product, model)
            result.metrics = with_size_ratio(result.metrics.with_values(**info, **extra), self.reference.metrics)
        except Exception as exc:  # one variant never takes the others down
            message = f"{type(exc).__name__}: {one_line(exc)}"
            log.error("variant %s failed: %s", name, message)
            log.debug("variant %s traceback", name, exc_info=True)
            self.results[name] = VariantResult(VariantMetrics(error=message))
            return
        log_variant(name, result.metrics)
        self.results[name] = result
        if not isinstance(product, bytes):
            self.sources[name] = product

    def evaluate(self, name: str, product: tf_keras.Model | bytes, source: tf_keras.Model) -> VariantResult:
        """Save `product` under the run folder and evaluate the saved variant against the reference."""
        if isinstance(product, bytes):
            path = quantization.write_tflite(self.folder.path(f"{name}.tflite"), product)
            predict = quantization.tflite_predict_fn(path)
            params = int(source.count_params())
            return variant_eval.evaluate_variant(predict, self.datasets, path, params, self.reference, self.resamples)
        path = self.folder.path(name)
        # BatchNorm trained along (a fine-tuned backbone, the student): statistics re-estimated first.
        batchnorm_batches = save_recalibrated(product, path, clean_train(self.datasets))
        result = variant_eval.evaluate_keras(product, self.datasets, path, self.reference, self.resamples)
        result.metrics = result.metrics.with_values(batchnorm_batches=batchnorm_batches)
        return result


def float_reference(
    model, datasets, saved_path: Path | None = None, resamples: int = variant_eval.RESAMPLES
) -> VariantResult:
    """The float model's val/test predictions (for agreement) and, if saved, its size."""
    reference = variant_eval.evaluate_predict_fn(variant_eval.keras_predict_fn(model), datasets, None, resamples)
    if saved_path is not None and Path(saved_path).exists():
        reference.metrics = reference.metrics.with_values(**evaluation.artifact_size(saved_path))
    return reference


def with_size_ratio(metrics: VariantMetrics, reference: VariantMetrics) -> VariantMetrics:
    """`gzip_ratio_vs_float`: the float model's gzip size over this variant's (2.0 = half the size)."""
    if not (reference.gzip_bytes and metrics.gzip_bytes):
        return metrics
    return metrics.with_values(gzip_ratio_vs_float=round(reference.gzip_bytes / metrics.gzip_bytes, 3))


def log_variant(name: str, metrics: VariantMetrics) -> None:
    """One line: `pruned: sparsity 0.500, val balanced accuracy 0.870`, `student: … (distiller)`."""
    parts = [] if metrics.sparsity_overall is None else [f"sparsity {metrics.sparsity_overall:.3f}"]
    parts.append(f"val balanced accuracy {metrics.val.balanced_accuracy:.3f}")
    log.info("%s: %s%s", name, ", ".join(parts), f" ({metrics.training.path})" if metrics.training else "")


def clean_train(datasets) -> Any:
    """Training batches without augmentation when the datasets have them (BatchNorm re-estimation)."""
    return getattr(datasets, "train_clean", None) or datasets.train


__all__ = ["Driver", "Step", "check_inputs", "float_reference", "keras_steps", "load_teacher", "run_variants"]
