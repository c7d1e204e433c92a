"""The trust-boundary probe table (issue 21): hostile input → exit code → the one line that refuses it.

Each row builds its hostile input in a temporary folder and runs the command as a user types it
(in-process `main(argv)`, or `sh dvc_pull.sh`), then checks the exit code, that the last stderr line
matches, that no traceback was printed and that nothing was left behind (no run folder, no payload
marker). The detailed tests of each defence live beside their modules (test_model_trust, test_secrets,
test_lease, test_data_trust, test_prepare_trust); this table is where the next audit starts: add a row.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.data import Prepared
from tests.test_data_trust import _example
from tests.test_model_trust import _payload_model
from tests.test_prepare_trust import _claim_size, _jpeg, _labelled_image
from utilities.data.schema import NUM_CLASSES

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--weights", "none", "--image-size", "32", "-b", "8", "-e", "1", "--no-tracking", "--run-id", "r1"]


@dataclass(frozen=True)
class Probe:
    name: str
    make: Callable[..., tuple[Callable[[], int], Path | None]]  # (tmp, prepared, demo) → (run, must-not-exist)
    code: int
    message: str  # regex searched in stderr's last line


def _cli(argv: list[str]) -> Callable[[], int]:
    import cli

    return lambda: cli.main(argv)


def _manifest(tmp: Path, prepared: Prepared, edit) -> str:
    content = pickle.loads(prepared.manifest_path.read_bytes())
    edit(content)
    path = tmp / "versioned_paths.pickle"
    path.write_bytes(pickle.dumps(content))
    return str(path)


def _evil_h5(tmp: Path) -> None:
    """tmp/evil.h5: a model whose Lambda writes tmp/ran; building it ran it once, so the marker is removed."""
    _payload_model(tmp / "ran").save(str(tmp / "evil.h5"))
    (tmp / "ran").unlink()


def lambda_teacher(tmp, prepared, demo):
    _evil_h5(tmp)
    out = tmp / "out"
    argv = ["--manifest", str(prepared.manifest_path), "--output", str(out), "-d", "--teacher", str(tmp / "evil.h5")]
    return _cli(argv + TRAIN), out / "base_model" / "r1"


def lambda_evaluated(tmp, prepared, demo):
    from tools import evaluate

    _evil_h5(tmp)
    argv = ["--model", str(tmp / "evil.h5"), "--manifest", str(prepared.manifest_path), "--output", str(tmp / "e")]
    return lambda: evaluate.main(argv), tmp / "e"


def shard_twice(tmp, prepared, demo):
    manifest = _manifest(tmp, prepared, lambda m: m["train"].append(m["train"][0]))
    return _cli(["--manifest", manifest, "--output", str(tmp / "out"), *TRAIN]), tmp / "out" / "base_model" / "r1"


def train_shard_in_test(tmp, prepared, demo):
    manifest = _manifest(tmp, prepared, lambda m: m["test"].append(m["train"][0]))
    return _cli(["--manifest", manifest, "--output", str(tmp / "out"), *TRAIN]), tmp / "out" / "base_model" / "r1"


def two_hot_label(tmp, prepared, demo):
    import tensorflow as tf

    shard = tmp / "bad.tfrecords"
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for i in range(NUM_CLASSES):
            writer.write(_example([int(c in (i, (i + 1) % NUM_CLASSES)) for c in range(NUM_CLASSES)]))

    def edit(m):
        m["val"] = [str(shard)]
        m.pop("sha256", None), m.pop("counts", None)

    manifest = _manifest(tmp, prepared, edit)
    return _cli(["--manifest", manifest, "--output", str(tmp / "out"), *TRAIN]), tmp / "out" / "base_model" / "r1"


def run_id_in_use(tmp, prepared, demo):
    from utilities.run import lease

    out = tmp / "out"
    held = lease.acquire(str(out / "base_model" / "r1"), "advice")  # a live holder: this very process

    def run() -> int:
        try:
            return _cli(["--manifest", str(prepared.manifest_path), "--output", str(out), *TRAIN])()
        finally:
            held.release()

    return run, out / "base_model" / "r1" / "metrics.json"


def dot_dot_name(tmp, prepared, demo):
    return _cli(["--manifest", str(prepared.manifest_path), "--output", str(tmp / "out"), "-n", "..", *TRAIN]), None


def run_id_latest_json(tmp, prepared, demo):
    argv = ["--manifest", str(prepared.manifest_path), "--output", str(tmp / "out"), *TRAIN, "--run-id", "latest.json"]
    return _cli(argv), tmp / "out" / "base_model" / "latest.json"


def evaluate_output_is_a_file(tmp, prepared, demo):
    from tools import evaluate

    (tmp / "taken").write_text("mine")
    argv = ["--model", str(tmp / "m.keras"), "--manifest", str(prepared.manifest_path), "--output", str(tmp / "taken")]
    return lambda: evaluate.main(argv), None


def prepare_twice(tmp, prepared, demo):
    from tools import prepare

    argv = ["--input", str(demo), "--out", str(prepared.root), "--image-size", "16", "--seed", "1"]
    return lambda: prepare.main(argv), None


def prepare_latin1_csv(tmp, prepared, demo):
    import shutil

    from tools import prepare
    from utilities.data.schema import METADATA_CSV

    isic = Path(shutil.copytree(demo, tmp / "isic"))
    csv = isic / METADATA_CSV
    csv.write_bytes(csv.read_bytes().replace(b"anterior torso", "antérieur".encode("latin-1"), 1))
    return lambda: prepare.main(["--input", str(isic), "--out", str(tmp / "dv"), "--image-size", "16"]), tmp / "dv"


def prepare_bomb_jpeg(tmp, prepared, demo):
    import shutil

    from tools import prepare

    isic = Path(shutil.copytree(demo, tmp / "isic"))
    _labelled_image(isic).write_bytes(_claim_size(_jpeg(demo), 10_000, 10_000))
    return lambda: prepare.main(["--input", str(isic), "--out", str(tmp / "dv"), "--image-size", "16"]), tmp / "dv"


def vertex_token_in_query(tmp, prepared, demo):
    from tools import vertex_submit

    argv = [
        "--project",
        "my-project",
        "--region",
        "us-central1",
        "--image",
        "dermaid:latest",
        "--bucket",
        "my-bucket",
        "--dvc-tag",
        "dataset_v01",
    ]
    argv += ["--dvc-repo", "https://host/r.git?access_token=tok3n-Zq9", "--dry-run"]
    return lambda: vertex_submit.main(argv), None


def _dvc_pull(tmp: Path, *args: str, **env: str) -> Callable[[], int]:
    def run() -> int:
        clean = {k: v for k, v in os.environ.items() if k not in ("DVC_REPO", "DVC_TAG", "GIT_URL")}
        argv = ["sh", str(ROOT / "dvc_pull.sh"), *args]
        proc = subprocess.run(argv, cwd=tmp, env={**clean, **env}, capture_output=True, text=True, timeout=60)
        sys.stderr.write(proc.stderr)
        return proc.returncode

    return run


def dvc_pull_option_repo(tmp, prepared, demo):
    marker = tmp / "ran"
    return _dvc_pull(tmp, "-r", f"--upload-pack=touch {marker}; git-upload-pack", "-t", "v1"), marker


def dvc_pull_original_git_url(tmp, prepared, demo):
    """The original's run-commands.sh exported GIT_URL (login inside) for dvc_pull.sh; ours reads DVC_REPO."""
    return _dvc_pull(tmp, "-t", "dataset_v01", GIT_URL="https://user:tok3n-Zq9@github.com/org/registry"), None


