"""Evaluation a team can check: per-image predictions scored by the ISIC challenge's own scorer,
--calibrate folded into the exported models, and tools.evaluate on another dataset version.

    .venv/bin/python -m pytest tests/test_evaluate.py -q

One tiny run (`scored_run`, tests/fixtures/data.py: 1 epoch, 32 px, frozen untrained backbone,
--calibrate, -q dynamic) is shared by these tests and tests/test_run.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import utilities.model  # noqa: F401  (registers the FusionLayer for plain load_model)
from tools import evaluate
from tools.prepare import MANIFEST_NAME, prepare
from utilities.data import records
from utilities.data.schema import CLASS_NAMES

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("scored_run")]  # one worker makes the session's scored_run


@pytest.fixture(scope="module")
def run(scored_run):
    return scored_run.result, scored_run.run_dir


def _read(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["image", *CLASS_NAMES]
    return [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def test_predictions_are_scored_by_the_isic_scorer_as_we_score_them(run, prepared):
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore

    _, run_dir = run
    metrics = json.loads((run_dir / "metrics.json").read_text())["variants"]
    assert set(metrics) == {"model", "model_dynamic", "model_tta"}  # the scorer agrees on the TTA variant too
    for split in ("val", "test"):
        names, _ = _read(run_dir / "predictions" / f"truth_{split}.csv")
        assert names == list(prepared.manifest["images"][split])  # the records' ISIC ids, in record order
        for variant in metrics:
            score = ClassificationScore.from_file(
                run_dir / "predictions" / f"truth_{split}.csv",
                run_dir / "predictions" / f"{variant}_{split}.csv",
                ClassificationMetric.BALANCED_ACCURACY,
            )
            ours = metrics[variant][split]
            assert score.aggregate["balanced_accuracy"] == pytest.approx(ours["balanced_accuracy"], abs=1e-6)
            for name in CLASS_NAMES:
                assert score.per_category.loc[name, "auc"] == pytest.approx(ours["per_class_auc"][name], abs=1e-6)


def test_each_split_has_intervals_calibration_triage_and_subgroups_that_add_up(run):
    result, _ = run
    for variant in result.variants.values():
        for split in ("val", "test"):
            m = variant.metrics.splits()[split]
            low, high = m.ci95.balanced_accuracy
            assert low <= m.balanced_accuracy <= high and m.ci95.resamples == 200
            assert sum(m.reliability.count) == m.n and 0.0 <= m.ece <= 1.0
            assert set(m.triage) == {"melanoma", "malignant"}
            for attribute, groups in m.subgroups.items():
                assert sum(g.n for g in groups.values()) == m.n, attribute


def test_calibration_is_folded_into_the_exported_model_and_its_tflite_conversion(run):
    result, run_dir = run
    model = result.variants["model"].metrics
    calibration = model.calibration
    assert calibration.temperature > 0 and calibration.temperature != 1.0
    for split, m in model.splits().items():  # a temperature never changes the argmax
        assert calibration.balanced_accuracy_before[split] == m.balanced_accuracy
    assert calibration.ece_after["val"] <= calibration.ece_before["val"] + 1e-9  # fitted on val: NLL down

    _, calibrated = _read(run_dir / "predictions" / "model_val.csv")
    keras = tf_keras.models.load_model(str(run_dir / "model" / "model.keras"))  # plain load_model
    datasets = _val_batches(result, run_dir)
    outputs = np.concatenate([keras(features, training=False).numpy() for features, _ in datasets])
    np.testing.assert_allclose(outputs, calibrated, atol=1e-5)

    from utilities.compression.quantization import tflite_predict_fn

    tflite = tflite_predict_fn(run_dir / "model_dynamic.tflite")
    converted = np.concatenate([tflite({k: v.numpy() for k, v in f.items()}) for f, _ in datasets])
    assert np.mean(converted.argmax(1) == calibrated.argmax(1)) >= 0.9
    np.testing.assert_allclose(converted, calibrated, atol=0.05)  # dynamic-range weights: close, not equal


def _val_batches(result, run_dir: Path):
    from utilities.data import pipeline as data

    shards = data.fetch_shards(data.load_manifest(result.record.data.manifest), run_dir / "shards")
    return data.build_eval_data(shards, 32, 32).val


def test_tools_evaluate_scores_a_run_on_another_dataset_version(run, demo_dir, tmp_path):
    _, run_dir = run
    other = prepare(demo_dir, tmp_path / "v2", image_size=32, shard_size=40, seed=7)  # another split of the images
    out = tmp_path / "eval"
    gate = ["--gate", "test.balanced_accuracy >= 0 and dynamic.agreement >= 0.5"]  # no such variant here
    code = evaluate.main(
        ["--model", str(run_dir), "--manifest", str(tmp_path / "v2" / MANIFEST_NAME), "--output", str(out), *gate]
    )
    assert code == 3  # scored and written, but the gate failed
    lineage = json.loads((out / "evaluation.json").read_text())
    assert lineage["gate"]["reasons"][1] == "dynamic.agreement: the run has no variant dynamic"
    assert lineage["model_run"]["run_id"] == "r1"
    assert lineage["data"]["manifest_sha256"] != lineage["model_run"]["manifest_sha256"]
    metrics = json.loads((out / "metrics.json").read_text())["variants"]["model"]
    assert metrics["test"]["n"] == sum(other["counts"]["test"].values())
    names, probs = _read(out / "predictions" / "model_test.csv")
    assert names == list(other["images"]["test"]) and probs.shape == (len(names), len(CLASS_NAMES))
    assert "# Evaluation report" in (out / "report.md").read_text()

    tflite_out = tmp_path / "eval_tflite"
    code = evaluate.main(
        [
            "--model",
            str(run_dir / "model_dynamic.tflite"),
            "--manifest",
            str(tmp_path / "v2" / MANIFEST_NAME),
            "--output",
            str(tflite_out),
            "--gate",
            "test.balanced_accuracy >= 0",
        ]
    )
    assert code == 0
    assert json.loads((tflite_out / "evaluation.json").read_text())["gate"]["passed"]
    assert json.loads((tflite_out / "evaluation.json").read_text())["model_run"]["run_id"] == "r1"


@pytest.mark.parametrize("model", ["missing", "not_a_model.keras"])
def test_tools_evaluate_refuses_a_bad_model_in_one_line(model, prepared, tmp_path, capsys):
    path = tmp_path / model
    if model.endswith(".keras"):
        path.write_bytes(b"not a zip")
    code = evaluate.main(
        ["--model", str(path), "--manifest", str(prepared.manifest_path), "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_tools_evaluate_refuses_a_bad_manifest_in_one_line(run, tmp_path, capsys):
    _, run_dir = run
    bad = tmp_path / "bad.pickle"
    bad.write_bytes(b"\x80\x04not a pickle")
    code = evaluate.main(["--model", str(run_dir), "--manifest", str(bad), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err


def test_records_without_image_name_are_named_by_split_shard_and_index(tmp_path):
    def example(label: int) -> bytes:
        feature = {
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(32 * 32 * 3)])),
            "metadata": tf.train.Feature(int64_list=tf.train.Int64List(value=[0] * 28)),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=np.eye(8, dtype=int)[label].tolist())),
        }
        return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

    paths = []
    for shard in range(2):
        path = tmp_path / f"{shard:04d}.tfrecords"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for label in range(3):
                writer.write(example(label))
        paths.append(str(path))
    who = records.read_identities(paths, "val")
    assert who.names == ("val/0000/0", "val/0000/1", "val/0000/2", "val/0001/0", "val/0001/1", "val/0001/2")
    assert who.labels.tolist() == [0, 1, 2, 0, 1, 2] and who.metadata.shape == (6, 28)


def test_tools_evaluate_takes_a_registry_tag_and_refuses_an_unknown_one(run, prepared, tmp_path, capsys):
    from tools import registry

    _, run_dir = run
    repo = tmp_path / "registry"
    registry.publish(repo, prepared.manifest_path, "dataset_v07", remote=str(tmp_path / "remote"))
    out = tmp_path / "eval"
    args = ["--model", str(run_dir / "model"), "--registry", str(repo), "--bootstrap", "0", "--gallery", "0"]
    assert evaluate.main([*args, "--tag", "dataset_v07", "--output", str(out)]) == 0
    lineage = json.loads((out / "evaluation.json").read_text())
    assert lineage["data"]["tag"] == "dataset_v07"
    assert lineage["data"]["manifest_sha256"] == lineage["model_run"]["manifest_sha256"]  # the data it trained on
    assert "ci95" not in json.loads((out / "metrics.json").read_text())["variants"]["model"]["test"]
    assert not (out / "error_gallery.png").exists()

    capsys.readouterr()
    code = evaluate.main([*args, "--tag", "dataset_v99", "--output", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot fetch tag dataset_v99") and "\n" not in err
    assert not (tmp_path / "none").exists()


def test_tools_evaluate_reads_a_gs_run_and_writes_a_gs_evaluation_once(run, prepared, gcs_emulator, tmp_path, capsys):
    from utilities import storage

    _, run_dir = run
    bucket = gcs_emulator.make_bucket("evaluate-bucket")
    for name in ("run.json", "model/model.keras", "model_dynamic.tflite"):
        storage.upload_file(run_dir / name, f"gs://{bucket}/runs/r1/{name}")
    out = f"gs://{bucket}/evals/e1"
    args = ["--manifest", str(prepared.manifest_path), "--bootstrap", "0"]
    assert evaluate.main(["--model", f"gs://{bucket}/runs/r1", *args, "--output", out]) == 0
    lineage = json.loads(storage.read_bytes(f"{out}/evaluation.json"))
    assert lineage["model"] == f"gs://{bucket}/runs/r1" and lineage["model_run"]["run_id"] == "r1"
    assert storage.exists(f"{out}/predictions/model_test.csv") and storage.exists(f"{out}/report.md")

    tflite = f"gs://{bucket}/runs/r1/model_dynamic.tflite"
    assert evaluate.main(["--model", tflite, *args, "--gallery", "0", "--output", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "evaluation.json").read_text())["model_run"]["run_id"] == "r1"

    capsys.readouterr()
    assert evaluate.main(["--model", tflite, *args, "--output", out]) == 2  # never over another evaluation
    assert "already holds files" in capsys.readouterr().err


def test_a_relative_registry_folder_reaches_dvc_pull_absolute(tmp_path, monkeypatch):
    """dvc_pull.sh runs in a scratch folder: `--registry demo/registry` must name the folder from there too."""
    from tools.evaluate import _absolute

    (tmp_path / "demo" / "registry").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _absolute("demo/registry") == str(tmp_path / "demo" / "registry")
    for url in ("https://u:t@host/r.git", "git@host:org/r.git", "file:///srv/r"):
        assert _absolute(url) == url
