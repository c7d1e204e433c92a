"""Train the DermAID model on a versioned dataset: flags + environment → Config → training.run.

    sh dvc_pull.sh -t dataset_v02
    python cli.py -b 32 -e 10 -g 2 -x --manifest Versioning/versioned_paths.pickle --output gs://BUCKET/models
    python training.py --batch_size 32 -p True      # the original's entry point and spellings: the same command

This is the only module that reads the environment. `--help` does not import TensorFlow.
Exit codes: 0 success, 2 usage or input error (one line on stderr), 1 failure during the run,
130 interrupted (Ctrl-C), 75 preempted (SIGTERM: a backup of the last step is saved); after either,
rerun with the printed --run-id to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import netrc
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence

from utilities.config import (
    QUANTIZE_MODES,
    ClusterConfig,
    CompressionConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OutputConfig,
    TrackingConfig,
    TrainConfig,
)
from utilities.errors import JobError, one_line

log = logging.getLogger("dermaid")
PREEMPTED = 75  # EX_TEMPFAIL: try again (with the same --run-id) and the run resumes

_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def str_to_bool(text: str) -> bool:
    """`-x False` must mean off (the original's `type=bool` made every string True)."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _switch(group, *names: str, help: str) -> None:
    """An on/off flag that also takes a value, as the original's `-p True`: `-p`, `-p True`, `-p no`."""
    group.add_argument(*names, nargs="?", const=True, default=False, type=str_to_bool, metavar="BOOL", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cli.py",
        description="Train the image + metadata skin-lesion classifier on a versioned dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("Data")
    data.add_argument(
        "--manifest",
        default="Versioning/versioned_paths.pickle",
        help="pickle of shard URIs per split (from dvc_pull.sh)",
    )
    data.add_argument("--data-tag", default=None, help="registry tag of the manifest, for lineage (default: $DVC_TAG)")
    data.add_argument("--image-size", type=int, default=256, help="square model input side in pixels (>= 32)")
    data.add_argument("--cache-dir", default=".cache/shards", help="local cache of remote shards")
    data.add_argument(
        "--no-augment", dest="augment", action="store_false", help="no flip/rotation/shift/zoom on training batches"
    )
    data.add_argument(
        "--cache-features",
        choices=("auto", "on", "off"),
        default="auto",
        help="compute frozen-backbone features once (auto: frozen backbone and --no-augment; on: also K augmented views)",
    )
    data.add_argument("--shuffle-buffer", type=int, default=2048, help="examples in the shuffle buffer")

    model = parser.add_argument_group("Model")
    model.add_argument(
        "-f", "--fcnn-nodes", "--fcnn_nodes", type=int, default=1024, help="width of the metadata dense layer"
    )
    model.add_argument("--weights", default="imagenet", help="backbone weights: imagenet, none, or a weights file path")
    model.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="train only the heads on a frozen DenseNet121 (the original's teacher; allows --cache-features)",
    )
    model.add_argument(
        "--fine-tune",
        action="store_true",
        help="train the whole DenseNet121, as the original base model (the default; kept for older scripts)",
    )
    model.add_argument("--dropout", type=float, default=0.3, help="dropout before each class head")
    model.add_argument(
        "--bn-momentum",
        type=float,
        default=0.99,
        help="backbone BatchNorm momentum (~0.9 when fine-tuning on little data)",
    )

    train = parser.add_argument_group("Training")
    train.add_argument(
        "-b", "--batch-size", "--batch_size", type=int, default=64, help="global batch size, split across replicas"
    )
    train.add_argument("-e", "--epochs", type=int, default=10, help="epochs")
    train.add_argument("-l", "--learning-rate", "--learning_rate", type=float, default=1e-4, help="Adam learning rate")
    train.add_argument("--patience", type=int, default=3, help="early stopping on val balanced accuracy; 0 disables")
    train.add_argument("--seed", type=int, default=42, help="seed for shuffling, augmentation and initialisation")
    train.add_argument(
        "-g",
        "--gpus",
        "--num_gpus",
        type=int,
        default=1,
        help="replicas: MirroredStrategy over N GPUs (N logical CPUs without GPUs)",
    )
    train.add_argument(
        "--mixed-precision",
        action="store_true",
        help="train with mixed_float16 compute and dynamic loss scaling (float32 outputs; exports stay float32)",
    )
    train.add_argument(
        "--jit",
        action="store_true",
        help="XLA-compile the Keras training steps (model; pruning and distillation with one replica); CPU: -g 1 only",
    )

    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="training steps between backups (a rerun with the same --run-id resumes at the next step); "
        "0: every 5 minutes, or every epoch with several workers",
    )
    train.add_argument(
        "--progress-every",
        dest="progress_seconds",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="output to a log, not a terminal: a progress line (step, loss, rate, ETA) this often inside an epoch; "
        "0: every step (a terminal gets Keras' progress bar)",
    )

    comp = parser.add_argument_group("Compression")
    _switch(comp, "-p", "--prune", "--pruning", help="magnitude pruning fine-tune of the trained model")
    comp.add_argument("--target-sparsity", type=float, default=0.5, help="final sparsity of pruned layers")
    comp.add_argument("--prune-epochs", type=int, default=2, help="fine-tuning epochs under the pruning schedule")
    _switch(comp, "-d", "--distill", "--distillation", help="train a small student from the trained model")
    comp.add_argument(
        "--teacher", default=None, help="saved teacher model to distill from (default: the model just trained)"
    )
    comp.add_argument("--temperature", type=float, default=4.0, help="distillation temperature on logits")
    comp.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label loss (1-alpha on the teacher)")
    comp.add_argument("--student-epochs", type=int, default=0, help="student epochs (0: same as --epochs)")
    comp.add_argument("--student-filters", type=int, default=32, help="width of the student's conv branch")
    comp.add_argument(
        "-q", "--quantize", action="append", choices=QUANTIZE_MODES, default=[], help="TFLite export; repeatable"
    )

    out = parser.add_argument_group("Output and tracking")
    out.add_argument(
        "--output",
        default=None,
        help="bucket URI (gs://…) or local folder (default: gs://$GCS_BUCKET_NAME/models or ./outputs)",
    )
    out.add_argument("-n", "--model-name", "--model_name", default="base_model", help="run / model name")
    out.add_argument(
        "--run-id",
        default=None,
        help="run folder name; reuse one to resume an interrupted run (default: new time-stamped id)",
    )
    out.add_argument(
        "-x",
        "--tracking",
        "--experiment_tracking",
        nargs="?",
        const=True,
        default=None,
        type=str_to_bool,
        metavar="BOOL",
        help="W&B tracking: -x, -x True or -x False (default: on when a W&B key is set or `wandb login` was run)",
    )
    out.add_argument("--no-tracking", dest="tracking", action="store_false", help="no W&B tracking")
    out.add_argument("--wandb-project", default="dermaid", help="W&B project")
    out.add_argument(
        "--no-saved-model",
        dest="saved_model",
        action="store_false",
        help="skip the SavedModel export beside model/model.keras (~1 min; still done for AIP_MODEL_DIR)",
    )
    out.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def tf_config_from_env(env: Mapping[str, str]) -> str | None:
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


