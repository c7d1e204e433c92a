"""Score a finished run's model on any dataset version, without training (issue: evaluate any model on any data).

    python -m tools.evaluate --model outputs/demo_model/RUN_ID --tag dataset_v02 [--registry REPO]
    python -m tools.evaluate --model gs://bucket/runs/m/RUN/model_int8.tflite --manifest v03.pickle --output gs://…/eval

`--model` is a run folder (its `model/`), a model folder or `.keras` file, or a `.tflite` file; local or
gs://. The data is a manifest (`--manifest`, local or gs://) or a registry tag (`--tag`, fetched with
`dvc_pull.sh` from `--registry`, default $DVC_REPO). The output folder (default
`evaluations/{model}_{tag or manifest}_{time}`) gets what a run writes about its model — metrics.json
(intervals, calibration, triage, subgroups), predictions/ in the ISIC layout, report.md and its figures
— plus evaluation.json: the lineage naming the model's run (its run.json, when found beside the model)
and the data's manifest sha256. The image size comes from the model's input. A registry URL may hold a
token (`https://user:TOKEN@host/…`, as $DVC_REPO does): it reaches dvc_pull.sh through the environment,
never a command line, and the records name the registry without it (`https://***@host/…`).

Exit status: 0 done; 2 bad model, manifest, tag or flags (one line on stderr); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utilities import native_log
from utilities.data.manifest import MANIFEST_PATH
from utilities.errors import JobError, OneLineParser, one_line, redact_url

log = logging.getLogger("tools.evaluate")
ROOT = Path(__file__).resolve().parent.parent
EVALUATION_JSON = "evaluation.json"


class EvaluateError(JobError, ValueError):
    """A model, manifest or tag that cannot be evaluated; one line."""


@dataclass(frozen=True)
class LoadedModel:
    predict: Any  # features dict (B, …) → probs (B, 8)
    image_size: int
    params: int | None
    artifact: Path  # the local file or folder measured for size
    uri: str  # as given
    run: dict[str, Any] | None  # the training run's run.json, when beside the model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run folder, model folder, .keras or .tflite (local or gs://)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", help="the dataset version's manifest (versioned_paths.pickle; local or gs://)")
    data.add_argument("--tag", help="a dataset tag of the registry (dvc_pull.sh fetches its manifest)")
    parser.add_argument(
        "--registry",
        default=os.environ.get("DVC_REPO"),
        help="data registry for --tag (default: $DVC_REPO; a URL holding a token belongs there: argv is visible to all)",
    )
    parser.add_argument(
        "--output", help="evaluation folder (local or gs://); default evaluations/{model}_{data}_{time}"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    parser.add_argument("--cache-dir", default=".cache/shards", help="local cache of remote shards")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per 95%% interval (0: none)")
    parser.add_argument("--gallery", type=int, default=18, help="most confident test mistakes in the report")
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="load a Keras --model even if it holds Python code (Lambda layers, classes from outside tf_keras and "
        "this job), which then runs: only for a model you wrote",
    )
    parser.add_argument(
        "--gate",
        metavar="EXPR",
        help="release gate over the evaluation's metrics, as cli.py --gate (e.g. 'test.balanced_accuracy >= 0.7'); "
        "written to evaluation.json; failing it exits 3",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="keep TensorFlow's C++ start-up lines (dropped otherwise)"
    )
    args = parser.parse_args(argv)
    if args.gate:
        from utilities.evaluation.gate import GateError, parse

        try:
            args.gate = parse(args.gate)
        except GateError as exc:
            parser.error(str(exc))
    if args.batch_size < 1 or args.gallery < 0 or not (args.bootstrap == 0 or args.bootstrap >= 100):
        parser.error("--batch-size must be >= 1, --gallery >= 0, --bootstrap 0 or >= 100")
    if args.tag and not args.registry:
        parser.error("--tag needs --registry REPO (or DVC_REPO)")
    return args


# ---------------------------------------------------------------- the model


def _local_copy(uri: str, scratch: Path) -> Path:
    """A gs:// model (file, or folder with model.keras / run folder) copied into `scratch`; local paths as they are."""
    from utilities import storage

    if not storage.is_gcs(uri):
        path = Path(uri)
        if not path.exists():
            raise EvaluateError(f"--model {uri}: no such file or folder")
        return path
    base = uri.rstrip("/")
    if base.endswith((".tflite", ".keras")):
        target = scratch / base.rsplit("/", 1)[1]
        storage.download_file(base, target)
        for parent in (base.rsplit("/", 1)[0], base.rsplit("/", 2)[0]):  # the run's record, for lineage
            if storage.exists(f"{parent}/run.json"):
                storage.download_file(f"{parent}/run.json", scratch / "run.json")
                break
        return target
    for keras, run in ((f"{base}/model/model.keras", f"{base}/run.json"), (f"{base}/model.keras", None)):
        if storage.exists(keras):
            folder = scratch / "run" / "model"
            storage.download_file(keras, folder / "model.keras")
            if run and storage.exists(run):
                storage.download_file(run, scratch / "run" / "run.json")
            return folder.parent if run else folder
    raise EvaluateError(f"--model {uri}: neither a .keras/.tflite file nor a folder holding model.keras or model/")


