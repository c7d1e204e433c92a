"""Multi-worker training end to end: two cli.py processes on loopback with TF_CONFIG.

    .venv/bin/python -m pytest tests/test_multiworker.py -q

Two workers (free 127.0.0.1 ports; task 0 is chief) train the demo model with
MultiWorkerMirroredStrategy, reading shards from gs:// on the GCS emulator, as on Vertex AI. They
share one working directory, as two workers on one machine do, so relative `.cache/…` folders (shard
cache, the chief's staging folder) are shared. The first test publishes to `gs://BUCKET/models` and
checks that the chief alone uploads one complete run folder; the worker reaches GCS only through a
recording proxy, so any write it makes is caught. The second kills both workers after one epoch
and checks that a rerun resumes on both. A hang fails a test instead of blocking CI: both processes
are killed at the deadline and the tails of their output are shown.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures.gcs import FaultProxy, free_ports, upload_prepared

ROOT = Path(__file__).resolve().parents[1]
DATA_BUCKET = "dermaid-multiworker-data"
SPLITS = ("train", "val", "test")
TINY = ["--weights", "none", "--freeze-backbone", "--no-saved-model", "--image-size", "32"]
TINY += ["-b", "16", "-f", "16", "-e", "1", "--patience", "0"]
TINY += ["--backbone", "mobilenetv3small"]  # not about DenseNet: the smallest backbone keeps two workers cheap
DEADLINE_S = 600  # one two-worker run, start to exit (~3-5 min on 2 shared cores)
GRACE_S = 60  # after one worker failed, how long its peer may take to notice before it is killed
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class RecordingProxy(FaultProxy):
    """The fixtures' emulator proxy, also recording the HTTP method of every request it forwards."""

    methods: list[str] = field(default_factory=list)

    def take_fault(self, method: str) -> int | None:
        with self._lock:
            self.methods.append(method)
        return super().take_fault(method)


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    log: Path  # stdout and stderr

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        shown = "\n".join(line for line in text.splitlines() if "Collective all_reduce tensors" not in line)
        last = "\n".join(shown.splitlines()[-lines:])
        return f"--- worker {self.index} (exit {self.process.returncode}), last {lines} lines of {self.log}:\n{last}"


