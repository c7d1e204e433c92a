"""The training job end to end through cli.py on tiny demo data (subprocesses: real flags, real env)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = "wandb-secret-value-0123456789abcdef0123"
# The default model fine-tunes the whole DenseNet121 and exports a SavedModel beside model.keras; most
# tests freeze the backbone (faster) and skip the minute-long SavedModel.
FINE_TUNED = ["--weights", "none", "--image-size", "32", "-b", "32", "-f", "16", "--patience", "0", "-l", "1e-3"]
TINY_EXPORT = [*FINE_TUNED, "--freeze-backbone"]
TINY = [*TINY_EXPORT, "--no-saved-model"]
FULL = "full"  # model name of the shared `full_run`


def run_cli(args, tmp_path, env_extra=None, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": SECRET}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def start_cli(args, tmp_path, log_name: str, request, env_extra=None) -> tuple[subprocess.Popen, Path]:
    """run_cli's process in the background, output to tmp_path / log_name; killed at the test's end if still running.

    `env_extra` changes run_cli's environment; a None value unsets that variable."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": SECRET}
    env.update(env_extra or {})
    env = {key: value for key, value in env.items() if value is not None}
    log = tmp_path / log_name
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "cli.py", *args], cwd=ROOT, env=env, stdout=sink, stderr=sink)

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)

    request.addfinalizer(stop)
    return proc, log


