"""Records interchangeable with the original DermAID's: its metadata columns, built its way with pandas.

The original preprocessing (src/02_preprocess_data) dropped `lesion_id`, then `fillna('')`,
`astype(str)` and `get_dummies(columns=[age_approx, anatom_site_general, sex], drop_first=True)`:
missing values became the all-zero baseline of each group and ages sorted as text ("45.0" < "5.0").
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from utilities.data.isic import read_metadata
from utilities.data.schema import (
    AGE_BINS,
    CLASS_NAMES,
    GROUND_TRUTH_CSV,
    METADATA_COLUMNS,
    METADATA_CSV,
    METADATA_NAMES,
    SITES,
)

ORIGINAL_METADATA_COLUMNS = [
    *(f"age_approx_{age}" for age in ("0.0", "10.0", "15.0", "20.0", "25.0", "30.0", "35.0", "40.0", "45.0")),
    *(f"age_approx_{age}" for age in ("5.0", "50.0", "55.0", "60.0", "65.0", "70.0", "75.0", "80.0", "85.0")),
    *(f"anatom_site_general_{site}" for site in SITES),
    "sex_female",
    "sex_male",
]  # as listed in the original's src/04_classify_n_upload/mock_app_prediction.py


def original_encoding(metadata_csv: Path, isic_categories: bool = False) -> pd.DataFrame:
    """The original's metadata vectors, indexed by image id, columns in its order.

    `isic_categories`: every value the full ISIC 2019 CSV holds is a category (as when the original
    ran on it), also where this small CSV lacks some; pandas still sorts them as text.
    """
    frame = pd.read_csv(metadata_csv).drop(columns=["lesion_id"]).fillna("").astype(str)
    if isic_categories:
        full = {
            "age_approx": ["", *(str(float(age)) for age in range(0, 90, 5))],
            "anatom_site_general": ["", *SITES],
            "sex": ["", "female", "male"],
        }
        for column, values in full.items():
            frame[column] = pd.Categorical(frame[column], categories=sorted(values))
    dummies = pd.get_dummies(
        frame, columns=["age_approx", "anatom_site_general", "sex"], drop_first=True, dtype=int
    ).set_index("image")
    return dummies


def test_schema_is_the_originals_column_order():
    assert list(METADATA_NAMES) == ORIGINAL_METADATA_COLUMNS
    assert AGE_BINS[:10] == (0, 10, 15, 20, 25, 30, 35, 40, 45, 5)


def test_prepare_encodes_every_row_as_the_original_did(tmp_path):
    rng = np.random.default_rng(0)
    ages = [*(str(float(a)) for a in range(0, 90, 5)), ""]
    sites, sexes = [*SITES, ""], ["female", "male", ""]
    rows = [
        {
            "image": f"ISIC_{i:07d}",
            "age_approx": ages[i % len(ages)],  # every bin and a missing value
            "anatom_site_general": sites[i % len(sites)] if i < 60 else rng.choice(sites),
            "lesion_id": "" if i % 7 == 0 else f"HAM_{i // 2:07d}",
            "sex": sexes[i % len(sexes)] if i < 60 else rng.choice(sexes),
        }
        for i in range(200)
    ]
    path = tmp_path / METADATA_CSV
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(METADATA_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)

    original = original_encoding(path)
    assert list(original.columns) == ORIGINAL_METADATA_COLUMNS  # the premise: 28 columns, text order
    assert original.equals(original_encoding(path, isic_categories=True))  # what the end-to-end test relies on
    ours = read_metadata(path, {row["image"] for row in rows})
    for image, expected in original.iterrows():
        assert ours[image][0] == tuple(expected), image


def test_prepared_records_hold_the_originals_vectors(demo_dir, prepared):
    """End to end: the records prepare wrote carry, image for image, the vectors the original would have."""
    original = original_encoding(demo_dir / METADATA_CSV, isic_categories=True)
    labels = pd.read_csv(demo_dir / GROUND_TRUTH_CSV).set_index("image")
    kept = labels[labels["UNK"] == 0].index  # the original dropped the UNK column: those images are not records
    expected = Counter(
        (tuple(original.loc[image]), int(np.argmax(labels.loc[image, list(CLASS_NAMES)]))) for image in kept
    )
    features = {
        "metadata": tf.io.FixedLenFeature([28], tf.int64),
        "label": tf.io.FixedLenFeature([8], tf.int64),
    }
    shards = [str(p) for p in sorted(prepared.root.glob("*/*.tfrecords"))]
    found = Counter()
    for record in tf.data.TFRecordDataset(shards):
        parsed = tf.io.parse_single_example(record, features)
        found[(tuple(parsed["metadata"].numpy().tolist()), int(np.argmax(parsed["label"])))] += 1
    assert sum(found.values()) == len(kept) and found == expected


def test_an_original_pickle_of_gs_shards_is_downloaded_once(gcs_emulator, prepared, tmp_path, caplog):
    """The original's three-key pickle has no sha256: the object's generation + crc32c key the cache."""
    import logging
    import pickle

    from utilities import storage
    from utilities.data import pipeline as data

    bucket = gcs_emulator.make_bucket("original-bucket")
    pickled = {}
    for split in ("train", "val", "test"):
        pickled[split] = []
        for path in sorted((prepared.root / split).glob("*.tfrecords")):
            uri = f"gs://{bucket}/tf_records/{split}/{path.name}"
            storage.upload_file(path, uri)
            pickled[split].append(uri)
    (tmp_path / "versioned_paths.pickle").write_bytes(pickle.dumps(pickled))  # exactly the original's form
    shards = sum(len(uris) for uris in pickled.values())

    def fetch() -> tuple[dict[str, list[str]], str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="utilities.data.pipeline"):
            local = data.fetch_shards(data.load_manifest(tmp_path / "versioned_paths.pickle"), tmp_path / "cache")
        return local, caplog.text

    first, log = fetch()
    assert f"remote shards: {shards} downloaded, 0 found in the cache" in log
    second, log = fetch()
    assert f"remote shards: 0 downloaded, {shards} found in the cache" in log
    assert second == first
    for split, uris in pickled.items():
        for uri, local in zip(uris, second[split], strict=True):
            assert Path(local).read_bytes() == storage.read_bytes(uri)

    # A shard replaced in the bucket (new generation) is fetched again; a damaged cached copy too.
    storage.write_bytes(pickled["val"][0], (prepared.root / "val" / "0000.tfrecords").read_bytes())
    Path(second["test"][0]).write_bytes(b"damaged")
    third, log = fetch()
    assert f"remote shards: 2 downloaded, {shards - 2} found in the cache" in log
    assert Path(third["test"][0]).read_bytes() == storage.read_bytes(pickled["test"][0])


@pytest.mark.slow
def test_a_gs_manifest_trains_and_its_lineage_hashes_the_bytes_read(gcs_emulator, prepared, tmp_path):
    """`--manifest gs://…` (the original uploaded its pickle to the bucket root): read once, hashed as read."""
    import hashlib
    import json

    from tests.test_training import TINY, only_run, run_cli
    from utilities import storage

    bucket = gcs_emulator.make_bucket("manifest-bucket")
    pickled = prepared.manifest_path.read_bytes()
    storage.write_bytes(f"gs://{bucket}/versioned_paths.pickle", pickled)
    out = tmp_path / "out"
    args = ["--manifest", f"gs://{bucket}/versioned_paths.pickle", "--output", str(out), "-n", "gs", "-e", "1"]
    result = run_cli([*args, *TINY], tmp_path, {"STORAGE_EMULATOR_HOST": gcs_emulator.host})
    assert result.returncode == 0, result.stderr[-3000:]
    lineage = json.loads((only_run(out, "gs") / "run.json").read_text())
    assert lineage["data"]["manifest_sha256"] == hashlib.sha256(pickled).hexdigest()
    assert lineage["data"]["manifest"] == f"gs://{bucket}/versioned_paths.pickle"


def _readme_recipe() -> str:
    """The python block of README's migration section: what an original client changes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Migrating from the original container", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```python\n")[1:]
    assert len(blocks) == 1, "one recipe block in the migration section"
    return blocks[0].split("```", 1)[0]


