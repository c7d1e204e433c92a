"""One frozen, typed configuration for a training run, and the command line that fills it.

Each field declares, next to its default, where cli.py takes its value from: its flag(s) with their
help (`flag`, `switch`, `flags`), and the environment variable read when no flag gives one (`env=`).
`cli.py` is the only place that reads flags and environment: it builds a `Config` from these
declarations and hands it to `training.run`. Fields declared with neither keep their default here
(`OutputConfig.staging_dir`). Every field is validated in `__post_init__`, and every rule that spans
fields lives here too, so a bad value fails before any TensorFlow work. The whole config is written
into `run.json` (it never holds a secret: the W&B key and credentials stay in the environment,
where their libraries read them).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from utilities.data.manifest import MANIFEST_PATH
from utilities.data.schema import DEFAULT_IMAGE_SIZE, SPECIFICITIES
from utilities.run.fields import check as _check
from utilities.run.fields import flag, flags, from_env, opt, parse_bool, switch

QUANTIZE_MODES = ("dynamic", "float16", "int8")
SCHEDULES = ("cosine", "step", "constant", "plateau")  # --lr-schedule: utilities.run.recipe
LOSSES = ("crossentropy", "focal")  # --loss
MIN_IMAGE_SIZE = 32  # every backbone without top rejects smaller inputs
EFFICIENTNETS = tuple(f"efficientnetb{i}" for i in range(4))
DEFAULT_BACKBONE = "densenet121"  # the original's; a run.json without `backbone` means it
BACKBONES = (DEFAULT_BACKBONE, *EFFICIENTNETS, "resnet50", "mobilenetv2", "mobilenetv3small")  # utilities.backbones
# Where a W&B key can come from: the variable, or the netrc file `wandb login` writes (for this host).
WANDB_KEY_VARIABLES = ("WANDB_API_KEY", "WANDB_BASE_URL", "NETRC", "HOME")


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    manifest: str = opt(MANIFEST_PATH, "--manifest", help="pickle of shard URIs per split (from dvc_pull.sh)")
    data_tag: str | None = opt(  # lineage only
        None, "--data-tag", env="DVC_TAG", help="registry tag of the manifest, for lineage (default: $DVC_TAG)"
    )
    cache_dir: str = opt(".cache/shards", "--cache-dir", help="local cache of remote shards (verified by sha256)")
    image_size: int = opt(
        DEFAULT_IMAGE_SIZE, "--image-size", help=f"square model input side in pixels (>= {MIN_IMAGE_SIZE})"
    )
    augment: bool = opt(True, "--no-augment", action="store_false", help="no augmentation of training batches")
    colour_jitter: float = opt(
        0.1,
        "--colour-jitter",
        metavar="S",
        help="per image: brightness and contrast x U(1-S, 1+S), saturation x U(1-2S, 1+2S), hue +-S/2 turn; 0: none",
    )
    cutout: float = opt(
        0.0, "--cutout", metavar="F", help="one square of side F x the image's set to its mean colour; 0: none"
    )
    metadata_dropout: float = opt(
        0.1, "--metadata-dropout", metavar="P", help="each of age, site and sex made unknown with probability P"
    )
    shuffle_buffer: int = opt(2048, "--shuffle-buffer", help="most records in the train shuffle buffer")
    shuffle_memory: float = opt(
        256.0,
        "--shuffle-memory",
        metavar="MB",
        help="most memory the train shuffle buffer holds: fewer records than --shuffle-buffer when they are big "
        "(256 px: ~197 KB each)",
    )
    cache_features: str = opt(
        "auto",
        "--cache-features",
        choices=("auto", "on", "off"),
        help="compute frozen-backbone features once (auto: frozen backbone and --no-augment; on: also K augmented views)",
    )

    def __post_init__(self) -> None:
        _check(
            self.image_size >= MIN_IMAGE_SIZE,
            f"--image-size {self.image_size} is below the backbones' minimum of {MIN_IMAGE_SIZE}",
        )
        _check(self.shuffle_buffer >= 1, "--shuffle-buffer must be at least 1")
        _check(0.0 <= self.colour_jitter <= 0.5, "--colour-jitter must be in [0, 0.5]")
        _check(0.0 <= self.cutout < 1.0, "--cutout must be in [0, 1)")
        _check(0.0 <= self.metadata_dropout < 1.0, "--metadata-dropout must be in [0, 1)")
        _check(self.shuffle_memory > 0, "--shuffle-memory must be positive (MB)")
        _check(self.cache_features in ("auto", "on", "off"), "--cache-features must be auto, on or off")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = opt(
        DEFAULT_BACKBONE, "--backbone", choices=BACKBONES, type=str.lower, metavar="NAME", help="image CNN: %(choices)s"
    )
    weights: str = opt("imagenet", "--weights", help="backbone weights: imagenet, none, or a weights file path")
    fine_tune: bool = field(  # True: the whole backbone trains, as the original base model; False: its teacher
        default=True,
        metadata=flags(
            flag(
                "--freeze-backbone",
                action="store_const",
                const=False,
                help="train only the heads on a frozen backbone (the original's teacher; allows --cache-features)",
            ),
            flag(
                "--fine-tune",
                action="store_const",
                const=True,
                help="train the whole backbone, as the original base model (the default; kept for older scripts)",
            ),
            exclusive=True,
        ),
    )
    fcnn_nodes: int = opt(1024, "-f", "--fcnn-nodes", "--fcnn_nodes", help="width of the metadata dense layer")
    dropout: float = opt(0.3, "--dropout", help="dropout before each class head")
    # DenseNet's 0.99 needs hundreds of steps to settle; fine-tuning on a few hundred images wants ~0.9, or
    # validation during training reads stale statistics (utilities.run.recipe.batchnorm_momentum).
    bn_momentum: float = opt(
        0.0,
        "--bn-momentum",
        help="backbone BatchNorm momentum; 0: from the steps per epoch, so that an epoch renews 3/4 of the "
        "moving statistics (at most DenseNet's 0.99)",
    )

    def __post_init__(self) -> None:
        _check(self.backbone in BACKBONES, f"--backbone must be one of {', '.join(BACKBONES)}")
        _check(self.fcnn_nodes >= 1, "--fcnn-nodes must be at least 1")
        _check(0.0 <= self.bn_momentum < 1.0, "--bn-momentum must be in [0, 1) (0: from the steps per epoch)")
        _check(0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = opt(64, "-b", "--batch-size", "--batch_size", help="global batch size, split across replicas")
    epochs: int = opt(10, "-e", "--epochs", help="epochs")
    learning_rate: float = opt(
        1e-4, "-l", "--learning-rate", "--learning_rate", help="Adam learning rate (the peak, with a schedule)"
    )
    lr_schedule: str = opt(
        "cosine",
        "--lr-schedule",
        choices=SCHEDULES,
        help="per-step learning rate: cosine (warmup, then decay to 0), step (x0.1 at 50%% and 75%%), constant, plateau",
    )
    warmup_epochs: float = opt(1.0, "--warmup-epochs", help="cosine: epochs of linear warmup from 0")
    label_smoothing: float = opt(0.1, "--label-smoothing", help="share of each label spread over the classes")
    loss: str = opt(
        "crossentropy", "--loss", choices=LOSSES, help="class-weighted cross-entropy, or focal (gamma 2, same weights)"
    )
    clip_norm: float = opt(0.0, "--clip-norm", help="clip the gradients' global norm to this; 0: no clipping")
    ema: float = opt(0.0, "--ema", metavar="DECAY", help="validate/export a moving average of the weights; 0: off")
    patience: int = opt(3, "--patience", help="early stop on val balanced accuracy (cosine/step: 2nd half); 0: off")
    seed: int = opt(42, "--seed", help="seed for shuffling, augmentation and initialisation")
    gpus: int = opt(
        1, "-g", "--gpus", "--num_gpus", help="replicas: MirroredStrategy over N GPUs (N logical CPUs without GPUs)"
    )
    mixed_precision: bool = opt(
        False,
        "--mixed-precision",
        action="store_true",
        help="train with mixed_float16 compute and dynamic loss scaling (float32 outputs; exports stay float32)",
    )
    jit: bool = opt(
        False,
        "--jit",
        action="store_true",
        help="XLA-compile the Keras training steps (model; pruning and distillation with one replica); CPU: -g 1 only",
    )
    checkpoint_every: int = opt(
        0,
        "--checkpoint-every",
        metavar="STEPS",
        help="training steps between backups (a rerun with the same --run-id resumes at the next step); "
        "0: every 5 minutes, or every epoch with several workers",
    )
    progress_seconds: float = opt(
        30.0,
        "--progress-every",
        metavar="SECONDS",
        help="output to a log, not a terminal: a progress line (step, loss, rate, ETA) this often inside an epoch; "
        "0: every step (a terminal gets Keras' progress bar)",
    )

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        _check(self.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: every 5 minutes)")
        _check(self.progress_seconds >= 0, "--progress-every must be >= 0 seconds")
        _check(self.epochs >= 1, "--epochs must be at least 1")
        _check(self.learning_rate > 0, "--learning-rate must be positive")
        _check(self.lr_schedule in SCHEDULES, f"--lr-schedule must be one of {', '.join(SCHEDULES)}")
        _check(self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}")
        _check(self.warmup_epochs >= 0, "--warmup-epochs must be >= 0 (capped at all but the last step)")
        _check(0.0 <= self.label_smoothing < 1.0, "--label-smoothing must be in [0, 1)")
        _check(self.clip_norm >= 0, "--clip-norm must be >= 0 (0: no clipping)")
        _check(0.0 <= self.ema < 1.0, "--ema must be in [0, 1) (0: off)")
        _check(self.patience >= 0, "--patience must be >= 0")
        _check(self.gpus >= 1, "--gpus must be at least 1: -g 1 is one replica, the CPU on a machine without GPUs")
        _check(
            self.batch_size % self.gpus == 0, f"--batch-size {self.batch_size} is not divisible by --gpus {self.gpus}"
        )


@dataclass(frozen=True)
class CompressionConfig:
    prune: bool = field(
        default=False,
        metadata=switch("-p", "--prune", "--pruning", help="magnitude pruning fine-tune of the trained model"),
    )
    target_sparsity: float = opt(0.5, "--target-sparsity", help="final sparsity of pruned layers")
    prune_epochs: int = opt(2, "--prune-epochs", help="fine-tuning epochs under the pruning schedule")
    distill: bool = field(
        default=False,
        metadata=switch("-d", "--distill", "--distillation", help="train a small student from the trained model"),
    )
    teacher: str | None = opt(
        None, "--teacher", help="saved teacher model to distill from (default: the model just trained)"
    )
    trust_model_code: bool = opt(
        False,
        "--trust-model-code",
        action="store_true",
        help="load --teacher even if it holds Python code (Lambda layers, classes from outside tf_keras and this "
        "job), which then runs: only for a model you wrote",
    )
    temperature: float = opt(4.0, "--temperature", help="distillation temperature on logits")
    alpha: float = opt(0.1, "--alpha", help="weight of the hard-label loss (1-alpha on the teacher)")
    student_epochs: int = opt(0, "--student-epochs", help="student epochs (0: same as --epochs)")
    student_filters: int = opt(32, "--student-filters", help="width of the student's conv branch")
    quantize: tuple[str, ...] = opt(
        (), "-q", "--quantize", action="append", choices=QUANTIZE_MODES, help="TFLite export; repeatable"
    )

    def __post_init__(self) -> None:
        _check(0.0 < self.target_sparsity < 1.0, f"--target-sparsity {self.target_sparsity} must be in (0, 1)")
        _check(self.prune_epochs >= 1, "--prune-epochs must be at least 1")
        _check(self.temperature > 0, "--temperature must be positive")
        _check(0.0 <= self.alpha <= 1.0, f"--alpha {self.alpha} must be in [0, 1]")
        _check(self.student_epochs >= 0, "--student-epochs must be >= 0")
        _check(self.student_filters >= 1, "--student-filters must be at least 1")
        _check(not self.teacher or self.distill, "--teacher is only used with -d/--distill; add -d or drop --teacher")
        _check(not self.trust_model_code or self.teacher, "--trust-model-code applies only to --teacher; drop it")
        for mode in self.quantize:
            _check(mode in QUANTIZE_MODES, f"unknown --quantize {mode!r}; choose from {', '.join(QUANTIZE_MODES)}")

    @property
    def enabled(self) -> bool:
        """Any compressed variant asked for: pruning, distillation or a TFLite export."""
        return self.prune or self.distill or bool(self.quantize)


_NAME = r"[A-Za-z0-9._-]+"  # a model name or run id: one path segment
# Files the job writes in {output}/{model_name}/ beside the run folders: no run id may take their names.
_MODEL_FOLDER_FILES = ("latest.json",)


def _check_name(flag_name: str, value: str) -> None:
    """A model name or run id is one new folder: '.' or '..' would put the run (and latest.json) outside --output,
    and names starting with '.' are where the job keeps temporary files (`.latest.json.tmp-…`)."""
    _check(bool(re.fullmatch(_NAME, value)), f"{flag_name} {value!r} may use only letters, digits, '.', '_' and '-'")
    _check(not value.startswith("."), f"{flag_name} {value!r} may not start with '.' (nor be '.' or '..')")


@dataclass(frozen=True)
class EvaluationConfig:
    calibrate: bool = field(
        default=False,
        metadata=switch(
            "--calibrate",
            help="fit one temperature per Keras variant on the validation split and fold it into the exported "
            "model (TFLite variants are converted from the calibrated models); balanced accuracy is unchanged",
        ),
    )
    bootstrap: int = opt(
        1000, "--bootstrap", help="resamples of the stratified bootstrap behind every 95%% interval (0: no intervals)"
    )
    gallery: int = opt(18, "--gallery", help="most confident test mistakes shown in the report's error gallery")
    gate: str | None = opt(
        None,
        "--gate",
        metavar="EXPR",
        help="release gate over the metrics, e.g. 'test.balanced_accuracy.ci95_low >= 0.70 and int8.agreement >= "
        "0.98' (default: not worse than the latest.json run on the same test data beyond its 95%% interval; off: "
        "none); a run that fails it is kept but does not move latest.json, and exits 3",
    )
    operating_point: float = opt(
        0.95,
        "--operating-point",
        choices=SPECIFICITIES,
        metavar="SPECIFICITY",
        help="validation specificity (0.8 or 0.95) whose malignant threshold the SavedModel's serving_raw "
        "signature flags at (malignant_flag)",
    )

    tta: int = opt(0, "--tta", metavar="N", help="score model_tta too: the mean over N dihedral views; 0: off")
    export_tta: bool = opt(
        False, "--export-tta", action="store_true", help="a SavedModel of model_tta (it averages inside) beside it"
    )

    def __post_init__(self) -> None:
        _check(self.tta == 0 or 2 <= self.tta <= 8, "--tta must be 0 (off) or 2..8 views")
        _check(self.tta or not self.export_tta, "--export-tta needs --tta N")
        _check(self.bootstrap == 0 or self.bootstrap >= 100, "--bootstrap must be 0 (off) or at least 100 resamples")
        _check(self.gallery >= 0, "--gallery must be >= 0")


@dataclass(frozen=True)
class OutputConfig:
    output: str = opt(
        "outputs",
        "--output",
        env="GCS_BUCKET_NAME",
        default=None,
        help="bucket URI (gs://…) or local folder (default: gs://$GCS_BUCKET_NAME/models or ./outputs)",
    )
    model_name: str = opt("base_model", "-n", "--model-name", "--model_name", help="run / model name")
    run_id: str = opt(  # "" only outside cli.py, which always fills it
        "",
        "--run-id",
        default=None,
        help="run folder name; reuse one to resume an interrupted run (default: new time-stamped id)",
    )
    model_dir: str | None = from_env("AIP_MODEL_DIR")  # Vertex AI: the final model also goes there
    checkpoint_dir: str | None = from_env("AIP_CHECKPOINT_DIR")  # default: inside the run folder
    tensorboard_dir: str | None = from_env("AIP_TENSORBOARD_LOG_DIR")
    hp_metric_file: str | None = from_env("CLOUD_ML_HP_METRIC_FILE")  # for hypertune
    staging_dir: str = ".cache/runs"  # local copy of a gs:// run before upload (resume reads it); no flag
    saved_model: bool = opt(
        True,
        "--no-saved-model",
        action="store_false",
        help="skip the SavedModel export beside model/model.keras (it loads with TensorFlow alone; ~1 min; "
        "still done for AIP_MODEL_DIR)",
    )
    # A complete run is never resumed (run.json refuses it), so its backups only cost space (~80 MB at DenseNet121).
    keep_checkpoints: bool = field(
        default=False,
        metadata=switch(
            "--keep-checkpoints",
            help="keep a complete run's training backups: checkpoints/ in the run folder, or the run's folder "
            "under AIP_CHECKPOINT_DIR (default: removed once run.json and latest.json are written)",
        ),
    )

    def __post_init__(self) -> None:
        _check_name("--model-name", self.model_name)
        if self.run_id:
            _check_name("--run-id", self.run_id)
            _check(  # lower case too: a case-insensitive disk (macOS) would collide as well
                self.run_id.lower() not in _MODEL_FOLDER_FILES,
                f"--run-id {self.run_id!r} is the name of a file the job writes beside the runs "
                f"({self.model_name}/{self.run_id.lower()}); choose another",
            )

    @property
    def run_uri(self) -> str:
        return f"{self.output.rstrip('/')}/{self.model_name}/{self.run_id}"


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = field(
        default=False,
        metadata=flags(
            flag(
                "-x",
                "--tracking",
                "--experiment_tracking",
                nargs="?",
                const=True,
                default=None,
                type=parse_bool,
                metavar="BOOL",
                help="W&B tracking: -x, -x True or -x False (default: on when a W&B key is set or `wandb login` was run)",
            ),
            flag("--no-tracking", action="store_false", help="no W&B tracking"),
            env=WANDB_KEY_VARIABLES,  # WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes
        ),
    )
    # WANDB_MODE; without it online when a key is available, else offline (online without a key: offline).
    mode: str = from_env(("WANDB_MODE", *WANDB_KEY_VARIABLES), "offline")
    project: str = opt("dermaid", "--wandb-project", help="W&B project")
    # WANDB_DIR unset: W&B writes into the run's local folder (tracking.wandb_folder), never the current one.
    wandb_dir: str | None = from_env("WANDB_DIR")

    def __post_init__(self) -> None:
        _check(self.mode in ("online", "offline", "disabled"), f"unknown W&B mode {self.mode!r}")


@dataclass(frozen=True)
class ClusterConfig:
    tf_config: str | None = from_env(("TF_CONFIG", "CLUSTER_SPEC"))  # or Vertex AI's CLUSTER_SPEC translated; JSON
    gcp_project: str | None = from_env("GCP_PROJECT")
    bucket: str | None = from_env("GCS_BUCKET_NAME")
    code_commit: str | None = from_env("DERMAID_GIT_COMMIT")  # baked into images (they hold no .git)


_CACHE_ON_FINE_TUNE = "--cache-features on needs a frozen backbone; add --freeze-backbone or use --cache-features auto"


@dataclass(frozen=True)
class Config:
    """The sections; each one's `title` is its group in `--help` (a section without flags has none)."""

    data: DataConfig = field(default_factory=DataConfig, metadata={"title": "Data"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"title": "Model"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"title": "Training"})
    compression: CompressionConfig = field(default_factory=CompressionConfig, metadata={"title": "Compression"})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"title": "Evaluation"})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"title": "Output and tracking"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"title": "Output and tracking"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        self._refuse_cache_with_fine_tune()

    def _refuse_cache_with_fine_tune(self) -> None:
        # The cache would freeze a backbone the user asked to train: refuse rather than ignore one flag.
        _check(not (self.data.cache_features == "on" and self.model.fine_tune), _CACHE_ON_FINE_TUNE)

    @property
    def caches_features(self) -> bool:
        """Train the head on cached backbone features: "on", or "auto" with a frozen backbone and no augmentation."""
        self._refuse_cache_with_fine_tune()  # again: a Config altered past __post_init__ (object.__setattr__)
        mode = self.data.cache_features
        return mode == "on" or (mode == "auto" and not self.model.fine_tune and not self.data.augment)

    def check_train_examples(self, n: int) -> None:
        """Refuse, before any training, variants that need training data when the train split has `n` examples."""
        c = self.compression
        needing = [name for name, on in (("-p", c.prune), ("-d", c.distill), ("-q int8", "int8" in c.quantize)) if on]
        _check(n > 0 or not needing, f"{', '.join(needing)} need training examples, but the train split is empty")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        """Copy with whole sections or single fields changed: `cfg.replace(train={"epochs": 1})`."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **changes)


def sections() -> Iterator[tuple[str, str | None, type]]:
    """(name, `--help` group title or None, dataclass) of each section of `Config`, in order."""
    for f in dataclasses.fields(Config):
        yield f.name, f.metadata.get("title"), f.default_factory