def only_run(out: Path, model_name: str) -> Path:
    runs = sorted(p for p in (out / model_name).iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


@dataclass(frozen=True)
class FullRun:
    """One CLI run with every output, shared by the tests that read them (each CLI run costs ~1 min)."""

    tmp: Path  # its WANDB_DIR and working folder
    out: Path  # its --output
    args: list[str]  # manifest, output, model name and model flags: a second run adds -e and the rest
    result: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def full_run(prepared, tmp_path_factory) -> FullRun:
    """The default model (the whole backbone fine-tuned, 2 epochs) tracked offline, distilled, quantized and
    exported as a SavedModel: test_cli_trains_evaluates_exports_and_tracks and
    test_cli_distills_and_quantizes_and_lists_every_variant read this one run instead of training twice."""
    tmp = tmp_path_factory.mktemp("full-run")
    out = tmp / "out"
    args = ["--manifest", str(prepared.manifest_path), "--output", str(out), "-n", FULL, *FINE_TUNED]
    flags = ["-e", "2", "-x", "--data-tag", "dataset_v01"]
    flags += ["-d", "--student-epochs", "1", "--student-filters", "8", "-q", "dynamic"]
    return FullRun(tmp, out, args, run_cli([*args, *flags], tmp, timeout=900))


@pytest.mark.slow
@pytest.mark.xdist_group("full_run")  # one worker runs both readers of the module's one full_run
def test_cli_trains_evaluates_exports_and_tracks(full_run, tmp_path, request):
    first = full_run.result
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run(full_run.out, FULL)
    # A second run never overwrites the first: checked on a copy (the shared run stays as it was), the
    # second run going on beside the checks of the first below. Frozen, no augmentation: cached features.
    # It keeps its checkpoints, and tracks offline (a key, no -x) without WANDB_DIR: into its run folder.
    out = tmp_path / "out"
    shutil.copytree(full_run.out, out)
    args = [*full_run.args, "--output", str(out), "--freeze-backbone"]  # the last --output wins
    second, second_log = start_cli(
        [*args, "-e", "1", "--no-augment", "--no-saved-model", "--keep-checkpoints", "--gate", "test.accuracy >= 0"],
        tmp_path,
        "second.log",
        request,
        env_extra={"WANDB_DIR": None},
    )
    # A complete run's backups are gone (its outputs and run.json are checked below).
    assert not (run_dir / "checkpoints").exists() and "removed the training backups" in first.stderr

    metrics = json.loads((run_dir / "metrics.json").read_text())
    model_metrics = metrics["variants"]["model"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "per_class_recall", "confusion_matrix"):
        assert key in model_metrics["val"] and key in model_metrics["test"]
    for key in ("size_bytes", "gzip_bytes", "latency_ms"):
        assert key in model_metrics
    lineage = json.loads((run_dir / "run.json").read_text())
    assert lineage["data"]["tag"] == "dataset_v01" and len(lineage["data"]["manifest_sha256"]) == 64
    assert lineage["data"]["shard_sha256"] and lineage["packages"]["tensorflow"]
    assert lineage["training"]["epochs_run"] == 2 and set(lineage["fusion_weights"]) == {"image", "metadata"}
    for name in ("report.md", "confusion_matrix.png", "training_curves.png", "history.csv"):
        assert (run_dir / name).stat().st_size > 0, name
    with (run_dir / "history.csv").open() as fh:  # the default schedule: warmup over epoch 1, cosine to 0 at the end
        rates = [float(row["lr"]) for row in csv.DictReader(fh)]
    assert len(rates) == 2 and rates[0] > 1e-4 > rates[1] >= 0  # -l 1e-3 peak

    # The model reloads in a fresh process and predicts probabilities.
    check = (
        "import numpy as np, utilities.model as m\n"
        f"model = m.load_model({str(run_dir / 'model')!r})\n"
        "p = model.predict({'image': np.zeros((2, 32, 32, 3), 'float32'), 'metadata': np.zeros((2, 28), 'float32')}, verbose=0)\n"
        "assert p.shape == (2, 8) and np.allclose(p.sum(1), 1, atol=1e-4)\n"
    )
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True, capture_output=True, timeout=300)
    # ... and as the original's SavedModel did, where this project cannot be imported: TensorFlow alone
    # (the serving signature), and tf_keras reviving it as a Keras model with the original's layer names.
    isolated = (
        "import sys, numpy as np, tensorflow as tf, tf_keras\n"
        "try:\n    import utilities\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('project importable')\n"
        f"path = {str(run_dir / 'model')!r}\n"
        "x = {'image': np.zeros((2, 32, 32, 3), 'float32'), 'metadata': np.zeros((2, 28), 'float32')}\n"
        "(out,) = tf.saved_model.load(path).signatures['serving_default'](**{k: tf.constant(v) for k, v in x.items()}).values()\n"
        "keras = tf_keras.models.load_model(path)\n"
        "assert out.shape == (2, 8) and np.allclose(out.numpy().sum(1), 1, atol=1e-4)\n"
        "np.testing.assert_allclose(keras.predict(x, verbose=0), out.numpy(), atol=1e-5)\n"
        "keras.get_layer('densenet121').get_layer('conv5_block16_2_conv')  # Grad-CAM's layer\n"
    )
    clean_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TF_USE_LEGACY_KERAS": "1"}
    loaded = subprocess.run(
        [sys.executable, "-I", "-c", isolated], cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    latest = json.loads((full_run.out / FULL / "latest.json").read_text())
    assert latest["run_id"] == run_dir.name and latest["model"] == str(run_dir / "model")

    # The second run.
    assert second.wait(timeout=600) == 0, second_log.read_text()[-3000:]
    assert "cached backbone features" in second_log.read_text()
    runs = sorted(p.name for p in (out / FULL).iterdir() if p.is_dir())
    assert len(runs) == 2 and not (out / FULL / runs[-1] / "model" / "saved_model.pb").exists()
    assert json.loads((out / FULL / "latest.json").read_text())["run_id"] == runs[-1]  # run ids sort by time
    verdict = json.loads((out / FULL / runs[-1] / "run.json").read_text())["gate"]  # a gate it passed moved latest
    assert verdict["passed"] and verdict["reasons"][0].startswith("test.accuracy = "), verdict
    second_dir = out / FULL / runs[-1]
    assert (second_dir / "checkpoints" / "backup").is_dir()  # --keep-checkpoints
    in_run = [p.name for p in second_dir.glob("wandb/offline-run-*")]
    assert len(in_run) == 1 and in_run[0].endswith(f"-{runs[-1]}"), in_run
    assert f"W&B offline run: {second_dir / 'wandb' / in_run[0]}; upload it with `wandb sync" in second_log.read_text()
    assert not list(ROOT.glob(f"wandb/offline-run-*-{runs[-1]}"))  # nothing in the current folder

    # W&B (offline) got the per-epoch metrics; the key is nowhere in outputs, logs or W&B files.
    wandb_runs = list(full_run.tmp.glob("wandb/offline-run-*"))
    assert wandb_runs, "no offline W&B run"
    for path in [*full_run.tmp.rglob("*"), *tmp_path.rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"
    assert SECRET not in first.stdout + first.stderr


def start_and_interrupt(args, log: Path, pattern: str, sig: signal.Signals) -> tuple[int, str]:
    """Run cli.py, send `sig` once `pattern` appears in its log; (exit code, log text)."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "cli.py", *args], cwd=ROOT, env=env, stdout=sink, stderr=sink)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and pattern not in log.read_text():
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before {pattern!r}: {log.read_text()[-2000:]}"
        proc.send_signal(sig)
        return proc.wait(timeout=120), log.read_text()


def last_step(text: str, epoch: int) -> int:
    """The last step the progress log (--progress-every 0) reported done in epoch `epoch` (1-based)."""
    return max(int(m) for m in re.findall(rf"epoch {epoch}/\d+ step (\d+)/", text))


@pytest.mark.slow
def test_preempted_run_resumes_at_the_next_step_with_the_same_batches(prepared, tmp_path, request):
    out = tmp_path / "out"
    # --dropout 0: Keras' dropout masks come from a stateful generator a restart resets; everything else
    # (data order, augmentation, optimizer state) is restored exactly, so the weights must be identical.
    common = ["--manifest", str(prepared.manifest_path), "--output", str(out), *TINY, "-b", "16", "-e", "2"]
    common += ["--dropout", "0", "--checkpoint-every", "3", "--progress-every", "0", "--no-tracking"]
    common += ["--ema", "0.9"]  # the weight average is in the backups too: resumed, it averages the same steps
    # The uninterrupted reference trains beside the interrupted runs (its own folder; the two processes share
    # the 2 cores, each importing, building or training in its own phase); compared once both are done.
    # It also fails its release gate: complete and kept, exit 3, no latest.json.
    failing = ["--gate", "test.balanced_accuracy > 1 or test.balanced_accuracy.ci95_low > 1"]
    reference, reference_log = start_cli(
        [*common, "-n", "ref", "--run-id", "r", *failing], tmp_path, "ref.log", request
    )
    args = [*common, "-q", "dynamic", "-n", "pre", "--run-id", "r"]

    # SIGTERM mid-epoch (what Vertex AI and spot VMs send): the step finishes, is saved, exit 75.
    code, text = start_and_interrupt(args, tmp_path / "term.log", "epoch 1/2 step 5/11", signal.SIGTERM)
    assert code == 75 and "preempted (SIGTERM)" in text and "rerun with --run-id r" in text, text[-2000:]
    stopped = last_step(text, 1)
    # SIGKILL mid-epoch (no warning at all): at most --checkpoint-every steps are lost (N - 1 between
    # backups, N when the kill lands while the logged step's backup is being written).
    code, text = start_and_interrupt(args, tmp_path / "kill.log", "epoch 2/2 step 5/11", signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed = int(re.search(r"resuming from the backup at epoch 1 step (\d+)", text).group(1))
    killed = last_step(text, 2)
    # SIGTERM after training (here: during the TFLite conversion): the trained weights are kept.
    code, text = start_and_interrupt(args, tmp_path / "late.log", "val balanced accuracy", signal.SIGTERM)
    assert code == 75, text[-2000:]
    resumed_after_kill = int(re.search(r"resuming from the backup at epoch 2 step (\d+)", text).group(1))
    final = run_cli(args, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "training had finished" in final.stderr and "step 1/11" not in final.stderr

    # A complete run is never touched again: that rerun goes on beside the checks below.
    again, again_log = start_cli(args, tmp_path, "again.log", request)

    assert reference.wait(timeout=600) == 3, reference_log.read_text()[-3000:]
    assert "error: release gate failed: test.balanced_accuracy = " in reference_log.read_text()
    verdict = json.loads((out / "ref/r/run.json").read_text())["gate"]
    assert not verdict["passed"] and len(verdict["reasons"]) == 2 and not (out / "ref" / "latest.json").exists()
    redone_after_term, redone_after_kill = stopped + 1 - resumed, killed + 1 - resumed_after_kill
    print(f"steps redone: after SIGTERM {redone_after_term}, after SIGKILL {redone_after_kill}")
    assert redone_after_term == 0 and 0 <= redone_after_kill <= 3
    check = (
        "import numpy as np, utilities.model as m\n"
        f"a, b = (m.load_model(p).get_weights() for p in ({str(out / 'ref/r/model')!r}, {str(out / 'pre/r/model')!r}))\n"
        "print(max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True)))\n"
    )
    diff = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert diff.returncode == 0 and float(diff.stdout.split()[-1]) == 0.0, diff.stdout + diff.stderr[-2000:]
    assert (out / "pre/r/model_dynamic.tflite").exists()

    assert again.wait(timeout=300) == 2 and "already complete" in again_log.read_text(), again_log.read_text()[-2000:]


@pytest.mark.slow
def test_two_replicas_train_and_each_gets_half_the_global_batch(prepared, tmp_path):
    script = f"""
import utilities
from utilities.data import pipeline as data
from utilities.run import distribution
distribution.configure_devices(2)
strategy = distribution.build_strategy(2, None)
shards = data.fetch_shards(data.load_manifest({str(prepared.manifest_path)!r}), {str(tmp_path / "cache")!r})
ds = data.build_datasets(shards, image_size=32, global_batch_size=32, seed=0)
features, labels = next(iter(strategy.experimental_distribute_dataset(ds.train)))
sizes = [int(t.shape[0]) for t in strategy.experimental_local_results(labels)]
assert strategy.num_replicas_in_sync == 2 and sizes == [16, 16], sizes
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, timeout=300)
    # The CLI training on two replicas end to end (a MirroredStrategy recorded in run.json) is checked on
    # the -g 2 run of test_mixed_precision_on_two_replicas_…: one two-replica CLI run serves both.


def test_more_replicas_than_gpus_on_a_gpu_machine_is_an_error(monkeypatch):
    import tensorflow as tf

    from utilities.run import distribution

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["gpu0", "gpu1"] if kind == "GPU" else [])
    with pytest.raises(distribution.DeviceError, match="this machine has 2 GPU"):
        distribution.configure_devices(4)


