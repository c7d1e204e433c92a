"""Typed metrics: what metrics.json holds, as frozen dataclasses with one `to_json` and one `from_json`.

    document = RunMetrics.from_json(json.loads(Path("metrics.json").read_text()))
    document.variants["model"].test.balanced_accuracy       # a field, not a string key
    document.to_json()                                      # the dict the file was written from

A run's `RunMetrics` holds its variants' `VariantMetrics` by name; each holds `val` and `test`
`SplitMetrics` (`utilities.evaluation.metrics` plus `utilities.evaluation.analysis`), the artifact's
size and latency and what its compression step recorded, or only an `error`. The producers
(`compute_metrics`, `analyse`, the compression steps) return plain JSON-ready dicts; these classes
take them in (`from_json`) and give them back unchanged (`to_json`): a field marked `optional()` is
left out when None (unless the field it is measured with is there: then it is null), every other field
is written (a None as null), and an unknown key is refused,
so a round trip is exact — metrics.json's bytes do not depend on which side wrote them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, get_args, get_origin

from utilities.data.schema import HEADLINE
from utilities.errors import JobError

_OMIT = "omitted when None"
_WITH = "written, null included, when this field is"
Record = TypeVar("Record", bound="JsonRecord")


class MetricsError(JobError, ValueError):
    """A metrics document that does not have metrics.json's shape (one line: the field and what is wrong)."""


def optional(written_with: str | None = None) -> Any:
    """A field that metrics.json leaves out when it is None (not every variant or split has it) —
    unless `written_with` names a field that is there: measured together, a None is written as null."""
    return dataclasses.field(default=None, metadata={_OMIT: True, _WITH: written_with})


class JsonRecord:
    """`to_json` / `from_json` for the frozen dataclasses below, driven by their type hints."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field]]

    def to_json(self) -> dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_json(cls: type[Record], data: Any) -> Record:
        return _decode(cls, data, cls.__name__)


def _encode(value: Any) -> Any:
    if isinstance(value, JsonRecord):

        def written(f: dataclasses.Field) -> bool:
            if not f.metadata.get(_OMIT) or getattr(value, f.name) is not None:
                return True
            return f.metadata[_WITH] is not None and getattr(value, f.metadata[_WITH]) is not None

        return {
            f.name: _encode(getattr(value, f.name))
            for f in dataclasses.fields(value)  # type: ignore[arg-type]
            if written(f)
        }
    if isinstance(value, Mapping):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_encode(item) for item in value]
    return value


def _decode(kind: Any, data: Any, where: str) -> Any:
    """`data` (parsed JSON) as `kind`: records and containers rebuilt, scalars passed through as parsed."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _decode(kind, data, where)
    if isinstance(kind, type) and issubclass(kind, JsonRecord):
        if isinstance(data, kind):  # already decoded (`with_values` given records)
            return data
        if not isinstance(data, Mapping):
            raise MetricsError(f"{where} must be an object, not {type(data).__name__}")
        hints = typing.get_type_hints(kind)
        fields = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise MetricsError(f"{where} has unknown field(s) {', '.join(unknown)}")
        missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING]
        if missing:
            raise MetricsError(f"{where} lacks field(s) {', '.join(missing)}")
        return kind(**{name: _decode(hints[name], value, f"{where}.{name}") for name, value in data.items()})
    if origin in (dict, Mapping) or origin is typing.Mapping:
        if not isinstance(data, Mapping):
            raise MetricsError(f"{where} must be an object, not {type(data).__name__}")
        return {key: _decode(args[1], value, f"{where}.{key}") for key, value in data.items()}
    if origin in (tuple, list):
        if not isinstance(data, list | tuple):
            raise MetricsError(f"{where} must be a list, not {type(data).__name__}")
        item = args[0] if args else Any
        return (tuple if origin is tuple else list)(_decode(item, v, f"{where}[{i}]") for i, v in enumerate(data))
    return data


Interval = tuple[float, float]  # (low, high)
ByClass = Mapping[str, float]  # class name → value, in CLASS_NAMES order


@dataclasses.dataclass(frozen=True)
class Intervals(JsonRecord):
    """Stratified bootstrap percentile intervals (`analysis.bootstrap_ci`)."""

    balanced_accuracy: Interval
    macro_auc: Interval | None  # None: no class has both positives and negatives
    resamples: int
    level: float


@dataclasses.dataclass(frozen=True)
class Reliability(JsonRecord):
    """Reliability diagram of top-1 confidence (`analysis.reliability`); None in empty bins."""

    bins: int
    ece: float
    confidence: list[float | None]
    accuracy: list[float | None]
    count: list[int]


@dataclasses.dataclass(frozen=True)
class Triage(JsonRecord):
    """One triage task (melanoma or malignant vs the rest); per target specificity ("0.80", "0.95")."""

    positives: int
    negatives: int
    auc: float | None
    sensitivity_at_specificity: Mapping[str, float | None]
    threshold_at_specificity: Mapping[str, float | None]


