"""Choose the `tf.distribute` strategy from the config.

- `TF_CONFIG` (or Vertex's `CLUSTER_SPEC`, translated by cli.py) present → MultiWorkerMirroredStrategy;
- `--gpus 1` → the default strategy (one device);
- `--gpus N` → MirroredStrategy over N GPUs, or over N logical CPU devices on a machine without GPUs
  (so multi-replica code runs and is tested here). Asking for more GPUs than exist is an error.
`configure_devices` must run before TensorFlow executes its first op.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import tensorflow as tf

from utilities.errors import JobError

log = logging.getLogger(__name__)


class DeviceError(JobError, ValueError):
    """The requested devices do not exist here; the message is one line."""


@dataclass(frozen=True)
class Cluster:
    """Where this process sits: `is_chief` decides who writes outputs, tracks and uploads."""

    task_type: str | None
    task_index: int
    num_workers: int
    has_chief: bool = False  # a "chief" entry in the cluster; else worker 0 acts as chief

    @property
    def is_chief(self) -> bool:
        if self.task_type in (None, "chief"):
            return True
        return self.task_type == "worker" and self.task_index == 0 and not self.has_chief


def parse_cluster(tf_config: str | None) -> Cluster:
    """Read TF_CONFIG's JSON text; no text → a single-process cluster."""
    if not tf_config:
        return Cluster(task_type=None, task_index=0, num_workers=1)
    try:
        spec = json.loads(tf_config)
        cluster, task = spec["cluster"], spec.get("task", {})
        workers = sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
        return Cluster(task.get("type"), int(task.get("index", 0)), workers, has_chief="chief" in cluster)
    except (ValueError, KeyError, TypeError) as exc:
        raise DeviceError(f"TF_CONFIG is not valid cluster JSON: {exc}") from exc


def configure_devices(gpus: int, multi_worker: bool = False, jit: bool = False) -> None:
    """On a machine without GPUs, split the CPU into `gpus` logical devices (only when gpus > 1)."""
    physical_gpus = tf.config.list_physical_devices("GPU")
    if physical_gpus:
        if gpus > len(physical_gpus):
            raise DeviceError(f"--gpus {gpus} asked, but this machine has {len(physical_gpus)} GPU(s)")
        for gpu in physical_gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        return
    if gpus > 1 and not multi_worker and jit:
        # XLA compiles a replica's step for one device; on logical CPU devices the replicas' variables
        # sit on the other logical devices and the compiled step cannot reach them.
        raise DeviceError(f"--jit with --gpus {gpus} needs GPUs; on CPU use --gpus 1 with --jit, or drop --jit")
    if gpus > 1 and not multi_worker:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * gpus)
        except RuntimeError as exc:  # TensorFlow already initialised its devices
            if len(tf.config.list_logical_devices("CPU")) != gpus:
                raise DeviceError(f"cannot create {gpus} logical CPU devices after TensorFlow started: {exc}") from exc


def build_strategy(gpus: int, tf_config: str | None) -> tf.distribute.Strategy:
    """The strategy for this run; call `configure_devices` first."""
    if tf_config:
        resolver = _resolver(tf_config)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    elif gpus == 1:
        strategy = tf.distribute.get_strategy()
    else:
        kind = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        devices = [d.name for d in tf.config.list_logical_devices(kind)][:gpus]
        if len(devices) < gpus:
            raise DeviceError(f"--gpus {gpus} asked, but only {len(devices)} {kind} device(s) are available")
        strategy = tf.distribute.MirroredStrategy(devices)
    log.info("strategy %s with %d replica(s)", strategy_name(strategy), strategy.num_replicas_in_sync)
    return strategy


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """The public name: MultiWorkerMirroredStrategy's class is called CollectiveAllReduceStrategy."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    return type(strategy).__name__


def wait_for_workers(strategy: tf.distribute.Strategy) -> None:
    """Block until every worker of a multi-worker job gets here (one tiny all-reduce); else a no-op.

    A worker that exits while the chief still evaluates and uploads stops sending heartbeats: the
    chief's coordination service then reports it as crashed and aborts every later collective op.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return

    @tf.function
    def all_reduce_one() -> tf.Tensor:
        ones = strategy.run(tf.ones, args=([],))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

    all_reduce_one()


def _resolver(tf_config: str) -> tf.distribute.cluster_resolver.ClusterResolver:
    spec = json.loads(tf_config)
    task = spec.get("task", {})
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(spec["cluster"]),
        task_type=task.get("type"),
        task_id=int(task.get("index", 0)),
        rpc_layer="grpc",
    )


def device_summary(strategy: tf.distribute.Strategy) -> dict:
    """For run.json: strategy, replicas and the devices this process sees."""
    return {
        "strategy": strategy_name(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "logical_devices": [d.name for d in tf.config.list_logical_devices()],
    }