def _run_record(path: Path) -> dict[str, Any] | None:
    """run.json of the run the model came from: in the folder, beside the file, or one level up."""
    for folder in (path, path.parent, path.parent.parent):
        record = folder / "run.json"
        if record.is_file():
            try:
                return json.loads(record.read_text(encoding="utf-8"))
            except ValueError:
                return None
    return None


def load(uri: str, scratch: Path, trust_code: bool = False) -> LoadedModel:
    """The model behind `uri`, ready to predict: Keras (.keras / model folder / run folder) or TFLite."""
    path = _local_copy(uri, scratch)
    run = _run_record(path if path.is_dir() else path.parent)
    if path.suffix == ".tflite":
        from utilities.compression.quantization import QuantizationError, signature_runner, tflite_predict_fn

        try:
            size = int(signature_runner(path).get_input_details()["image"]["shape"][1])
        except (QuantizationError, KeyError) as exc:
            raise EvaluateError(f"--model {uri} is not a TFLite model of this job: {one_line(exc)}") from None
        return LoadedModel(tflite_predict_fn(path), size, None, path, uri, run)
    if path.is_dir() and (path / "model").is_dir():  # a run folder
        path = path / "model"
    from utilities.evaluation import variants as variant_eval
    from utilities.model import load_model

    model = load_model(path, trust_code=trust_code)
    inputs = {tensor.name.split(":")[0]: tensor for tensor in model.inputs}
    if "image" not in inputs or "metadata" not in inputs:
        raise EvaluateError(f"--model {uri} does not take this job's inputs (image, metadata): it has {sorted(inputs)}")
    size = int(inputs["image"].shape[1])
    artifact = path / "model.keras" if (path / "model.keras").is_file() else path
    return LoadedModel(variant_eval.keras_predict_fn(model), size, int(model.count_params()), artifact, uri, run)


# ---------------------------------------------------------------- the data


def _absolute(registry: str) -> str:
    """A local registry folder as an absolute path: dvc_pull.sh runs in a scratch folder, where a relative
    one names nothing. URLs (scheme://, user@host:path) pass unchanged."""
    return registry if "://" in registry or not Path(registry).exists() else str(Path(registry).resolve())


