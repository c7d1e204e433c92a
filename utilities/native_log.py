"""TensorFlow's C++ start-up lines off stderr (unless -v or TF_CPP_MIN_LOG_LEVEL is the user's).

    with native_log.quiet(verbose=args.verbose):
        import training                 # imports TensorFlow
        native_log.find_devices()       # CUDA is probed here: "failed call to cuInit" on every CPU machine

Those lines are written by native code before absl's logging is set up, so TF_CPP_MIN_LOG_LEVEL (set
in utilities/__init__.py) cannot hide them: file descriptor 2 is pointed at a temporary file for the
block, then every captured line that is not known start-up noise is written back (a real error stays).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from utilities import TF_LOG_LEVEL_CHOSEN

# What every CPU-only start prints: absl's pre-init banner, the CUDA stub and driver probe, the CPU
# feature note and its "rebuild TensorFlow" advice, and (on CPUs oneDNN optimises for) its notice.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\)|cudart_stub\.cc|cuda_platform\.cc.*cuInit|"
    r"port\.cc.*oneDNN custom operations are on|"
    r"cuda_(?:dnn|fft|blas)\.cc.*(?:Unable to register|factory)|cpu_feature_guard\.cc|"
    r"^To enable the following instructions|computation_placer\.cc.*already registered"
)


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Inside: native start-up noise captured and dropped; everything else on stderr, in order, at the end."""
    if verbose or TF_LOG_LEVEL_CHOSEN:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line for line in captured.read().decode(errors="replace").splitlines(True) if not NOISE.search(line)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def find_devices() -> None:
    """Probe the physical devices once (CUDA's driver probe logs here); configuring them stays possible."""
    import tensorflow as tf

    tf.config.list_physical_devices("GPU")
