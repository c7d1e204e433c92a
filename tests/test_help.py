"""Every command's --help: defaults shown once (none for switches or unset values), never a token from
the environment, and bench.all's without loading TensorFlow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "SECRETTOKEN123"


def _help(module: str, *python_flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_REPO": f"https://user:{TOKEN}@host/org/registry.git"}
    argv = [sys.executable, *python_flags, "-m", module, "--help"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize(
    ("module", "shown"),
    [
        ("cli", "(default: cosine)"),
        ("tools.evaluate", "(default: 1000)"),
        ("tools.prepare", "(default: 500)"),
        ("tools.registry", None),
        ("tools.demo_data", None),
        ("tools.vertex_submit", "(default: n1-standard-8)"),
        ("bench.all", "(default: 640)"),
    ],
)
def test_help_shows_defaults_once_and_no_token(module, shown):
    out = " ".join(_help(module).stdout.split())  # argparse wraps lines
    assert shown is None or shown in out
    for noise in ("(default: None)", "(default: False)", "(default: True)", "(default: [])", TOKEN):
        assert noise not in out, noise
    assert all(out.count(f"(default: {d}") <= 1 for d in ("$DVC_REPO", "dermaid-TAG"))


def test_bench_all_help_loads_no_tensorflow():
    imported = _help("bench.all", "-X", "importtime").stderr
    assert not re.search(r"\|\s+(tensorflow|bench\.common)$", imported, re.MULTILINE), "TensorFlow imported"