def fetch_tag(tag: str, registry: str, scratch: Path) -> Path:
    """The tag's manifest, fetched by dvc_pull.sh (the one reader of the registry: credentials, redaction)."""
    # dvc (and this python) from the environment running us first, as `make demo` does.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # The registry travels in DVC_REPO, not argv: any process can read a command line (/proc/*/cmdline).
    done = subprocess.run(
        ["sh", str(ROOT / "dvc_pull.sh"), "-t", tag],
        cwd=scratch,
        env={**os.environ, "PATH": path, "DVC_REPO": _absolute(registry)},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise EvaluateError(f"cannot fetch tag {tag}: {redact_url(lines[-1]) if lines else 'dvc_pull.sh failed'}")
    return scratch / MANIFEST_PATH


# ---------------------------------------------------------------- the evaluation


def evaluate(args: argparse.Namespace) -> tuple[Path, dict[str, Any] | None]:
    """Score the model on the data's val and test splits; write the evaluation folder; return where, and
    the --gate verdict (None without one)."""
    from utilities.run.folder import git_commit, now, write_json

    started = now()
    _refuse_existing(args.output)  # before TensorFlow loads: a wrong --output is refused in a blink
    with native_log.quiet(verbose=args.verbose):  # TensorFlow's C++ start-up lines dropped
        from utilities import storage
        from utilities.data import pipeline as data
        from utilities.evaluation import report
        from utilities.evaluation import variants as variant_eval
        from utilities.evaluation.predictions import write_predictions
        from utilities.evaluation.results import RunMetrics

        native_log.find_devices()

    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        scratch = Path(tmp)
        manifest_path = fetch_tag(args.tag, args.registry, scratch) if args.tag else args.manifest
        manifest = data.load_manifest(manifest_path)  # before the model: a bad manifest is refused in a second
        model = load(args.model, scratch, trust_code=args.trust_model_code)
        shards = data.fetch_shards(manifest, args.cache_dir)
        evaluated = data.build_eval_data(shards, model.image_size, args.batch_size)
        if not len(evaluated.identities["val"].labels) or not len(evaluated.identities["test"].labels):
            raise EvaluateError(f"manifest {manifest_path} has an empty val or test split: nothing to score")
        result = variant_eval.evaluate_variant(
            model.predict, evaluated, model.artifact, model.params, resamples=args.bootstrap
        )
        metrics = RunMetrics({"model": result.metrics})
        out_uri = args.output or _default_output(args)
        local = Path(out_uri) if not storage.is_gcs(out_uri) else scratch / "out"
        local.mkdir(parents=True, exist_ok=True)
        write_json(local / "metrics.json", metrics.to_json())
        write_predictions(local / "predictions", {"model": result}, evaluated.identities)
        names = evaluated.identities["test"].names
        gallery = variant_eval.most_confident_mistakes(evaluated.test, result, names, args.gallery)
        lineage = {
            "model": redact_url(model.uri),
            "model_run": _run_summary(model.run),
            "data": {
                "tag": args.tag,
                "manifest": redact_url(str(args.manifest or f"{args.registry}@{args.tag}")),
                "manifest_sha256": manifest.digest,
                "counts": {split: len(who.labels) for split, who in evaluated.identities.items()},
            },
            "image_size": model.image_size,
            "code": {"git_commit": git_commit()},
            "started": started,
            "finished": now(),
            "gate": args.gate.judge(metrics).to_json() if args.gate else None,
        }
        write_json(local / EVALUATION_JSON, lineage)
        report.write_report(local, metrics, None, {}, gallery=gallery)
        _add_lineage(local / report.REPORT_MD, lineage)
        if storage.is_gcs(out_uri):
            storage.upload_tree(local, out_uri)
    return Path(out_uri), lineage["gate"]


def _refuse_existing(out_uri: str | None) -> None:
    """An evaluation never overwrites another: its folder must be new (or empty), and a folder."""
    from utilities import storage

    if out_uri is None:
        return
    if storage.is_gcs(out_uri):
        taken = storage.exists(storage.join(out_uri, "metrics.json"))
    else:
        path = Path(out_uri)
        # Checked before the model is scored: a file on the way would fail only at the first write.
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise EvaluateError(f"--output {out_uri}: {blocker} is a file, not a folder; choose a new folder")
        taken = path.is_dir() and any(path.iterdir())
    if taken:
        raise EvaluateError(f"--output {redact_url(out_uri)} already holds files; choose a new folder")


def _run_summary(run: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run:
        return None
    data = run.get("data") or {}
    keys = ("run_id", "model_name", "uri", "finished")
    return {
        **{k: run.get(k) for k in keys},
        "data_tag": data.get("tag"),
        "manifest_sha256": data.get("manifest_sha256"),
    }


def _default_output(args: argparse.Namespace) -> str:
    from utilities.run.folder import now

    model = Path(args.model.rstrip("/")).name.split(".")[0]
    data = args.tag or Path(args.manifest).parent.name or "manifest"
    stamp = now().replace(":", "").replace("-", "")[:15]
    return f"evaluations/{model}_{data}_{stamp}"


def _add_lineage(report_md: Path, lineage: dict[str, Any]) -> None:
    """The report opens with what was scored on what (the run section of a training report)."""
    run = lineage["model_run"] or {}
    lines = [
        "## Evaluation",
        "",
        f"- **model**: `{lineage['model']}`",
        f"- **model's run**: `{run.get('run_id')}` (trained on tag `{run.get('data_tag')}`, manifest sha256 "
        f"`{run.get('manifest_sha256')}`)"
        if run
        else "- **model's run**: unknown (no run.json beside the model)",
        f"- **data**: `{lineage['data']['manifest']}`, manifest sha256 `{lineage['data']['manifest_sha256']}`",
        f"- **images**: {lineage['data']['counts']['val']} val, {lineage['data']['counts']['test']} test "
        f"at {lineage['image_size']} px",
        "",
    ]
    text = report_md.read_text(encoding="utf-8").split("\n")
    text[0] = "# Evaluation report"
    report_md.write_text("\n".join([text[0], "", *lines, *text[2:]]), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out, verdict = evaluate(args)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"evaluation written to {out}")
    if verdict is not None:
        print(f"gate {'passed' if verdict['passed'] else 'failed'}: {'; '.join(verdict['reasons'])}")
        if not verdict["passed"]:
            from utilities.evaluation.gate import GATE_FAILED

            return GATE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
