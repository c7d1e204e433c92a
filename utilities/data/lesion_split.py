"""Lesion groups chosen and split: train/val/test stratified by class and grouped by lesion (a lesion never
spans two splits), and --limit's subset of whole lesions; deterministic for a seed.

    splits = split_records(records, seed=0)       # {"train": [Record], "val": [...], "test": [...]}
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable

from utilities.data.isic import PrepareError, Record
from utilities.data.schema import CLASS_NAMES, SPLITS

_MIN_GROUPS = len(SPLITS)  # a class needs one lesion per split
Groups = list[list[Record]]  # lesion groups: the records of one lesion each


def _groups_by_class(records: Iterable[Record]) -> dict[int, Groups]:
    """Lesion groups per class, in a stable order. A group's class is its most frequent label."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.group].append(record)
    by_class: dict[int, Groups] = defaultdict(list)
    for key in sorted(groups):
        labels = Counter(r.label for r in groups[key])
        by_class[min(labels, key=lambda c: (-labels[c], c))].append(groups[key])
    return by_class


def _take(groups: Groups, target: float, keep: int) -> tuple[Groups, Groups]:
    """(taken, rest): groups in order, skipping any that overshoot ~target images; ≥ 1 taken; ≥ keep left."""
    taken: Groups = []
    rest: Groups = []
    count = 0
    for i, group in enumerate(groups):
        can_spare = len(rest) + len(groups) - i - 1 >= keep
        if can_spare and (not taken or count + len(group) <= target + 0.5):
            taken.append(group)
            count += len(group)
        else:
            rest.append(group)
    return taken, rest


def _fill(groups: Groups, budget: float) -> tuple[Groups, Groups]:
    """(taken, rest): groups in order that still fit in `budget` images, skipping those that do not."""
    taken: Groups = []
    rest: Groups = []
    for group in groups:
        if len(group) <= budget:
            taken.append(group)
            budget -= len(group)
        else:
            rest.append(group)
    return taken, rest


def limit_records(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    """At most `limit` records, as whole lesion groups: each class its share (≥ 3 groups), then fill up."""
    if limit is None or limit >= len(records):
        return records
    picked: Groups = []
    rest: Groups = []
    for label, groups in sorted(_groups_by_class(records).items()):
        groups = list(groups)
        random.Random(f"{seed}:limit:{label}").shuffle(groups)
        share = limit * sum(map(len, groups)) / len(records)
        mine = groups[:_MIN_GROUPS]
        more, left = _fill(groups[_MIN_GROUPS:], share - sum(map(len, mine)))
        picked += mine + more
        rest += left
    used = sum(map(len, picked))
    if used > limit:
        raise PrepareError(
            f"--limit {limit} is too small: {_MIN_GROUPS} lesion groups of every class take {used} images"
        )
    random.Random(f"{seed}:limit:fill").shuffle(rest)
    picked += _fill(rest, limit - used)[0]
    return sorted((r for g in picked for r in g), key=lambda r: r.image)


def split_records(
    records: list[Record], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[Record]]:
    """Stratified by class, grouped by lesion; every class in every split. Each split is shuffled (seeded)."""
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for label, groups in sorted(_groups_by_class(records).items()):
        if len(groups) < _MIN_GROUPS:
            raise PrepareError(
                f"class {CLASS_NAMES[label]} has only {len(groups)} lesion group(s); at least {_MIN_GROUPS} are needed "
                "to appear in train, val and test"
            )
        groups = list(groups)
        random.Random(f"{seed}:split:{label}").shuffle(groups)
        images = sum(map(len, groups))
        test, rest = _take(groups, test_fraction * images, keep=2)  # keep one group each for val and train
        val, train = _take(rest, val_fraction * images, keep=1)
        for split, part in (("test", test), ("val", val), ("train", train)):
            splits[split] += [r for g in part for r in g]
    for split, part in splits.items():
        part.sort(key=lambda r: r.image)
        random.Random(f"{seed}:order:{split}").shuffle(part)  # mixes classes within every shard
    return splits
