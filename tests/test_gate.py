"""The release gate (utilities/evaluation/gate.py, training.release_verdict): a closed grammar over the
metrics' fields, judged on a real metrics.json; the default gate against the run latest.json names.
Whole runs that pass and fail a gate (exit 3, latest.json not moved): tests/test_training.py.

.venv/bin/python -m pytest tests/test_gate.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utilities.evaluation import gate
from utilities.evaluation.results import RunMetrics

METRICS = RunMetrics.from_json(json.loads((Path(__file__).parent / "data" / "metrics_before_typed.json").read_text()))
TEST_BA = METRICS.variants["model"].test.balanced_accuracy  # 0.134
LOW = METRICS.variants["model"].test.interval("balanced_accuracy")[0]


def judge(expression: str) -> gate.Verdict:
    return gate.parse(expression).judge(METRICS)


def test_clauses_read_fields_of_every_variant_and_say_their_values():
    verdict = judge("test.balanced_accuracy.ci95_low >= 0.70 and dynamic.agreement >= 0.98")
    assert not verdict.passed  # "dynamic" stands for model_dynamic
    assert verdict.reasons == (
        f"test.balanced_accuracy.ci95_low = {LOW:.4g} not >= 0.7",
        "dynamic.agreement = 1 >= 0.98",
    )
    assert judge(f"test.balanced_accuracy >= {TEST_BA - 0.01}").passed
    assert judge(
        "student.test.accuracy > 0.2 and pruned.latency_ms.p90 < 100000 and pruned.sparsity_overall > 0.4"
    ).passed
    assert judge("pruned_dynamic.gzip_ratio_vs_float > 1 and model.val.ece < 1").passed


def test_and_binds_tighter_than_or_and_parentheses_group():
    assert judge("test.accuracy > 1 and val.accuracy > 1 or test.accuracy >= 0").passed
    assert not judge("test.accuracy > 1 and (val.accuracy > 1 or test.accuracy >= 0)").passed


def test_a_field_the_run_did_not_produce_fails_its_clause_and_says_why():
    verdict = judge("int8.agreement >= 0.9")
    assert not verdict.passed and verdict.reasons == ("int8.agreement: the run has no variant int8",)
    failed = RunMetrics.from_json({"variants": {"model_int8": {"error": "QuantizationError: no data"}}})
    (reason,) = gate.parse("int8.agreement >= 0.9").judge(failed).reasons
    assert reason == "int8.agreement: variant model_int8 failed (QuantizationError: no data)"
    no_interval = RunMetrics.from_json(
        {"variants": {"model": {"test": {**METRICS.variants["model"].test.to_json(), "ci95": None}}}}
    )
    (reason,) = gate.parse("test.balanced_accuracy.ci95_low > 0").judge(no_interval).reasons
    assert "no 95 % interval" in reason


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "needs an expression"),
        ("test.balanced_accuracy >=", "a clause is `field OP number`"),
        ("test.balanced_accuracy >= 0.7 and", "a clause is"),
        ("test.balanced_accuracy >= 0.7)", r"unexpected '\)'"),
        ("(test.balanced_accuracy >= 0.7", "not closed"),
        ("test.accuracy.ci95_low > 0.5", "is not a metric"),  # no interval of accuracy
        ("test.__class__ > 0", "is not a metric"),
        ("__import__('os').system('x') > 0", "cannot read"),
        ("latency_ms.median < 3", "is not a metric"),  # a variant field needs its variant
        ("test.balanced_accuracy => 0.7", "cannot read '=> 0.7'"),
    ],
)
def test_an_expression_outside_the_grammar_is_refused_in_one_line(expression, message):
    with pytest.raises(gate.GateError, match=message) as caught:
        gate.parse(expression)
    assert "\n" not in str(caught.value)


def test_the_default_gate_compares_with_the_latest_run_on_the_same_data(tmp_path):
    import training
    from utilities.run.config import Config, OutputConfig
    from utilities.run.folder import DataRecord, RunRecord

    config = Config(output=OutputConfig(output=str(tmp_path), model_name="m", run_id="new"))
    record = RunRecord("new", "m", str(tmp_path / "m" / "new"), "", data=DataRecord(None, "", "sha-a"))
    assert training.release_verdict(config, record, METRICS) is None  # no latest.json: nothing to compare with
    old = tmp_path / "m" / "old"
    old.mkdir(parents=True)
    (old / "metrics.json").write_text(json.dumps(METRICS.to_json()))
    pointer = {"run_id": "old", "uri": str(old), "manifest_sha256": "sha-a"}
    (tmp_path / "m" / "latest.json").write_text(json.dumps(pointer))
    verdict = training.release_verdict(config, record, METRICS)  # the same metrics: within its own interval
    assert (
        verdict.passed
        and verdict.expression == f"test.balanced_accuracy >= {round(LOW, 6):g} (latest run old's ci95_low)"
    )
    worse = json.loads(json.dumps(METRICS.to_json()))
    worse["variants"]["model"]["test"]["balanced_accuracy"] = LOW - 0.01
    assert not training.release_verdict(config, record, RunMetrics.from_json(worse)).passed
    other_data = RunRecord("new", "m", "", "", data=DataRecord(None, "", "sha-b"))  # other test images: no gate
    assert training.release_verdict(config, other_data, RunMetrics.from_json(worse)) is None
    explicit = Config(output=config.output, evaluation=config.evaluation.__class__(gate="off"))
    assert training.release_verdict(explicit, record, RunMetrics.from_json(worse)) is None