def tracking_mode(env: Mapping[str, str]) -> str:
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    return "online" if env.get("WANDB_API_KEY") else "offline"


def wandb_key_source(env: Mapping[str, str]) -> str | None:
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


def tracking_choice(flag: bool | None, env: Mapping[str, str]) -> tuple[bool, str]:
    """-x decides when given; otherwise on exactly when a W&B key is available (the original tracked by default)."""
    if flag is not None:
        return flag, "W&B tracking " + ("on (-x)" if flag else "off (-x False / --no-tracking)")
    source = wandb_key_source(env)
    if source:
        return True, f"W&B tracking on: key from {source} (-x False turns it off)"
    return (
        False,
        "W&B tracking off: no W&B key (set WANDB_API_KEY, secrets/wandb.txt or run `wandb login`; -x forces it on)",
    )


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    if args.freeze_backbone and args.fine_tune:
        raise ConfigError("--freeze-backbone and --fine-tune contradict each other; choose one")
    bucket = env.get("GCS_BUCKET_NAME")
    output = args.output or (f"gs://{bucket}/models" if bucket else "outputs")
    return Config(
        data=DataConfig(
            manifest=args.manifest,
            data_tag=args.data_tag or env.get("DVC_TAG"),
            cache_dir=args.cache_dir,
            image_size=args.image_size,
            augment=args.augment,
            shuffle_buffer=args.shuffle_buffer,
            cache_features=args.cache_features,
        ),
        model=ModelConfig(
            weights=args.weights,
            fine_tune=not args.freeze_backbone,
            fcnn_nodes=args.fcnn_nodes,
            dropout=args.dropout,
            bn_momentum=args.bn_momentum,
        ),
        train=TrainConfig(
            batch_size=args.batch_size,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            patience=args.patience,
            seed=args.seed,
            gpus=args.gpus,
            mixed_precision=args.mixed_precision,
            jit=args.jit,
            checkpoint_every=args.checkpoint_every,
            progress_seconds=args.progress_seconds,
        ),
        compression=CompressionConfig(
            prune=args.prune,
            target_sparsity=args.target_sparsity,
            prune_epochs=args.prune_epochs,
            distill=args.distill,
            teacher=args.teacher,
            temperature=args.temperature,
            alpha=args.alpha,
            student_epochs=args.student_epochs,
            student_filters=args.student_filters,
            quantize=tuple(dict.fromkeys(args.quantize)),
        ),
        output=OutputConfig(
            output=output,
            model_name=args.model_name,
            run_id=args.run_id or new_run_id(),
            saved_model=args.saved_model,
            model_dir=env.get("AIP_MODEL_DIR"),
            checkpoint_dir=env.get("AIP_CHECKPOINT_DIR"),
            tensorboard_dir=env.get("AIP_TENSORBOARD_LOG_DIR"),
            hp_metric_file=env.get("CLOUD_ML_HP_METRIC_FILE"),
        ),
        tracking=TrackingConfig(
            enabled=tracking_choice(args.tracking, env)[0],
            mode=tracking_mode(env),
            project=args.wandb_project,
            wandb_dir=env.get("WANDB_DIR"),
        ),
        cluster=ClusterConfig(
            tf_config=tf_config_from_env(env),
            gcp_project=env.get("GCP_PROJECT"),
            bucket=bucket,
            code_commit=env.get("DERMAID_GIT_COMMIT") or None,
        ),
    )


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
        config = config_from_args(args, env)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))  # exits 2 with usage
    log.info(tracking_choice(args.tracking, env)[1])

    import training  # TensorFlow is imported only past this point

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
    return 0


def print_summary(result) -> None:
    """Where everything went, and the headline numbers (stdout, so scripts can read it)."""
    model = result.metrics["variants"].get("model")
    if model is None:  # a non-chief worker of a multi-worker job: it evaluates and publishes nothing
        print(f"worker done; the chief publishes {result.uri}")
        return
    print(f"run complete: {result.uri}")
    for name in ("model", "metrics.json", "report.md", "run.json"):
        print(f"  {name:<13} {result.uri}/{name}")
    for split in ("val", "test"):
        m = model[split]
        print(
            f"  {split:<5} balanced accuracy {m['balanced_accuracy']:.3f}  accuracy {m['accuracy']:.3f}  macro F1 {m['macro_f1']:.3f}"
        )
    for name, variant in result.metrics["variants"].items():
        if name != "model" and "val" in variant:
            print(f"  variant {name}: val balanced accuracy {variant['val']['balanced_accuracy']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
