"""Train the DermAID model on a versioned dataset: flags + environment → Config → training.run.

    sh dvc_pull.sh -t dataset_v02
    python cli.py -b 32 -e 10 -g 2 -x --manifest Versioning/versioned_paths.pickle --output gs://BUCKET/models
    python training.py --batch_size 32 -p True      # the original's entry point and spellings: the same command

This is the only module that reads the environment. `--help` does not import TensorFlow.
Exit codes: 0 success, 2 usage or input error (one line on stderr), 1 failure during the run,
3 the run is complete but failed its release gate (--gate; latest.json not moved),
130 interrupted (Ctrl-C), 75 preempted (SIGTERM: a backup of the last step is saved); after either,
rerun with the printed --run-id to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import netrc
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from utilities import native_log
from utilities.errors import JobError, OneLineParser, one_line
from utilities.evaluation import gate
from utilities.evaluation.gate import GATE_FAILED
from utilities.run.config import Config, sections
from utilities.run.fields import ConfigError, Source, source

log = logging.getLogger("dermaid")
PREEMPTED = 75  # EX_TEMPFAIL: try again (with the same --run-id) and the run resumes
_TYPES = {"int": int, "float": float}  # a flag's type from its field's annotation (other: str)


def build_parser() -> argparse.ArgumentParser:
    """Every flag declared on a `Config` field, one argument group per section, then -v."""
    parser = OneLineParser(
        prog="cli.py",
        description="Train the image + metadata skin-lesion classifier on a versioned dataset.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, title, section in sections():
        for f in dataclasses.fields(section):
            if (src := source(f)) and src.flags and title:
                if title not in groups:
                    groups[title] = parser.add_argument_group(title)
                _add_flags(groups[title], f"{name}.{f.name}", f, src)
    last = list(groups.values())[-1]  # Output and tracking
    last.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, and TensorFlow's C++ start-up lines (also kept when TF_CPP_MIN_LOG_LEVEL is set)",
    )
    return parser


def _add_flags(group: argparse._ArgumentGroup, key: str, f: dataclasses.Field, src: Source) -> None:
    """The flags of field `key` ("section.field"): dest `key`, or `key.I` for flag I of an exclusive field."""
    for i, declared in enumerate(src.flags):
        options = dict(declared.options)
        action = options.get("action")
        if action in (None, "append"):  # the flag takes a value
            options.setdefault("type", _TYPES.get(getattr(f.type, "__name__", f.type)))
            if "choices" not in options:  # argparse's own metavar, as if dest were the main long name
                main = next(n for n in declared.names if n.startswith("--"))
                options.setdefault("metavar", main[2:].replace("-", "_").upper())
        if src.exclusive or i > 0:  # unset unless given; the first flag's default stands for a shared dest
            options["default"] = argparse.SUPPRESS
        else:
            options.setdefault("default", list(f.default) if action == "append" else f.default)
        group.add_argument(*declared.names, dest=f"{key}.{i}" if src.exclusive else key, help=declared.help, **options)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def tf_config_from_env(env: Mapping[str, str | None]) -> str | None:
    """TF_CONFIG as given, or Vertex AI's CLUSTER_SPEC translated to the same shape."""
    if env.get("TF_CONFIG"):
        return env["TF_CONFIG"]
    if not env.get("CLUSTER_SPEC"):
        return None
    spec = json.loads(env["CLUSTER_SPEC"])
    cluster = {
        k: v for k, v in spec.get("cluster", {}).items() if k in ("chief", "worker", "workerpool0", "workerpool1")
    }
    cluster = {{"workerpool0": "chief", "workerpool1": "worker"}.get(k, k): v for k, v in cluster.items()}
    task = spec.get("task", {})
    task_type = {"workerpool0": "chief", "workerpool1": "worker"}.get(task.get("type"), task.get("type"))
    if sum(len(v) for v in cluster.values()) <= 1:
        return None  # one machine: no multi-worker strategy needed
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": task.get("index", 0)}})


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")  # GCS naming rules (dotted names may be longer)


def output_for_bucket(bucket: str) -> str:
    """GCS_BUCKET_NAME → the output: `gs://B/models` (B with or without gs://), or a local folder (/…, .…)."""
    if bucket.startswith(("/", ".")):
        return bucket
    name = bucket.removeprefix("gs://").rstrip("/")
    if not _BUCKET.match(name):  # a path or URL passed by mistake
        raise ConfigError(f"GCS_BUCKET_NAME {bucket!r} is not a bucket name (or a local folder starting with / or .)")
    return f"gs://{name}/models"


