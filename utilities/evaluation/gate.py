"""The release gate: whether a finished run may become `latest.json`, from its metrics alone.

    gate = parse("test.balanced_accuracy.ci95_low >= 0.70 and int8.agreement >= 0.98")
    verdict = gate.judge(metrics)                 # a RunMetrics; verdict.passed, verdict.reasons

The grammar is small and closed — comparisons of a metric with a number, joined by `and` / `or`,
grouped by parentheses; nothing is evaluated as Python:

    gate    := clause (("and" | "or") clause)*          ("and" binds tighter than "or")
    clause  := "(" gate ")" | field OP number           OP: >= > <= < == !=
    field   := [variant "."] split "." metric [".ci95_low" | ".ci95_high"]
             | variant "." ("agreement" | "size_bytes" | "gzip_bytes" | "params" | "gzip_ratio_vs_float"
                            | "sparsity_overall" | "latency_ms.median" | "latency_ms.p90")

`split` is val or test; `metric` a `SplitMetrics` number (balanced_accuracy, accuracy, macro_f1,
macro_auc, ece, top_class_share); the variant is "model" when left out, and `int8` stands for
`model_int8` when there is no variant called `int8`. A field the run did not produce (a variant that
failed, an interval with --bootstrap 0) fails its clause and says so. `previous_run_gate` is the
default gate: not worse than the run `latest.json` names, on the same test data, beyond that run's
95 % interval of the headline metric.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from utilities.data.schema import HEADLINE
from utilities.errors import JobError
from utilities.evaluation.results import RunMetrics, SplitMetrics, VariantMetrics

GATE_FAILED = 3  # the process's exit code when a complete run fails its gate (a pipeline stops there)
SPLITS = ("val", "test")
SPLIT_FIELDS = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "ece", "top_class_share")
VARIANT_FIELDS = ("agreement", "size_bytes", "gzip_bytes", "params", "gzip_ratio_vs_float", "sparsity_overall")
BOUNDS = {"ci95_low": 0, "ci95_high": 1}
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|(?P<op>>=|<=|==|!=|>|<)|(?P<paren>[()])|(?P<name>[A-Za-z_][A-Za-z0-9_.]*))"
)


class GateError(JobError, ValueError):
    """A --gate expression that does not parse or names no metric; one line pointing at the problem."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    expression: str
    reasons: tuple[str, ...] = ()  # one line per clause: its value against its bound, or why it has none

    def to_json(self) -> dict:
        return {"expression": self.expression, "passed": self.passed, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class Clause:
    path: tuple[str, ...]  # the field's dotted name, split
    op: str
    bound: float

    def judge(self, metrics: RunMetrics) -> tuple[bool, str]:
        name = ".".join(self.path)
        value, missing = _value(self.path, metrics)
        if value is None:
            return False, f"{name}: {missing}"
        ok = _OPS[self.op](value, self.bound)
        return ok, f"{name} = {value:.4g} {'' if ok else 'not '}{self.op} {self.bound:g}"


@dataclass(frozen=True)
class Gate:
    """`any` of groups, each `all` of its clauses (or of nested gates)."""

    groups: tuple[tuple[Clause | Gate, ...], ...]
    expression: str = field(default="", compare=False)

    def _judge(self, metrics: RunMetrics) -> tuple[bool, list[str]]:
        passed, reasons = False, []
        for group in self.groups:
            results = [part._judge(metrics) if isinstance(part, Gate) else _one(part.judge(metrics)) for part in group]
            passed |= all(ok for ok, _ in results)
            reasons += [line for _, lines in results for line in lines]
        return passed, reasons

    def judge(self, metrics: RunMetrics) -> Verdict:
        passed, reasons = self._judge(metrics)
        return Verdict(passed, self.expression, tuple(reasons))


def _one(result: tuple[bool, str]) -> tuple[bool, list[str]]:
    return result[0], [result[1]]


def _value(path: tuple[str, ...], metrics: RunMetrics) -> tuple[float | None, str]:
    """The number a field names in `metrics`, or (None, why not)."""
    parts = list(path)
    variant_name = "model"
    if parts[0] not in SPLITS:
        variant_name = parts.pop(0)
        if variant_name not in metrics.variants and f"model_{variant_name}" in metrics.variants:
            variant_name = f"model_{variant_name}"
    variant: VariantMetrics | None = metrics.variants.get(variant_name)
    if variant is None:
        return None, f"the run has no variant {variant_name}"
    if variant.error is not None:
        return None, f"variant {variant_name} failed ({variant.error})"
    if parts[0] in SPLITS:
        split: SplitMetrics | None = getattr(variant, parts[0])
        if split is None:
            return None, f"variant {variant_name} has no {parts[0]} metrics"
        if len(parts) == 3:
            bounds = split.interval(parts[1])
            return (None, "no 95 % interval (--bootstrap 0)") if bounds is None else (bounds[BOUNDS[parts[2]]], "")
        value = getattr(split, parts[1])
    elif parts[0] == "latency_ms":
        value = getattr(variant.latency_ms, parts[1]) if variant.latency_ms else None
    else:
        value = getattr(variant, parts[0])
    return (None, "not measured") if value is None else (float(value), "")


def _check_path(path: tuple[str, ...], text: str) -> None:
    rest = list(path[1:] if path[0] not in SPLITS else path)
    if rest and rest[0] in SPLITS:
        ok = (len(rest) == 2 and rest[1] in SPLIT_FIELDS) or (
            len(rest) == 3 and rest[1] in ("balanced_accuracy", "macro_auc") and rest[2] in BOUNDS
        )
    else:
        ok = path[0] not in SPLITS and (
            (len(rest) == 1 and rest[0] in VARIANT_FIELDS) or rest in (["latency_ms", "median"], ["latency_ms", "p90"])
        )
    if not ok:
        raise GateError(
            f"--gate {text!r}: {'.'.join(path)} is not a metric (e.g. test.{HEADLINE}.ci95_low, "
            "val.macro_auc, int8.agreement, student.test.accuracy)"
        )


def parse(text: str) -> Gate:
    """The gate of an expression; `GateError` (one line) when it does not parse or names no metric."""
    tokens, pos = [], 0
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise GateError(f"--gate {text!r}: cannot read {text[pos:].strip()[:20]!r}")
        tokens.append((match.lastgroup, match.group(match.lastgroup)))
        pos = match.end()
    if not tokens:
        raise GateError("--gate needs an expression, e.g. 'test.balanced_accuracy.ci95_low >= 0.70'")
    gate, used = _gate(tokens, 0, text)
    if used != len(tokens):
        raise GateError(f"--gate {text!r}: unexpected {tokens[used][1]!r}")
    return Gate(gate.groups, text.strip())


def _gate(tokens: list[tuple[str, str]], i: int, text: str) -> tuple[Gate, int]:
    groups, group = [], []
    while True:
        part, i = _clause(tokens, i, text)
        group.append(part)
        word = tokens[i][1] if i < len(tokens) and tokens[i][0] == "name" else None
        if word == "and":
            i += 1
        elif word == "or":
            groups.append(tuple(group))
            group, i = [], i + 1
        else:
            groups.append(tuple(group))
            return Gate(tuple(groups)), i


def _clause(tokens: list[tuple[str, str]], i: int, text: str) -> tuple[Clause | Gate, int]:
    if i < len(tokens) and tokens[i] == ("paren", "("):
        inner, i = _gate(tokens, i + 1, text)
        if i >= len(tokens) or tokens[i] != ("paren", ")"):
            raise GateError(f"--gate {text!r}: a '(' is not closed")
        return inner, i + 1
    if len(tokens) - i < 3:
        raise GateError(f"--gate {text!r}: a clause is `field OP number`, e.g. test.balanced_accuracy >= 0.7")
    (kind_f, name), (kind_o, op), (kind_n, number) = tokens[i : i + 3]
    if (kind_f, kind_o, kind_n) != ("name", "op", "num") or name in ("and", "or"):
        raise GateError(f"--gate {text!r}: a clause is `field OP number`, e.g. test.balanced_accuracy >= 0.7")
    path = tuple(name.split("."))
    _check_path(path, text)
    return Clause(path, op, float(number)), i + 3


def previous_run_gate(previous: RunMetrics, run_id: str) -> Gate | None:
    """Not worse than `previous` (the latest.json run on the same test data) beyond its interval: this
    run's test headline at least the low end of that run's 95 % interval; None when it has none."""
    model = previous.variants.get("model")
    bounds = model.test.interval(HEADLINE) if model and model.test else None
    if bounds is None:
        return None
    low = round(bounds[0], 6)
    return Gate(
        ((Clause(("test", HEADLINE), ">=", low),),), f"test.{HEADLINE} >= {low:g} (latest run {run_id}'s ci95_low)"
    )
