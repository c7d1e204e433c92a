"""The record schema shared by every producer and reader of shards (DESIGN §2.1).

One `tf.train.Example` per image:
  image    bytes, 1 value: raw uint8 pixels H×W×3 row-major, or JPEG/PNG bytes
  metadata int64 list, 28: multi-hot, 18 age bins + 8 sites + sex_female, sex_male, in the original
           DermAID column order (pandas get_dummies on text: ages sorted as strings, "45.0" < "5.0")
  label    int64 list, 8: one-hot in CLASS_NAMES order
  image_name bytes, optional, 1 value: the ISIC image id (tools.prepare writes it; the original's records
           have none, and evaluation then names a row `split/shard/index`)
Also the ISIC 2019 folder layout (image folder, the two CSVs and their columns) that tools.prepare reads
and tools.demo_data writes, and the headline metric's name. This module has no TensorFlow import so tools and `--help` stay fast.
"""

from __future__ import annotations

import math

CLASS_NAMES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
# The original preprocessing encoded age with `get_dummies` on *strings* ("0.0", "5.0", …), so its 18
# columns are in text order: 0, 10, 15, …, 45, 5, 50, …, 85. Records must keep that order to stay
# interchangeable with the original's (a model reading the other order would see the wrong ages).
AGE_BINS: tuple[int, ...] = tuple(sorted(range(0, 90, 5), key=lambda age: f"{float(age)}"))
SITES: tuple[str, ...] = (
    "anterior torso",
    "head/neck",
    "lateral torso",
    "lower extremity",
    "oral/genital",
    "palms/soles",
    "posterior torso",
    "upper extremity",
)
SEXES: tuple[str, ...] = ("female", "male")
METADATA_NAMES: tuple[str, ...] = (
    tuple(f"age_approx_{float(a)}" for a in AGE_BINS)
    + tuple(f"anatom_site_general_{s}" for s in SITES)
    + tuple(f"sex_{s}" for s in SEXES)
)
NUM_CLASSES = len(CLASS_NAMES)
# Triage: melanoma, and the malignant lesions (AK counts as pre-malignant but needs treatment too), vs the rest.
MELANOMA_CLASSES: tuple[str, ...] = ("MEL",)
MALIGNANT_CLASSES: tuple[str, ...] = ("MEL", "BCC", "SCC", "AK")
SPECIFICITIES: tuple[float, ...] = (0.80, 0.95)  # triage operating points: thresholds reported, --operating-point
# The ISIC challenge's metric (mean recall over the classes present): what a run is judged by — the Keras
# metric's name (early stopping on "val_" + it), metrics.json's "headline", the hyperparameter-tuning tag.
HEADLINE = "balanced_accuracy"
METADATA_SIZE = len(METADATA_NAMES)  # 28
DEFAULT_IMAGE_SIZE = 256
SPLITS: tuple[str, ...] = ("train", "val", "test")
# log(p) of a predicted probability is taken as log(max(p, PROBABILITY_FLOOR)) (temperature scaling).
PROBABILITY_FLOOR = 1e-12


def encode_metadata(age: float | None, site: str | None, sex: str | None) -> list[int]:
    """Multi-hot vector of length 28; a missing (None/empty/NaN) value is all zeros in its group.

    Raises ValueError for an age outside 0–85 that is not a multiple of 5, or an unknown site/sex.
    """
    vec = [0] * METADATA_SIZE
    if age is not None and not (isinstance(age, float) and math.isnan(age)):
        if age not in AGE_BINS:
            raise ValueError(f"age {age!r} is not one of the bins 0..85 step 5")
        vec[AGE_BINS.index(int(age))] = 1
    if site:
        if site not in SITES:
            raise ValueError(f"unknown anatomical site {site!r}; expected one of {', '.join(SITES)}")
        vec[len(AGE_BINS) + SITES.index(site)] = 1
    if sex:
        if sex not in SEXES:
            raise ValueError(f"unknown sex {sex!r}; expected one of {', '.join(SEXES)}")
        vec[len(AGE_BINS) + len(SITES) + SEXES.index(sex)] = 1
    return vec


def one_hot(class_index: int) -> list[int]:
    vec = [0] * NUM_CLASSES
    vec[class_index] = 1
    return vec


# The ISIC 2019 folder layout: what tools.prepare reads and tools.demo_data writes (images as
# IMAGE_DIR/{image}.jpg, one row per image in each CSV).
IMAGE_DIR = "ISIC_2019_Training_Input"
GROUND_TRUTH_CSV = "ISIC_2019_Training_GroundTruth.csv"
METADATA_CSV = "ISIC_2019_Training_Metadata.csv"
GROUND_TRUTH_COLUMNS: tuple[str, ...] = ("image", *CLASS_NAMES, "UNK")
METADATA_COLUMNS: tuple[str, ...] = ("image", "age_approx", "anatom_site_general", "lesion_id", "sex")