def test_jit_with_several_cpu_replicas_is_an_error():
    from utilities.run import distribution

    with pytest.raises(distribution.DeviceError, match="--jit with --gpus 2 needs GPUs"):
        distribution.configure_devices(2, jit=True)  # raises before any device is configured


def test_a_fine_tune_too_short_for_its_batchnorm_momentum_is_warned_about():
    from training import lagging_batchnorm
    from utilities.run.config import Config, ModelConfig, TrainConfig
    from utilities.run.recipe import batchnorm_momentum

    assert Config().model.bn_momentum == 0 and lagging_batchnorm(Config(), 14) is None  # chosen from the steps
    assert [batchnorm_momentum(0, steps) for steps in (1, 14, 137, 138, 280)] == [0.25, 0.9, 0.98, 0.99, 0.99]
    assert batchnorm_momentum(0.97, 14) == 0.97
    default = Config(model=ModelConfig(bn_momentum=0.99))  # the whole backbone fine-tuned, early stopping on
    assert default.model.fine_tune and default.train.patience
    warning = lagging_batchnorm(default, 14)  # the demo data at -g 2 -b 32
    assert "87% of the moving statistics" in warning and "early stopping" in warning
    assert "--bn-momentum 0.9 or lower" in warning and "\n" not in warning
    assert lagging_batchnorm(default, 280) is None  # ISIC 2019 at -b 64: 0.99 ** 280 = 6 %
    assert lagging_batchnorm(Config(model=ModelConfig(bn_momentum=0.9)), 14) is None  # 23 %
    assert lagging_batchnorm(Config(model=ModelConfig(fine_tune=False)), 14) is None  # frozen: fixed statistics
    no_stopping = Config(model=ModelConfig(bn_momentum=0.99), train=TrainConfig(patience=0))
    assert "(the curves)" in lagging_batchnorm(no_stopping, 14)


