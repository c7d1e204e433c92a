"""Benchmarks of the training job: each `python -m bench.NAME` prints a table and writes JSON.

    .venv/bin/python -m bench.all                  # every benchmark, ~5-10 min on 2 CPU cores
    .venv/bin/python -m bench.pipeline --images 640 --image-size 64

Results go to `bench/results/NAME.json` (or `--out PATH`); BENCHMARKS.md records the latest numbers.
Importing this package selects Keras 2 (through `utilities`) before TensorFlow is first used.
"""

import utilities  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads Keras)