@dataclasses.dataclass(frozen=True)
class GroupMetrics(JsonRecord):
    """One subgroup's numbers (`analysis.subgroups`); a class without support has recall None."""

    n: int
    balanced_accuracy: float | None
    per_class_recall: Mapping[str, float | None]
    support: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class SplitMetrics(JsonRecord):
    """One split's metrics (`metrics.compute_metrics`) and analysis (`analysis.analyse`)."""

    n: int
    top_class: str  # the most often predicted class, and its share of the predictions
    top_class_share: float
    accuracy: float
    balanced_accuracy: float  # HEADLINE
    macro_f1: float
    macro_auc: float | None
    per_class_recall: ByClass
    per_class_precision: ByClass
    support: Mapping[str, int]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted
    # Always written by this job; optional so that a metrics.json of an earlier version still reads.
    per_class_auc: Mapping[str, float | None] | None = optional()  # None inside: a class lacks positives/negatives
    ece: float | None = optional()
    reliability: Reliability | None = optional()
    triage: Mapping[str, Triage] | None = optional()  # "melanoma", "malignant"
    ci95: Intervals | None = optional()  # none with --bootstrap 0
    subgroups: Mapping[str, Mapping[str, GroupMetrics]] | None = optional()  # attribute → group → metrics

    def headline(self) -> float:
        return getattr(self, HEADLINE)

    def interval(self, name: str) -> Interval | None:
        """The 95 % interval of `name` ("balanced_accuracy", "macro_auc"), None without one."""
        return getattr(self.ci95, name) if self.ci95 is not None else None


@dataclasses.dataclass(frozen=True)
class Latency(JsonRecord):
    median: float  # ms, batch 1
    p90: float


@dataclasses.dataclass(frozen=True)
class StudentTraining(JsonRecord):
    """How the student was trained (`distillation.train_student`'s summary)."""

    path: str  # "distiller" (one replica) or "replica_loop"
    resumed_from_epoch: int
    epochs_run: int
    best_val_balanced_accuracy: float | None


@dataclasses.dataclass(frozen=True)
class Calibration(JsonRecord):
    """Temperature scaling fitted on val; the split metrics before it (after it: the variant's own)."""

    temperature: float
    ece_before: Mapping[str, float]  # split → ECE
    ece_after: Mapping[str, float]
    balanced_accuracy_before: Mapping[str, float]
    macro_auc_before: Mapping[str, float | None]
    reliability_before: Reliability  # test


@dataclasses.dataclass(frozen=True)
class ImageOnly(JsonRecord):
    """The model with every metadata field unknown (all zeros, as a missing CSV value): what metadata adds."""

    balanced_accuracy: float
    ci95: Interval | None  # stratified bootstrap, as SplitMetrics.ci95; None with --bootstrap 0


@dataclasses.dataclass(frozen=True)
class VariantMetrics(JsonRecord):
    """One variant's entry in metrics.json: its metrics, artifact, what its step recorded — or only `error`."""

    val: SplitMetrics | None = optional()
    test: SplitMetrics | None = optional()
    agreement: float | None = optional()  # top-1 agreement with the float model on val (compressed variants)
    size_bytes: int | None = optional()
    gzip_bytes: int | None = optional()
    latency_ms: Latency | None = optional()
    params: int | None = optional(written_with="latency_ms")  # None: unknown (a TFLite file scored alone)
    batchnorm_batches: int | None = optional()  # Keras variants: batches that re-estimated BatchNorm
    sparsity: Mapping[str, float] | None = optional()  # pruned: layer → fraction of zeros
    sparsity_overall: float | None = optional()
    teacher: str | None = optional()  # student: "model" or the --teacher path
    training: StudentTraining | None = optional()
    source: str | None = optional()  # TFLite: the Keras variant converted, and how
    mode: str | None = optional()
    gzip_ratio_vs_float: float | None = optional()
    calibration: Calibration | None = optional()
    image_only: Mapping[str, ImageOnly] | None = optional()  # the model: split → scored with metadata unknown
    error: str | None = optional()  # "<Type>: <one line>" of a step that failed; then nothing else

    def splits(self) -> dict[str, SplitMetrics]:
        """The splits it was scored on ("val", "test"), by name; none for a failed variant."""
        return {name: m for name, m in (("val", self.val), ("test", self.test)) if m is not None}

    def with_values(self, **values: Any) -> VariantMetrics:
        """A copy with these fields set; JSON-ready dicts (a step's record) are decoded into their types."""
        hints = typing.get_type_hints(VariantMetrics)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise MetricsError(f"a variant has no field(s) {', '.join(unknown)}")
        decoded = {k: v if not isinstance(v, Mapping) else _decode(hints[k], v, k) for k, v in values.items()}
        return dataclasses.replace(self, **decoded)


@dataclasses.dataclass(frozen=True)
class RunMetrics(JsonRecord):
    """metrics.json: the headline metric's name and each variant's metrics by name ("model" first)."""

    variants: Mapping[str, VariantMetrics]
    headline: str = HEADLINE

    def scored(self) -> dict[str, VariantMetrics]:
        """The variants with metrics of at least one split (not those whose step failed)."""
        return {name: v for name, v in self.variants.items() if v.splits()}
