"""One frozen, typed configuration for a training run.

`cli.py` is the only place that reads flags and environment; it builds a `Config` and hands it to
`training.run`. Every field is validated in `__post_init__`, so a bad value fails before any
TensorFlow work, and the whole config is written into `run.json` (it never holds a secret: the W&B
key and credentials stay in the environment, where their libraries read them).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from utilities.errors import JobError
from utilities.schema import DEFAULT_IMAGE_SIZE

QUANTIZE_MODES = ("dynamic", "float16", "int8")
MIN_IMAGE_SIZE = 32  # DenseNet121 without top rejects smaller inputs


class ConfigError(JobError, ValueError):
    """A configuration value that makes no sense; the message is one line meant for the user."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    manifest: str = "Versioning/versioned_paths.pickle"  # pickle of shard URIs per split
    data_tag: str | None = None  # registry tag the manifest came from (lineage only)
    cache_dir: str = ".cache/shards"  # local copies of remote shards, verified by sha256
    image_size: int = DEFAULT_IMAGE_SIZE  # side of the square model input, pixels
    augment: bool = True  # flip/rotate/shift/zoom on training batches
    shuffle_buffer: int = 2048  # examples
    cache_features: str = "auto"  # frozen-backbone feature cache: auto | on | off

    def __post_init__(self) -> None:
        _check(
            self.image_size >= MIN_IMAGE_SIZE,
            f"--image-size {self.image_size} is below DenseNet121's minimum of {MIN_IMAGE_SIZE}",
        )
        _check(self.shuffle_buffer >= 1, "--shuffle-buffer must be at least 1")
        _check(self.cache_features in ("auto", "on", "off"), "--cache-features must be auto, on or off")


@dataclass(frozen=True)
class ModelConfig:
    weights: str = "imagenet"  # imagenet | none | path to a weights file for the backbone
    fine_tune: bool = True  # the whole DenseNet121 trains, as the original base model; False: frozen (its teacher)
    fcnn_nodes: int = 1024  # width of the metadata dense layer
    dropout: float = 0.3
    # Backbone BatchNorm moving-average momentum. DenseNet's 0.99 needs hundreds of steps to
    # settle; fine-tuning from scratch on a few hundred images wants ~0.9 or validation collapses.
    bn_momentum: float = 0.99

    def __post_init__(self) -> None:
        _check(self.fcnn_nodes >= 1, "--fcnn-nodes must be at least 1")
        _check(0.0 < self.bn_momentum < 1.0, "--bn-momentum must be in (0, 1)")
        _check(0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # global batch, split across replicas
    epochs: int = 10
    learning_rate: float = 1e-4
    patience: int = 3  # early-stopping epochs without val improvement; 0 disables
    seed: int = 42
    gpus: int = 1  # replicas on this machine (MirroredStrategy when > 1)
    mixed_precision: bool = False
    jit: bool = False
    checkpoint_every: int = 0  # training steps between backups; 0: every 5 minutes (every epoch on several workers)
    progress_seconds: float = 30.0  # seconds between progress lines inside an epoch; 0: every step

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "--batch-size must be at least 1")
        _check(self.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: every 5 minutes)")
        _check(self.progress_seconds >= 0, "--progress-every must be >= 0 seconds")
        _check(self.epochs >= 1, "--epochs must be at least 1")
        _check(self.learning_rate > 0, "--learning-rate must be positive")
        _check(self.patience >= 0, "--patience must be >= 0")
        _check(self.gpus >= 1, "--gpus must be at least 1")
        _check(
            self.batch_size % self.gpus == 0, f"--batch-size {self.batch_size} is not divisible by --gpus {self.gpus}"
        )


@dataclass(frozen=True)
class CompressionConfig:
    prune: bool = False
    target_sparsity: float = 0.5
    prune_epochs: int = 2  # fine-tuning epochs under the pruning schedule
    distill: bool = False
    teacher: str | None = None  # path of a saved teacher; default: the model just trained
    temperature: float = 4.0
    alpha: float = 0.1  # weight of the hard-label loss; 1 - alpha on the softened teacher logits
    student_epochs: int = 0  # 0: same as --epochs
    student_filters: int = 32  # width of the student's conv branch
    quantize: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(0.0 < self.target_sparsity < 1.0, f"--target-sparsity {self.target_sparsity} must be in (0, 1)")
        _check(self.prune_epochs >= 1, "--prune-epochs must be at least 1")
        _check(self.temperature > 0, "--temperature must be positive")
        _check(0.0 <= self.alpha <= 1.0, f"--alpha {self.alpha} must be in [0, 1]")
        _check(self.student_epochs >= 0, "--student-epochs must be >= 0")
        _check(self.student_filters >= 1, "--student-filters must be at least 1")
        _check(not self.teacher or self.distill, "--teacher is only used with -d/--distill; add -d or drop --teacher")
        for mode in self.quantize:
            _check(mode in QUANTIZE_MODES, f"unknown --quantize {mode!r}; choose from {', '.join(QUANTIZE_MODES)}")


@dataclass(frozen=True)
class OutputConfig:
    output: str = "outputs"  # gs://bucket/prefix or a local folder
    model_name: str = "base_model"
    run_id: str = ""  # filled by cli.py; a rerun with the same id resumes
    model_dir: str | None = None  # Vertex AI_MODEL_DIR: the final model also goes there
    checkpoint_dir: str | None = None  # Vertex AIP_CHECKPOINT_DIR; default: inside the run folder
    tensorboard_dir: str | None = None  # Vertex AIP_TENSORBOARD_LOG_DIR
    hp_metric_file: str | None = None  # CLOUD_ML_HP_METRIC_FILE for hypertune
    staging_dir: str = ".cache/runs"  # local copy of a gs:// run before upload (resume reads it)
    saved_model: bool = True  # also export model/ as a TF SavedModel (loads with TensorFlow alone; ~1 min)

    def __post_init__(self) -> None:
        _check(
            bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.model_name)),
            f"--model-name {self.model_name!r} may use only letters, digits, '.', '_' and '-'",
        )
        _check(
            self.run_id == "" or bool(re.fullmatch(r"[A-Za-z0-9._-]+", self.run_id)),
            f"--run-id {self.run_id!r} may use only letters, digits, '.', '_' and '-'",
        )

    @property
    def run_uri(self) -> str:
        return f"{self.output.rstrip('/')}/{self.model_name}/{self.run_id}"


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = False
    mode: str = "offline"  # online when a key is present, else offline
    project: str = "dermaid"
    wandb_dir: str | None = None

    def __post_init__(self) -> None:
        _check(self.mode in ("online", "offline", "disabled"), f"unknown W&B mode {self.mode!r}")


@dataclass(frozen=True)
class ClusterConfig:
    tf_config: str | None = None  # TF_CONFIG (or Vertex CLUSTER_SPEC translated) as JSON text
    gcp_project: str | None = None
    bucket: str | None = None
    code_commit: str | None = None  # DERMAID_GIT_COMMIT, baked into images (they hold no .git)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        _check(
            not (self.data.cache_features == "on" and self.model.fine_tune),
            "--cache-features on needs a frozen backbone; add --freeze-backbone or use --cache-features auto",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> Config:
        """Copy with whole sections or single fields changed: `cfg.replace(train={"epochs": 1})`."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **changes)
