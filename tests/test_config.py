"""Rules over several fields of the Config (no TensorFlow here)."""

import subprocess
import sys
from pathlib import Path

import pytest

from utilities.run.config import Config
from utilities.run.fields import ConfigError


def _compression(**fields) -> Config:
    return Config().replace(compression=fields)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, False),
        ({"prune": True}, True),
        ({"distill": True}, True),
        ({"quantize": ("dynamic",)}, True),
        ({"target_sparsity": 0.9, "temperature": 2.0}, False),  # settings of a variant, not a variant
    ],
)
def test_compression_is_enabled_by_any_variant(fields, expected):
    assert _compression(**fields).compression.enabled is expected


def test_variants_that_train_need_training_examples():
    everything = _compression(prune=True, distill=True, quantize=("dynamic", "int8"))
    with pytest.raises(ConfigError) as caught:
        everything.check_train_examples(0)
    assert str(caught.value) == "-p, -d, -q int8 need training examples, but the train split is empty"
    with pytest.raises(ConfigError, match=r"^-d need training examples"):
        _compression(distill=True).check_train_examples(0)
    everything.check_train_examples(1)
    _compression(quantize=("dynamic", "float16")).check_train_examples(0)  # no calibration data needed
    Config().check_train_examples(0)


# ---------------------------------------------------------------- names that must stay one new folder


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_name": "."}, "--model-name '.' may not start with '.'"),
        ({"model_name": ".."}, "--model-name '..' may not start with '.'"),
        ({"run_id": "."}, "--run-id '.' may not start with '.'"),
        ({"run_id": ".."}, "--run-id '..' may not start with '.'"),
        ({"run_id": ".latest.json.tmp-0a1b2c"}, "may not start with '.'"),  # the pointer's temporary file
        ({"run_id": "latest.json"}, "--run-id 'latest.json' is the name of a file the job writes"),
        ({"run_id": "LATEST.JSON"}, "base_model/latest.json"),  # one file on a case-insensitive disk
        ({"model_name": "a/b"}, "may use only letters"),
    ],
)
def test_names_that_leave_the_output_folder_or_hit_its_files_are_refused(fields, message):
    with pytest.raises(ConfigError) as caught:
        Config().replace(output=fields)
    assert message in str(caught.value)


def test_names_with_dots_inside_are_fine():
    Config().replace(output={"model_name": "dense.v2", "run_id": "r1.latest.json"})


def test_trust_model_code_goes_with_a_teacher():
    with pytest.raises(ConfigError, match="--trust-model-code applies only to --teacher"):
        _compression(trust_model_code=True)
    _compression(distill=True, teacher="mine.h5", trust_model_code=True)


@pytest.mark.parametrize("run_id", ["latest.json", "..", "."])
def test_a_run_id_that_collides_exits_2_in_one_line_before_any_work(run_id, tmp_path):
    out = subprocess.run(
        [sys.executable, "cli.py", "--run-id", run_id, "--output", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cli.py: error: --run-id") and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even latest.json beside --output
