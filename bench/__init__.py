"""Benchmarks of the training job: each `python -m bench.NAME` prints a table and writes JSON.

    .venv/bin/python -m bench.all                  # every benchmark, ~5 min on 2 CPU cores (all.json)
    .venv/bin/python -m bench.pipeline --images 640 --image-size 64

Results go to `bench/results/NAME.json` (each benchmark's `--out PATH`; bench.all's `--results DIR`);
BENCHMARKS.md records the latest numbers.
Importing this package selects Keras 2 (through `utilities`) before TensorFlow is first used.
"""

from pathlib import Path

import utilities  # noqa: F401  (sets TF_USE_LEGACY_KERAS=1 before TensorFlow loads Keras)

# Shared by the benchmarks (bench/common.py) and read by bench.all's --help, which loads no TensorFlow.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEMO_IMAGES = 640  # synthetic ISIC-layout images (~450 train / ~95 val / ~95 test)
DEMO_SIZE = 64  # px, stored raw in the shards and fed to the model