def start_workers(args: list[str], cwd: Path, logs: Path, envs: list[dict[str, str]]) -> list[Worker]:
    """One `cli.py args` process per entry of `envs` (extra environment), all in one cluster."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(envs))]
    logs.mkdir(parents=True, exist_ok=True)
    workers = []
    for index, extra in enumerate(envs):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = {k: v for k, v in os.environ.items() if k not in ("CLUSTER_SPEC", "TF_CONFIG")}
        env.update(extra, TF_CONFIG=json.dumps(tf_config), PYTHONUNBUFFERED="1")
        log = logs / f"worker-{index}.log"
        with log.open("wb") as out:  # a file, not a pipe: a full pipe would block a chatty worker
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        workers.append(Worker(index, process, log))
    return workers


def kill_all(workers: list[Worker]) -> None:
    for w in workers:
        if w.process.poll() is None:
            w.process.kill()
    for w in workers:
        w.process.wait(timeout=30)


def wait_all(workers: list[Worker], deadline_s: float = DEADLINE_S, grace_s: float = GRACE_S) -> None:
    """Wait for every worker; on the deadline (or a peer still running `grace_s` after a failure) kill all, fail."""
    deadline = time.monotonic() + deadline_s
    failed = False
    while any(w.process.poll() is None for w in workers):
        if not failed and any(w.process.returncode not in (None, 0) for w in workers):
            failed = True
            deadline = min(deadline, time.monotonic() + grace_s)
        if time.monotonic() > deadline:
            kill_all(workers)
            reason = "a worker failed and its peer hung" if failed else f"not done after {deadline_s:.0f} s"
            pytest.fail(f"multi-worker run hung ({reason}); killed both\n" + "\n".join(w.tail() for w in workers))
        time.sleep(0.5)


def assert_all_succeeded(workers: list[Worker]) -> None:
    assert all(w.process.returncode == 0 for w in workers), "\n".join(w.tail() for w in workers)
    # A worker that exits while the chief still works is reported by the chief as crashed.
    chief_log = workers[0].log.read_text(errors="replace")
    assert "unhealthy" not in chief_log, workers[0].tail()


@dataclass(frozen=True)
class GcsData:
    client: object  # google.cloud.storage.Client on the emulator
    manifest_path: Path  # a manifest naming gs:// shards
    sha256: dict[str, str]  # shard URI → digest


@pytest.fixture(scope="module")
def gcs_data(prepared, gcs_emulator, tmp_path_factory) -> Iterator[GcsData]:
    """The prepared shards copied to gs://DATA_BUCKET/data/, and a manifest naming them."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="emulator", credentials=AnonymousCredentials())
    gcs_emulator.make_bucket(DATA_BUCKET)
    manifest = upload_prepared(prepared.manifest_path, client, DATA_BUCKET)
    path = tmp_path_factory.mktemp("gcs-manifest") / "versioned_paths.pickle"
    path.write_bytes(pickle.dumps(manifest, protocol=4))
    yield GcsData(client, path, manifest["sha256"])


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_S + 240)
def test_two_workers_train_and_only_the_chief_publishes(gcs_data, gcs_emulator, tmp_path):
    bucket, name, run = gcs_emulator.make_bucket("dermaid-multiworker"), "mw", "mw-run-1"
    worker_proxy = RecordingProxy(gcs_emulator.port).start()
    cwd = tmp_path / "cwd"  # shared, as on one machine
    cwd.mkdir()
    worker_tmp = tmp_path / "worker-tmp"  # the worker's TMPDIR: its unpublished outputs go there
    worker_tmp.mkdir()
    args = ["--manifest", str(gcs_data.manifest_path), "--output", f"gs://{bucket}/models", "-n", name]
    args += ["--run-id", run, "-x", *TINY]
    args += ["-d", "--student-epochs", "1", "--student-filters", "8"]  # the chief distils alone afterwards
    chief_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "STORAGE_EMULATOR_HOST": gcs_emulator.host}
    worker_env = {**chief_env, "STORAGE_EMULATOR_HOST": worker_proxy.host, "TMPDIR": str(worker_tmp)}
    started = time.monotonic()
    try:
        workers = start_workers(args, cwd, tmp_path / "logs", [chief_env, worker_env])
        wait_all(workers)
    finally:
        worker_proxy.stop()
    print(f"two-worker run took {time.monotonic() - started:.0f} s")
    assert_all_succeeded(workers)

    # The chief published one complete run folder and the model name's latest.json, nothing else.
    prefix = f"models/{name}/{run}/"
    names = sorted(blob.name for blob in gcs_data.client.list_blobs(bucket))
    latest = f"models/{name}/latest.json"
    assert latest in names, names
    names.remove(latest)
    assert names and all(n.startswith(prefix) for n in names), names
    files = {n[len(prefix) :] for n in names}
    assert {"run.json", "metrics.json"} <= files, sorted(files)
    assert {"model/saved_model.pb", "model/model.keras"} & files, sorted(files)  # SavedModel or .keras
    leaked = [f for f in files if "workertemp" in f or "dermaid-worker" in f or f.startswith("checkpoints/")]
    assert not leaked, leaked
    lineage = json.loads(gcs_data.client.bucket(bucket).blob(prefix + "run.json").download_as_bytes())
    assert lineage["devices"]["strategy"] == "MultiWorkerMirroredStrategy", lineage["devices"]
    assert lineage["devices"]["replicas"] == 2, lineage["devices"]
    assert lineage["training"]["epochs_run"] == 1
    metrics = json.loads(gcs_data.client.bucket(bucket).blob(prefix + "metrics.json").download_as_bytes())
    assert 0.0 <= metrics["variants"]["model"]["test"]["balanced_accuracy"] <= 1.0
    student = metrics["variants"]["student"]
    assert "error" not in student and 0.0 <= student["agreement"] <= 1.0, student
    assert "student/model.keras" in files, sorted(files)

    # The worker published nothing (no write request at all, not even a write probe), tracked
    # nothing (one offline W&B run: the chief's) and left nothing in its TMPDIR.
    writes = [m for m in worker_proxy.methods if m in WRITE_METHODS]
    assert not writes, f"worker sent {len(writes)} write request(s) to GCS: {writes}"
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1
    assert not list(worker_tmp.iterdir()), list(worker_tmp.iterdir())

    # Both fetched into the one shard cache: every shard once, under its sha256, no temp files left.
    cached = sorted(p.name for p in (cwd / ".cache" / "shards").iterdir())
    assert cached == sorted(f"{digest}.tfrecords" for digest in set(gcs_data.sha256.values())), cached


@pytest.mark.slow
@pytest.mark.timeout(2 * DEADLINE_S + 120)
def test_an_interrupted_two_worker_run_resumes_on_both_workers(gcs_data, gcs_emulator, tmp_path):
    out, name, run = tmp_path / "out", "mw-resume", "r1"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["--manifest", str(gcs_data.manifest_path), "--output", str(out), "-n", name, "--run-id", run]
    args += [*TINY, "-e", "2"]  # the last -e wins
    (tmp_path / "tmp").mkdir()  # TMPDIR: a killed worker cannot remove its temporary folder
    env = {"STORAGE_EMULATOR_HOST": gcs_emulator.host, "TMPDIR": str(tmp_path / "tmp")}
    workers = start_workers(args, cwd, tmp_path / "first", [env, env])
    history = out / name / run / "history.csv"
    deadline = time.monotonic() + DEADLINE_S
    while not (history.exists() and len(history.read_text().strip().splitlines()) >= 2):  # header + epoch 1
        if time.monotonic() > deadline or any(w.process.poll() is not None for w in workers):
            kill_all(workers)
            pytest.fail("the first run ended or hung before its first epoch\n" + "\n".join(w.tail() for w in workers))
        time.sleep(0.05)
    kill_all(workers)  # SIGKILL both, as a preempted job
    assert not (out / name / run / "run.json").exists()

    workers = start_workers(args, cwd, tmp_path / "rerun", [env, env])
    wait_all(workers)
    assert_all_succeeded(workers)
    lineage = json.loads((out / name / run / "run.json").read_text())
    # Both restored epoch 1 from the chief's backup: a worker starting over would be out of step.
    assert lineage["training"] == {
        "resumed_from_epoch": 1,
        "resumed_from_step": 0,
        "epochs_run": 2,
        "weights": "as trained",
    }, lineage["training"]