def test_cluster_roles():
    from utilities.run.distribution import parse_cluster

    assert parse_cluster(None).is_chief
    two = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    assert not parse_cluster(json.dumps(two)).is_chief
    two["task"]["index"] = 0
    assert parse_cluster(json.dumps(two)).is_chief and parse_cluster(json.dumps(two)).num_workers == 2


# Where only TensorFlow is installed: the test split's original JPEGs and metadata rows, as a client has
# them, through serving_raw, against the run's own predictions (tools.prepare's decode and resize).
SERVE_RAW = """
import csv, json, math, sys
import numpy as np, tensorflow as tf
model, isic, predictions = sys.argv[1:4]
with open(predictions, newline="") as f:
    rows = list(csv.DictReader(f))
with open(isic + "/ISIC_2019_Training_Metadata.csv", newline="") as f:
    meta = {r["image"]: r for r in csv.DictReader(f)}
classes = [c for c in rows[0] if c != "image"]
names = [r["image"] for r in rows]
expected = np.array([[float(r[c]) for c in classes] for r in rows])
signature = tf.saved_model.load(model).signatures["serving_raw"]
out = signature(
    image_bytes=tf.constant([open(f"{isic}/ISIC_2019_Training_Input/{n}.jpg", "rb").read() for n in names]),
    age_approx=tf.constant([float(meta[n]["age_approx"] or "nan") for n in names], tf.float32),
    sex=tf.constant([meta[n]["sex"] for n in names]),
    anatom_site_general=tf.constant([meta[n]["anatom_site_general"] for n in names]),
)
p = out["probabilities"].numpy()
print(json.dumps({
    "n": len(names),
    "agreement": float(np.mean(p.argmax(1) == expected.argmax(1))),
    "max_dp": float(np.abs(p - expected).max()),
    "predicted_classes": len(set(expected.argmax(1).tolist())),
    "class_names": [c.decode() for c in out["class_names"].numpy()[0]],
    "top_class_is_argmax": bool(all(t.decode() == classes[i] for t, i in zip(out["top_class"].numpy(), p.argmax(1)))),
    "flag_is_threshold": bool(np.array_equal(out["malignant_flag"].numpy(),
                                             out["malignant_score"].numpy() >= out["malignant_threshold"].numpy())),
    "malignant_is_sum": bool(np.allclose(out["malignant_score"].numpy(), p[:, [0, 2, 7, 3]].sum(1), atol=1e-6)),
}))
"""


