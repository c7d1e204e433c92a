"""TensorFlow's C++ start-up lines (absl's pre-init banner, the CUDA probe on a CPU machine) are dropped
from every command's stderr; a real line written in the same block stays; -v keeps everything.

    .venv/bin/python -m pytest tests/test_native_log.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from utilities.native_log import NOISE

ROOT = Path(__file__).resolve().parent.parent
# As a user's shell: no TF_CPP_MIN_LOG_LEVEL of the test session's.
USER_ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
CUDA = "E0000 00:00:1 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"


def _block(verbose: bool) -> subprocess.CompletedProcess:
    """Native-level writes to fd 2 inside `quiet`, as TensorFlow's C++ code makes them."""
    code = (
        "import os, sys\n"
        "from utilities import native_log\n"
        f"with native_log.quiet(verbose={verbose}):\n"
        f"    os.write(2, {BANNER!r}.encode())\n"
        "    os.write(2, b'a real error\\n')\n"
        f"    os.write(2, {CUDA!r}.encode())\n"
        "print('after', file=sys.stderr)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=USER_ENV, capture_output=True, text=True, timeout=60
    )


def test_quiet_drops_the_start_up_lines_and_keeps_the_rest_in_order():
    assert _block(verbose=False).stderr == "a real error\nafter\n"
    assert _block(verbose=True).stderr == f"{BANNER}a real error\n{CUDA}after\n"


def test_tools_prepare_starts_quietly_and_verbose_keeps_tensorflows_lines(demo_dir, tmp_path):
    def prepare(out: str, *extra: str) -> str:
        argv = [sys.executable, "-m", "tools.prepare", "--input", str(demo_dir), "--out", str(tmp_path / out)]
        argv += ["--image-size", "32", "--limit", "120", *extra]
        done = subprocess.run(argv, cwd=ROOT, env=USER_ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    quiet = prepare("quiet")
    assert not [line for line in quiet.splitlines() if NOISE.search(line)], quiet
    assert "I0000" not in quiet and "E0000" not in quiet
    # This CPU machine's TensorFlow prints them (the CUDA stub at least): -v shows them again.
    assert any(NOISE.search(line) for line in prepare("verbose", "-v").splitlines())