def test_the_readme_recipe_for_an_original_client_runs_on_a_model_of_this_job(tmp_path):
    """Original clients fed pixels / 255: multiplied back they get this model's answer, and Grad-CAM's layer
    (nested in "densenet121") gives a class-activation map through the model's own image branch."""
    from utilities.model import build_model, save_model
    from utilities.run.config import ModelConfig

    model = build_model(ModelConfig(weights="none", fcnn_nodes=16), 64)  # 64 px: a 2×2 last feature map
    path = save_model(model, tmp_path)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 64, 64, 3)).astype("float32")
    metadata = np.eye(28, dtype="float32")[[0, 12, 27]]
    scope = {"pixels_0_1": pixels / 255.0, "metadata": metadata}
    exec(_readme_recipe().replace('"RUN/model"', repr(str(path))), scope)  # the README's own text

    raw = model({"image": pixels, "metadata": metadata}).numpy()
    np.testing.assert_allclose(scope["probs"], raw, atol=1e-5)
    unscaled = model({"image": pixels / 255.0, "metadata": metadata}).numpy()
    assert np.abs(unscaled - raw).max() > 1e-3  # feeding 0..1 as before gives other answers, silently
    # The recipe's image-branch logits are the model's: fused with the metadata branch they give its output.
    loaded = scope["model"]
    meta_logits = loaded.get_layer("metadata_logits")(loaded.get_layer("metadata_dense")(metadata))
    fused = loaded.get_layer("fusion")([scope["logits"], meta_logits]).numpy()
    np.testing.assert_allclose(fused, raw, atol=1e-5)
    cam = scope["cam"].numpy()
    assert cam.shape == (3, 2, 2) and np.isfinite(cam).all() and np.abs(scope["grads"].numpy()).max() > 0
