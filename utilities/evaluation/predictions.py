"""Per-image predictions in the ISIC challenge's submission layout, so its own scorer reads them.

    write_predictions(run_dir / "predictions", result.variants, datasets.identities)
    # predictions/model_val.csv, model_test.csv, pruned_val.csv, …, truth_val.csv, truth_test.csv

Each file: a header `image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC`, then one row per image in record order:
its name (the record's ISIC id, else `split/shard/index`) and the class probabilities (`%.9g`: a
float32 read back is the same float32). The truth files hold the one-hot labels in the same layout
(ISIC 2019's ground-truth CSV), so `isic-challenge-score classification truth_test.csv model_test.csv`
scores a variant. No pandas and no TensorFlow here.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from utilities.data.records import Identities
from utilities.data.schema import CLASS_NAMES
from utilities.evaluation.variants import VariantResult

SPLITS = ("val", "test")


def write_csv(path: Path, names: Sequence[str], values: np.ndarray) -> Path:
    """`image` + one column per class; `values` (N, 8) probabilities or one-hot labels."""
    if len(names) != len(values):
        raise ValueError(f"{path.name}: {len(names)} image names for {len(values)} rows")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", *CLASS_NAMES])
        for name, row in zip(names, np.asarray(values, dtype=np.float64), strict=True):
            writer.writerow([name, *(f"{v:.9g}" for v in row)])
    return path


def row_names(split: str, count: int, who: Identities | None) -> tuple[str, ...]:
    """The records' names, or `split/index` when the identities were not read."""
    return who.names if who is not None else tuple(f"{split}/{i}" for i in range(count))


def write_predictions(
    folder: Path, variants: Mapping[str, VariantResult], identities: Mapping[str, Identities] | None
) -> list[Path]:
    """`{variant}_{split}.csv` for every evaluated variant and `truth_{split}.csv`; returns the paths."""
    written: list[Path] = []
    truth_done: set[str] = set()
    for variant, result in variants.items():
        for split in SPLITS:
            probs = result.probabilities.get(split)
            if probs is None:  # a variant that failed has no predictions
                continue
            names = row_names(split, len(probs), (identities or {}).get(split))
            written.append(write_csv(folder / f"{variant}_{split}.csv", names, probs))
            if split not in truth_done:
                onehot = np.eye(len(CLASS_NAMES))[result.labels[split]]
                written.append(write_csv(folder / f"truth_{split}.csv", names, onehot))
                truth_done.add(split)
    return written