@pytest.mark.slow
@pytest.mark.xdist_group("full_run")
def test_serving_raw_answers_like_the_run(full_run, demo_dir, tmp_path):
    """The exported model's raw-input signature, in a process that cannot import this project."""
    from utilities import serving

    assert full_run.result.returncode == 0, full_run.result.stderr[-3000:]
    run_dir = only_run(full_run.out, FULL)
    record = json.loads((run_dir / "model" / serving.SERVING_JSON).read_text())
    assert record["operating_point"]["specificity_on_val"] == 0.95 and record["image_size"] == 32
    got = serve_raw(run_dir, demo_dir, tmp_path)
    assert got["class_names"] == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert got["top_class_is_argmax"] and got["flag_is_threshold"] and got["malignant_is_sum"], got


def serve_raw(run_dir: Path, demo_dir: Path, tmp_path: Path, agreement: float = 0.99, max_dp: float = 0.02) -> dict:
    """SERVE_RAW on a run's SavedModel, in a process that cannot import this project: its summary.

    The records hold JPEGs re-encoded at the prepared size, the client the originals: a few grey levels
    apart, which moves a barely trained model's probabilities by more than a trained one's."""
    clean_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TF_USE_LEGACY_KERAS": "1"}
    args = [str(run_dir / "model"), str(demo_dir), str(run_dir / "predictions" / "model_test.csv")]
    done = subprocess.run(
        [sys.executable, "-I", "-c", SERVE_RAW, *args],
        cwd=tmp_path,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nserving_raw vs predictions/model_test.csv: {got}")
    assert got["n"] >= 20 and got["predicted_classes"] >= 2, got  # not a constant model: agreement means something
    assert got["agreement"] >= agreement and got["max_dp"] < max_dp, got
    return got


@pytest.mark.slow
def test_a_small_backbone_prunes_distils_quantizes_and_serves_raw_input(prepared, demo_dir, tmp_path):
    """--backbone mobilenetv3small (the smallest; its hard-swish is TF-op layers the trust check admits)
    through every step that touches the backbone: fine-tune, BatchNorm re-estimation, pruning inside it,
    distillation from it, int8 TFLite from raw fields, and the SavedModel served from raw inputs."""
    out = tmp_path / "out"
    args = ["--manifest", str(prepared.manifest_path), "--output", str(out), "-n", "small", *FINE_TUNED]
    args += ["--backbone", "MobileNetV3Small", "-e", "2", "--no-tracking", "-p", "--prune-epochs", "1"]
    args += ["-d", "--student-epochs", "1", "--student-filters", "8", "-q", "int8"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(out, "small")
    lineage = json.loads((run_dir / "run.json").read_text())
    assert lineage["config"]["model"]["backbone"] == "mobilenetv3small"  # the flag is case-insensitive
    assert lineage["training"]["batchnorm_batches"] > 0
    variants = json.loads((run_dir / "metrics.json").read_text())["variants"]
    assert {"model", "pruned", "student", "model_int8", "pruned_int8", "student_int8"} <= set(variants)
    for name, variant in variants.items():
        assert "error" not in variant, (name, variant)
    assert variants["pruned"]["sparsity_overall"] == pytest.approx(0.5, abs=0.05)
    # int8 from raw fields through MobileNetV3's graph; a 2-epoch model's near-uniform outputs make its argmax
    # agreement noise (test_quantization bounds it on a trained model), so only that it was measured.
    assert 0.0 <= variants["model_int8"]["agreement"] <= 1.0 and (run_dir / "tflite.json").is_file()
    assert "- MobileNetV3Small image branch" in (run_dir / "model_card.md").read_text()
    # Two epochs from scratch: ±2 grey levels of noise move this model's probabilities by up to 0.18
    # (measured), so the bound on |Δp| is loose; a backbone fed the wrong preprocessing would disagree.
    serve_raw(run_dir, demo_dir, tmp_path, agreement=0.9, max_dp=0.3)


@pytest.mark.slow
@pytest.mark.xdist_group("full_run")
def test_cli_distills_and_quantizes_and_lists_every_variant(full_run):
    result = full_run.result  # the default model: the whole backbone fine-tuned
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(full_run.out, FULL)
    # The fine-tuned backbone's BatchNorm statistics were re-estimated (on a copy, then copied back).
    assert json.loads((run_dir / "run.json").read_text())["training"]["batchnorm_batches"] > 0
    assert "BatchNorm statistics re-estimated" in result.stderr
    variants = json.loads((run_dir / "metrics.json").read_text())["variants"]
    assert {"model", "student", "model_dynamic", "student_dynamic"} <= set(variants), variants.keys()
    for name in ("student", "model_dynamic", "student_dynamic"):
        assert "error" not in variants[name], variants[name]
        assert 0.0 <= variants[name]["agreement"] <= 1.0 and variants[name]["gzip_bytes"] > 0
    assert (run_dir / "model_dynamic.tflite").stat().st_size < variants["model"]["size_bytes"]
    assert (run_dir / "student").is_dir()
    report = (run_dir / "report.md").read_text()
    assert "student_dynamic" in report and "model_dynamic" in report


@pytest.mark.slow
def test_mixed_precision_on_two_replicas_scales_the_student_loss_and_exports_float32(prepared, tmp_path):
    out = tmp_path / "out"
    args = ["--manifest", str(prepared.manifest_path), "--output", str(out), "-n", "mp", "-e", "1", *TINY]
    # No -q here: the mixed-precision conversion is a unit test. Not about DenseNet: the smallest backbone.
    flags = ["--mixed-precision", "-g", "2", "-d", "--student-epochs", "1", "--student-filters", "8", "--ema", "0.9"]
    flags += ["--backbone", "mobilenetv3small"]
    result = run_cli([*args, *flags], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run(out, "mp")
    lineage = json.loads((run_dir / "run.json").read_text())
    assert lineage["config"]["train"]["mixed_precision"] is True
    assert lineage["training"]["weights"] == "moving average (--ema 0.9)"  # mirrored averages on two replicas
    # The two-replica CLI run (also for test_two_replicas_train_and_each_gets_half_the_global_batch).
    assert lineage["devices"]["replicas"] == 2 and lineage["devices"]["strategy"] == "MirroredStrategy"
    variants = json.loads((run_dir / "metrics.json").read_text())["variants"]
    assert set(variants) == {"model", "student"} and "(replica_loop)" in result.stderr
    assert variants["student"]["batchnorm_batches"] > 0  # re-estimated on a copy, copied into the mirrored student
    for name, variant in variants.items():
        assert "error" not in variant, (name, variant)
        assert 0.0 <= variant["val"]["balanced_accuracy"] <= 1.0
    check = (
        "import numpy as np, utilities.model as m\n"
        "for name in ('model', 'student'):\n"
        f"    model = m.load_model({str(run_dir)!r} + '/' + name)\n"
        "    assert {l.compute_dtype for l in model.layers if l.weights} == {'float32'}, name\n"
        "    p = model.predict({'image': np.zeros((2, 32, 32, 3), 'float32'), 'metadata': np.zeros((2, 28), 'float32')}, verbose=0)\n"
        "    assert p.dtype == np.float32 and np.all(np.isfinite(p)), name\n"
    )
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, check=True, capture_output=True, timeout=300)


def test_bad_teacher_path_fails_before_training(prepared, tmp_path):
    args = ["--manifest", str(prepared.manifest_path), "--output", str(tmp_path / "out"), *TINY]
    result = run_cli([*args, "-d", "--teacher", str(tmp_path / "nope.keras")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "teacher" in result.stderr.strip().splitlines()[-1]
    assert "Epoch 1" not in result.stdout
