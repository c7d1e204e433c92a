"""Evaluation: how every variant of a model is scored and reported.

`variants` scores a Keras model or a `.tflite` file the same way (probabilities, labels, size,
latency) with `metrics` (accuracy, balanced accuracy, F1, AUC, agreement); `analysis` adds intervals,
calibration error, triage and subgroups (numpy only); `results` types what they produce — metrics.json
as frozen dataclasses every reader takes fields from (`RunMetrics` → `VariantMetrics` → `SplitMetrics`,
one `to_json`/`from_json`); `gate` judges a run's metrics against a release
gate (--gate) and `model_card` writes the run's card from its records; `calibration` folds a fitted temperature into a
model; `predictions` writes the ISIC challenge's CSV layout; `report` writes `report.md` and its
tables, `figures` its pictures. It reads data through `utilities.data` and never trains.
"""
