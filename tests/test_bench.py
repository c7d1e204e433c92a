"""Benchmarks run end to end on tiny data and write the JSON others read (no timing assertions).

.venv/bin/python -m pytest tests/test_bench.py -q
"""

from __future__ import annotations

import json

import pytest

from bench import all as bench_all
from bench import common, compression, pipeline, scale
from tools.demo_data import write_demo
from utilities.data.schema import IMAGE_DIR


@pytest.mark.slow
def test_pipeline_bench_writes_its_json(prepared, tmp_path, capsys):
    out = tmp_path / "pipeline.json"
    argv = ["--manifest", str(prepared.manifest_path), "--image-size", "32", "--batch-size", "16"]
    argv += ["--modes", "frozen", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert pipeline.main(argv) == 0
    result = json.loads(out.read_text())
    assert {"benchmark", "machine", "settings", "data", "results", "ratios", "targets", "seconds"} <= set(result)
    assert set(result["results"]) == {"pipeline", "naive", "model_frozen"}
    for stats in result["results"].values():
        assert set(stats) == {"median", "min", "max", "spread", "repeats", "samples"}
        assert stats["median"] > 0 and stats["repeats"] == 1
    assert set(result["ratios"]) == {"margin_vs_model_frozen", "speedup_vs_naive"}
    assert result["targets"] == {"margin_vs_model_frozen": pipeline.MARGIN_TARGET}
    assert result["machine"]["cpus_usable"] >= 1
    assert "margin_vs_model_frozen" in capsys.readouterr().out  # the table


def test_a_missing_manifest_is_a_one_line_error_and_exit_2(tmp_path, capsys):
    argv = ["--manifest", str(tmp_path / "none.pickle"), "--out", str(tmp_path / "x.json")]
    assert pipeline.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bench.pipeline: manifest") and "\n" not in err
    assert not (tmp_path / "x.json").exists()


def test_compare_runs_sides_round_robin_and_summarises_rates():
    order: list[str] = []

    def side(name: str, examples: int):
        return lambda: order.append(name) or examples

    stats = common.compare({"a": side("a", 4), "b": lambda: (order.append("b"), (6, 2.0))[1]}, warmup=1, repeats=3)
    assert order == ["a", "b"] * 4  # warm-up round, then three measured rounds, interleaved
    assert stats["b"].median == pytest.approx(3.0) and stats["b"].spread == 0.0  # self-timed: 6 examples in 2 s
    assert stats["a"].repeats == 3 and stats["a"].min <= stats["a"].median <= stats["a"].max
    assert common.ratio(stats["b"], common.Stats.of([1.5, 3.0, 6.0])) == pytest.approx(1.0)  # per-round: 2, 1, 0.5


def test_all_checks_each_ratio_against_its_target():
    payloads = {
        "cache": {"ratios": {"cached_epoch_speedup": 25.0}, "targets": {"cached_epoch_speedup": 20.0}},
        "training": {"ratios": {"pipeline_vs_memory_frozen": 0.9}, "targets": {"pipeline_vs_memory_frozen": 0.95}},
        "mfu": {"mfu": {}},
    }
    met = {(c["benchmark"], c["met"]) for c in bench_all.checks(payloads)}
    assert met == {("cache", True), ("training", False)}


def test_compression_table_from_a_runs_metrics(tmp_path, capsys):
    metrics = {
        "variants": {
            "model": {"latency_ms": {"median": 60.0, "p90": 70.0}, "size_bytes": 36_000_000, "gzip_bytes": 25_000_000},
            "model_int8": {"latency_ms": {"median": 5.0, "p90": 6.0}, "size_bytes": 7_300_000, "gzip_bytes": 7_000_000},
            "student": {"error": "CompressionError: boom"},
        }
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "compression.json"
    assert compression.main(["--metrics", str(tmp_path / "metrics.json"), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| model_int8 | 5 | 6 | 7.30 | 7.00 |" in table and "CompressionError: boom" in table
    assert json.loads(out.read_text())["variants"]["model"]["latency_ms"]["median"] == 60.0


def test_whole_run_bench_refuses_epochs_that_give_no_marginal_epoch(capsys):
    from bench import runs

    assert runs.main(["--epochs", "3", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: bench.runs: --epochs SHORT LONG needs 1 <= SHORT < LONG"


def test_fast_decode_stays_close_to_full_decode_and_area_resize(tmp_path):
    demo = write_demo(tmp_path / "isic", images=100, seed=1, sizes="isic", scale=0.2)  # 120×90 … 800×600
    quality = scale.decode_quality(demo / IMAGE_DIR, size=32, per_size=3)
    assert set(quality) == {"120x90", "205x154", "205x205", "800x600"}
    for numbers in quality.values():
        assert numbers["psnr_db"] > 30 and numbers["mad"] < 5, numbers
    image = next((demo / IMAGE_DIR).glob("*.jpg"))
    assert scale.mad_psnr(scale.full_decode(image, 32), scale.full_decode(image, 32)) == (0.0, float("inf"))


def test_flatness_is_within_15_percent_of_the_median():
    def row(seconds, images, rss):
        return {p: {"seconds": seconds, "images": images, "peak_rss_mb": rss} for p in scale.PHASE_NAMES}

    flat = scale.flatness({1000: row(1.0, 1000, 700.0), 2000: row(2.1, 2000, 720.0), 4000: row(4.0, 4000, 900.0)})
    assert flat["prepare"]["ms_per_image"] == [1.0, 1.05, 1.0]
    assert flat["prepare"]["cost_flat"] and not flat["prepare"]["rss_flat"]


@pytest.mark.slow
def test_scale_bench_writes_its_json(tmp_path, capsys):
    out = tmp_path / "scale.json"
    argv = ["--counts", "120", "--scale", "0.04", "--image-size", "32", "--batch-size", "8", "--train-steps", "1"]
    assert scale.main([*argv, "--cache-images", "16", "--quality-images", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    keys = {"benchmark", "machine", "settings", "demo", "decode", "measured_on", "counts", "flat", "seconds"}
    assert keys <= set(result)
    assert set(result["measured_on"]) == set(scale.PHASE_NAMES)  # full N or a fixed sample, phase by phase
    phases = result["counts"]["120"]
    assert set(phases) == {"images", *scale.PHASE_NAMES}
    for name in scale.PHASE_NAMES:
        assert phases[name]["seconds"] > 0 and phases[name]["peak_rss_mb"] > 0 and phases[name]["images"] > 0, name
    assert phases["prepare"]["shard_bytes"] > 120 * 32 * 32 * 3
    assert phases["prepare"]["images"] == phases["labels"]["images"] == phases["images"]  # the full N
    assert phases["cache_build"]["images"] == 16 and phases["cache_build"]["first_batch_seconds"] > 0  # the sample
    assert phases["cached_epoch"]["images"] > 16  # N's train count of cached rows, not the sample's
    assert set(result["flat"]) == set(scale.PHASE_NAMES)
    assert "Scale: ISIC-sized JPEGs" in capsys.readouterr().out


def test_recipe_bench_builds_the_digits_task_in_the_isic_layout_and_its_floor(tmp_path):
    """bench.recipe's real-image task: scikit-learn's digits 0-7 go through tools.prepare like ISIC data, and a
    logistic regression on 16×16 grey pixels of its split is the floor the recipes are held to."""
    from bench import recipe

    manifest = recipe.task_manifest("digits", tmp_path)
    arrays = recipe.split_arrays(manifest, tmp_path / "cache")
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    assert x_train.shape[1] == 256 and set(y_train) == set(range(8)) and set(y_test) == set(range(8))
    assert len(x_train) + len(x_test) < 1437 and len(x_train) > 900  # val held apart
    assert recipe.logistic_floor(manifest, tmp_path / "cache2") > 0.9  # real digits: an easy, not a trivial, task
    row = {"test": 0.9, "val": 0.9, "in_fit_gap": 0.01, "worst_train_fall": 0.0}
    table = recipe.report(
        {"tasks": {"digits": {"logistic_regression_test": 0.97, "runs": {"old": [row], "new": [row]}}}}
    )
    assert "logistic regression" in table and "0.900" in table


def test_backbones_bench_offers_every_backbone_and_tables_what_a_run_measured():
    from bench import backbones
    from utilities.run.config import BACKBONES

    assert backbones.build_parser().parse_args([]).backbones == list(BACKBONES)
    assert backbones.parameters("mobilenetv3small") < backbones.parameters("densenet121")
    row = {"test": 0.9, "int8_test": 0.88, "int8_agreement": 0.97, "keras_bytes": 2**20, "int8_bytes": 2**19}
    row |= {"latency_ms": 5.0, "int8_latency_ms": 0.5, "run_seconds": 60.0}
    table = backbones.report(
        {"parameters": {"mobilenetv3small": 950_000}, "tasks": {"demo": {"mobilenetv3small": [row]}}}
    )
    assert "| demo | mobilenetv3small | 0.95 | 0.9 | 0.88 | 0.97 | 1 | 0.5 | 5 | 0.5 | 60 |" in table
