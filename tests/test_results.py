"""Typed metrics (utilities/evaluation/results.py): metrics.json read and written back byte for byte, and
a document of the wrong shape refused in one line.

.venv/bin/python -m pytest tests/test_results.py -q
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from utilities.evaluation.results import MetricsError, RunMetrics, SplitMetrics, VariantMetrics
from utilities.run.folder import write_json

# Written by a full run (prune, distill, -q dynamic, --calibrate, 100 resamples, subgroups) of the code
# before metrics were typed: what every later version must still read and write unchanged.
BEFORE = Path(__file__).parent / "data" / "metrics_before_typed.json"


def test_metrics_json_written_before_types_reads_and_writes_back_byte_for_byte(tmp_path):
    document = RunMetrics.from_json(json.loads(BEFORE.read_bytes()))
    assert set(document.variants) == {
        "model",
        "pruned",
        "student",
        "model_dynamic",
        "pruned_dynamic",
        "student_dynamic",
    }
    model = document.variants["model"]
    assert isinstance(model.test, SplitMetrics) and model.calibration.temperature > 0
    assert model.test.interval("balanced_accuracy")[0] <= model.test.balanced_accuracy
    assert document.variants["student"].training.path == "distiller"
    assert document.variants["model_dynamic"].source == "model" and document.variants["model_dynamic"].mode == "dynamic"
    write_json(tmp_path / "metrics.json", document.to_json())
    assert (tmp_path / "metrics.json").read_bytes() == BEFORE.read_bytes()


def test_absent_and_null_stay_apart():
    """An optional field that was not measured is left out; one measured as unknown stays null."""
    failed = VariantMetrics(error="RuntimeError: disk full")
    assert failed.to_json() == {"error": "RuntimeError: disk full"} and not failed.splits()
    latency = {"median": 1.0, "p90": 2.0}
    alone = VariantMetrics.from_json({"latency_ms": latency, "params": None})  # a TFLite file scored alone
    assert alone.to_json() == {"latency_ms": latency, "params": None}
    assert VariantMetrics().with_values(latency_ms=latency).latency_ms.p90 == 2.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["variants"]["model"].update(accuracy=0.5), r"variants\.model has unknown field\(s\) accuracy"),
        (lambda d: d["variants"]["model"]["test"].pop("n"), r"variants\.model\.test lacks field\(s\) n"),
        (lambda d: d["variants"]["model"].update(test=[1, 2]), r"variants\.model\.test must be an object, not list"),
        (lambda d: d["variants"]["model"]["val"].update(confusion_matrix=3), r"confusion_matrix must be a list"),
        (lambda d: d.update(variants=None), r"RunMetrics\.variants must be an object, not NoneType"),
    ],
)
def test_a_document_of_the_wrong_shape_is_refused_in_one_line(change, message):
    document = copy.deepcopy(json.loads(BEFORE.read_bytes()))
    change(document)
    with pytest.raises(MetricsError, match=message) as caught:
        RunMetrics.from_json(document)
    assert "\n" not in str(caught.value)
    with pytest.raises(MetricsError, match="no field"):
        VariantMetrics().with_values(accuracy=0.5)