PROBES = [
    Probe("a teacher .h5 holding a Lambda", lambda_teacher, 2, r"--teacher: model .*evil\.h5 refused: .*Lambda"),
    Probe("an evaluated .h5 holding a Lambda", lambda_evaluated, 2, r"evil\.h5 refused: .*--trust-model-code"),
    Probe("a train shard listed twice", shard_twice, 2, r"is the same shard as train\[0\]"),
    Probe("a train shard also under test", train_shard_in_test, 2, r"in train and test"),
    Probe("a two-hot label in val", two_hot_label, 2, r"shard .*bad\.tfrecords record 0: feature label is not one-hot"),
    Probe("a --run-id held by a live run", run_id_in_use, 2, r"is in use by pid \d+ .*rerun the same command"),
    Probe("-n ..", dot_dot_name, 2, r"--model-name '\.\.' may not start with '\.'"),
    Probe("--run-id latest.json", run_id_latest_json, 2, r"--run-id 'latest\.json' is the name of a file"),
    Probe("tools.evaluate --output naming a file", evaluate_output_is_a_file, 2, r"is a file, not a folder"),
    Probe("prepare into a tagged version", prepare_twice, 2, r"already holds a dataset version"),
    Probe("a Latin-1 metadata CSV", prepare_latin1_csv, 2, r"Metadata\.csv: byte \d+ \(line \d+\) is not UTF-8"),
    Probe("a JPEG claiming 10000×10000", prepare_bomb_jpeg, 2, r"claims 10000×10000 px .* megapixels"),
    Probe("vertex_submit --dvc-repo ?access_token=", vertex_token_in_query, 2, r"must not carry a token"),
    Probe("dvc_pull.sh -r '--upload-pack=CMD'", dvc_pull_option_repo, 2, r"starts with '-'"),
    Probe("dvc_pull.sh with the original's GIT_URL", dvc_pull_original_git_url, 2, r"GIT_URL is not read.*DVC_REPO"),
]


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_probe(probe: Probe, prepared: Prepared, demo_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in prepared.root.rglob("*"))
    run, absent = probe.make(tmp_path, prepared, demo_dir)
    capsys.readouterr()
    try:
        code = run()
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == probe.code, err
    assert lines and re.search(probe.message, lines[-1]), err
    assert "Traceback" not in err and "tok3n-Zq9" not in err, err
    assert absent is None or not absent.exists(), f"{absent} was left behind"
    assert not (tmp_path / "ran").exists(), "the payload ran"
    assert sorted(p.name for p in prepared.root.rglob("*")) == before  # the shared version is untouched