def wandb_key_source(env: Mapping[str, str | None]) -> str | None:
    """Where a W&B key comes from (WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes), or None."""
    if env.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = (env.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = env.get("NETRC") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        found = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return f"wandb login ({path})" if found and found[2] else None


def tracking_choice(flag: bool | None, env: Mapping[str, str | None]) -> tuple[bool, str]:
    """-x decides when given; otherwise on exactly when a W&B key is available (the original tracked by default)."""
    if flag is not None:
        return flag, "W&B tracking " + ("on (-x)" if flag else "off (-x False / --no-tracking)")
    where = wandb_key_source(env)
    if where:
        return True, f"W&B tracking on: key from {where} (-x False turns it off)"
    return (
        False,
        "W&B tracking off: no W&B key (set WANDB_API_KEY, secrets/wandb.txt or run `wandb login`; -x forces it on)",
    )


def tracking_mode(env: Mapping[str, str | None]) -> tuple[str, str | None]:
    """WANDB_MODE, else online with a key and offline without; online without a key would try the network
    and fail (or prompt, in a container that has no terminal): offline then, said in one line."""
    mode, keyed = env.get("WANDB_MODE"), wandb_key_source(env) is not None
    if mode not in ("online", "offline", "disabled"):
        return ("online" if keyed else "offline"), None
    if mode == "online" and not keyed:
        return "offline", "WANDB_MODE=online without a W&B key: tracking offline (wandb sync uploads it later)"
    return mode, None


Derivation = Callable[[Any, Mapping[str, str | None]], tuple[Any, str | None]]
# Fields whose value is computed from the flag's value (None when not given) and the variables the field
# declares (`env=`, nothing else of the environment), instead of "the flag, else the variable". Each rule
# returns (value, a line for the log or None); cli.py computes each once, and the scripts pass values through.
DERIVED: dict[str, Derivation] = {
    "output.output": lambda given, env: (  # None: the field's default, ./outputs
        given or (output_for_bucket(env["GCS_BUCKET_NAME"]) if env["GCS_BUCKET_NAME"] else None),
        None,
    ),
    "output.run_id": lambda given, _: (given or new_run_id(), None),
    "tracking.enabled": tracking_choice,
    "tracking.mode": lambda _, env: tracking_mode(env),
    "cluster.tf_config": lambda _, env: (tf_config_from_env(env), None),
}


def field_value(args: argparse.Namespace, key: str, src: Source, env: Mapping[str, str]) -> tuple[Any, str | None]:
    """The value of field `key` from its flags, else its variable (an empty one counts as unset), and a
    line for the log (derived fields only); value None: the default."""
    if src.exclusive:
        given = src.pick([getattr(args, f"{key}.{i}", None) for i in range(len(src.flags))])
    else:
        given = getattr(args, key, None)
    variables = {name: env.get(name) or None for name in src.env}  # the only reads of the environment
    if key in DERIVED:
        return DERIVED[key](given, variables)
    if isinstance(given, list):  # a repeatable flag: each value once, in order
        return tuple(dict.fromkeys(given)), None
    variable = variables[src.env[0]] if src.env else None
    return (variable if given is None else given), None


def resolve(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[Config, list[str]]:
    """Every section built from its fields' declared sources (a field without a value keeps its default),
    and what the derivations said (one line each, for the log)."""
    built, notes = {}, []
    for name, _, section in sections():
        values = {}
        for f in dataclasses.fields(section):
            if src := source(f):
                values[f.name], note = field_value(args, f"{name}.{f.name}", src, env)
                notes += [note] if note else []
        built[name] = section(**{k: v for k, v in values.items() if v is not None})
    return Config(**built), notes


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    return resolve(args, env)[0]


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # TensorFlow's own INFO chatter (sharding callbacks, asset writes)
        for name in ("absl", "tensorflow", "h5py"):
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("matplotlib", "PIL"):  # font-matching and plugin debug lines, hundreds per report
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        config, notes = resolve(args, env)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))  # exits 2 with usage
    for note in notes:
        log.info(note)
    if config.evaluation.gate not in (None, "off"):
        try:
            gate.parse(config.evaluation.gate)  # a typo is refused now, not after training
        except gate.GateError as exc:
            parser.error(str(exc))

    with native_log.quiet(verbose=args.verbose):  # TensorFlow's C++ start-up lines (cuInit on a CPU) dropped
        import training  # TensorFlow is imported only past this point

        native_log.find_devices()

    try:
        result = training.run(config)
    except KeyboardInterrupt:
        print(f"error: interrupted; rerun with --run-id {config.output.run_id} to resume", file=sys.stderr)
        return 130
    except training.Preempted as exc:
        print(
            f"error: preempted (SIGTERM): {exc}; rerun with --run-id {config.output.run_id} to resume", file=sys.stderr
        )
        return PREEMPTED
    except Exception as exc:
        if isinstance(exc, JobError) and exc.exit_code == 2:  # bad input: the message says what to fix
            print(f"error: {exc}", file=sys.stderr)
            return 2
        log.debug("run failed", exc_info=True)
        print(f"error: run failed: {type(exc).__name__}: {one_line(exc)} (use -v for the traceback)", file=sys.stderr)
        return 1
    print_summary(result)
    verdict = result.record.gate if result.record else None
    if verdict and not verdict["passed"]:
        reasons = "; ".join(verdict["reasons"])
        print(f"error: release gate failed: {reasons}; the run is kept, latest.json not moved", file=sys.stderr)
        return GATE_FAILED
    return 0


def print_summary(result) -> None:
    """Where everything went, and the headline numbers (stdout, so scripts can read it)."""
    model = result.metrics.variants.get("model")
    if model is None:  # a non-chief worker of a multi-worker job: it evaluates and publishes nothing
        print(f"worker done; the chief publishes {result.uri}")
        return
    print(f"run complete: {result.uri}")
    for name in ("model", "metrics.json", "report.md", "run.json"):
        print(f"  {name:<13} {result.uri}/{name}")
    for split, m in (("val", model.val), ("test", model.test)):
        print(
            f"  {split:<5} balanced accuracy {m.balanced_accuracy:.3f}  accuracy {m.accuracy:.3f}  macro F1 {m.macro_f1:.3f}"
        )
    for name, variant in result.metrics.scored().items():
        if name != "model" and variant.val is not None:
            print(f"  variant {name}: val balanced accuracy {variant.val.balanced_accuracy:.3f}")


if __name__ == "__main__":
    sys.exit(main())
