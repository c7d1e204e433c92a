"""What a model file may hold: a model is a program, so its config is read as JSON and checked
before Keras deserialises anything (TensorFlow's security note: load only models you trust).

    check_model_file("evil.h5")   # ModelError: model evil.h5 refused: layer 'x' is a Lambda, …

Refused: Lambda layers (marshalled bytecode), TF-op layers that look ops up by name (but for `+` and
`tf.math.multiply`, MobileNetV3's arithmetic), classes or modules outside tf_keras, this job (the
classes registered by utilities.model and utilities.backbones) and tfmot's pruning wrappers,
functions that are not tf_keras built-ins. Read: a .keras zip's config.json, an HDF5
file's `model_config`/`training_config` attributes, a SavedModel's keras_metadata.pb.
`utilities.model.load_model` calls it unless `--trust-model-code`.
"""

from __future__ import annotations

import functools
import inspect
import json
import zipfile
from pathlib import Path
from typing import Any

import h5py
import tf_keras

from utilities.errors import JobError, one_line

KERAS_FILE = "model.keras"  # the model inside a run's model/ folder
TRUST_FLAG = "--trust-model-code"


class ModelError(JobError, ValueError):
    """A model that cannot be built or loaded; the message is one line."""


# Built-in tf_keras classes that run code the file names: a Lambda's marshalled bytecode, or TF ops and
# tensor methods looked up by name when the model is rebuilt (`tf.io.write_file` is one such op).
_CODE_CLASSES = frozenset({"Lambda", "__lambda__", "TFOpLambda", "SlicingOpLambda", "TensorFlowOpLayer"}) | {
    "ClassMethod",
    "InstanceMethod",
    "InstanceProperty",
}
# TF-op layers whose op is plain arithmetic on the tensor and a constant: MobileNetV3's hard-swish
# (`relu6(x + 3) * (1 / 6)`, `tf_keras.applications`) is built of them. Any other op name is refused.
_ARITHMETIC_OPS = frozenset(("__operators__.add", "math.multiply"))
# Plain values inside configs (tuples, shapes, constants, bytes): data, no class or module looked up.
_VALUE_CLASSES = frozenset(("__tuple__", "__ellipsis__", "TensorShape", "__tensor__", "__numpy__", "__bytes__"))
_VALUE_CLASSES |= {"CompositeTensor"}  # its "spec" is a TypeSpec entry, checked on its own
# tensorflow-model-optimization's classes in a model saved mid-pruning (it loads inside tfmot's prune_scope)
_PRUNING_CLASSES = frozenset(("PruneLowMagnitude", "PolynomialDecay", "ConstantSparsity"))
_CONFIG_LIMIT = 64 << 20  # most bytes of config.json read from a .keras zip (DenseNet121's: ~0.3 MB)


@functools.cache
def _allowed() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(class names, modules, function names) a model's config may name: the tf_keras built-ins, the
    classes registered by tf_keras and by this package (FusionLayer, BalancedAccuracy), tfmot's pruning classes."""
    public = (tf_keras.layers, tf_keras.layers.experimental.preprocessing, tf_keras.initializers)
    public += (tf_keras.regularizers, tf_keras.constraints, tf_keras.losses, tf_keras.metrics, tf_keras.models)
    public += (tf_keras.optimizers, tf_keras.optimizers.legacy, tf_keras.optimizers.schedules, tf_keras.mixed_precision)
    classes = {name for module in public for name, value in vars(module).items() if inspect.isclass(value)}
    classes |= {"Functional", *_PRUNING_CLASSES}
    modules = set()
    ours = __name__.split(".")[0] + "."  # "utilities."
    for registered, value in tf_keras.saving.get_custom_objects().items():
        if getattr(value, "__module__", "").startswith(("tf_keras.", ours)):  # not a class a test registered
            classes |= {registered, value.__name__}
            modules.add(value.__module__)
    builtins = (tf_keras.activations, tf_keras.losses, tf_keras.metrics)
    functions = {name for module in builtins for name, value in vars(module).items() if inspect.isfunction(value)}
    return frozenset(classes - _CODE_CLASSES), frozenset(modules), frozenset(functions - {"deserialize", "get"})


def _module_allowed(module: Any, class_name: str, modules: frozenset[str]) -> bool:
    """Keras imports a v3 config's `module` to find its class: only tf_keras', ours and tfmot's may be named."""
    if module is None or module in ("keras", "tf_keras") or str(module).startswith(("keras.", "tf_keras.")):
        return True
    if module == "builtins":  # Keras looks the name up among its own functions, then in Python's builtins
        return class_name == "function"
    if str(module).startswith("tensorflow_model_optimization."):
        return class_name in _PRUNING_CLASSES
    return module in modules


def _refused_class(node: dict[str, Any], layer: str) -> str | None:
    """Why one `{"class_name": …}` entry of a config would run code, or None."""
    classes, modules, functions = _allowed()
    name, module, registered = node.get("class_name"), node.get("module"), node.get("registered_name")
    inner = node.get("config")
    if name == "TFOpLambda" and isinstance(inner, dict) and inner.get("function") in _ARITHMETIC_OPS:
        return None if _module_allowed(module, name, modules) else f"layer {layer!r} is imported from {module!r}"
    if name in _CODE_CLASSES:
        return f"layer {layer!r} is a {name}, whose Python code would run while the model is rebuilt"
    if name in _VALUE_CLASSES:
        return None
    if name == "TypeSpec" and str(node.get("type_spec")).startswith("tf."):  # SavedModel metadata: TF's own specs
        return None
    if name == "function":
        if node.get("config") in functions and _module_allowed(module, name, modules):
            return None
        return f"layer {layer!r} names the function {node.get('config')!r} of {module!r}, not a tf_keras built-in"
    if not isinstance(name, str) or name not in classes or (registered is not None and registered not in classes):
        return f"layer {layer!r} is of class {registered or name!r}, neither a tf_keras built-in nor one of this job's"
    if not _module_allowed(module, name, modules):
        return f"layer {layer!r} ({name}) would be imported from module {module!r}, outside tf_keras and this job"
    return None


def _find_code(node: Any, layer: str = "?") -> str | None:
    """The first thing in a config (JSON) that would run code when Keras rebuilds it, in words; else None.

    Walks every value, so nested models, wrappers, initializers and the compile config are checked too.
    """
    if isinstance(node, list):
        return next(filter(None, (_find_code(item, layer) for item in node)), None)
    if not isinstance(node, dict):
        return None
    inner = node.get("config")
    layer = str(node.get("name") or (inner.get("name") if isinstance(inner, dict) else None) or layer)
    if "class_name" in node and (problem := _refused_class(node, layer)):
        return problem
    # A legacy Lambda's function travels as (base64 bytecode, defaults, closure): refused whatever its class.
    if "lambda" in (node.get("function_type"), node.get("output_shape_type")) or isinstance(node.get("function"), list):
        return f"layer {layer!r} holds marshalled Python bytecode"
    return next(filter(None, (_find_code(value, layer) for value in node.values())), None)


def _model_configs(path: Path) -> list[Any]:
    """The JSON documents Keras deserialises when it loads `path`, parsed without deserialising anything.

    The format is chosen as `tf_keras.models.load_model` chooses it: a folder is a SavedModel, a zip
    named .keras the v3 format, any other file HDF5 (even one named .keras).
    """
    if path.is_dir():
        return _saved_model_configs(path)
    if not path.is_file():
        raise ModelError(f"cannot load model {path}: no such file or folder")
    if str(path).endswith(".keras") and zipfile.is_zipfile(path):
        return [_zip_config(path)]
    return _h5_configs(path)


def _zip_config(path: Path) -> Any:
    """config.json of a .keras zip (the model, its compile config), as JSON."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("config.json")
            text = archive.read(info) if info.file_size <= _CONFIG_LIMIT else None
    except KeyError:
        raise ModelError(f"cannot load model {path}: a zip without config.json, not a .keras model") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"cannot load model {path}: unreadable zip ({one_line(exc)})") from None
    if text is None:
        raise ModelError(f"cannot load model {path}: its config.json has {info.file_size:,} bytes, too many to check")
    return _json(path, "config.json", text)


def _h5_configs(path: Path) -> list[Any]:
    """The `model_config` and `training_config` root attributes of a legacy HDF5 model (attributes only)."""
    try:
        with h5py.File(path, "r") as h5:
            raw = [h5.attrs.get(key) for key in ("model_config", "training_config")]
    except OSError as exc:
        raise ModelError(
            f"cannot load model {path}: not a Keras model (.keras zip, .h5 or SavedModel folder): {one_line(exc)}"
        ) from None
    if raw[0] is None:
        raise ModelError(f"cannot load model {path}: an HDF5 file without model_config (weights only?)")
    return [_json(path, "model_config", value) for value in raw if value is not None]


def _json(path: Path, what: str, text: Any) -> Any:
    try:
        return json.loads(text.decode() if isinstance(text, bytes) else text)
    except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise ModelError(f"cannot load model {path}: its {what} is not JSON ({one_line(exc)})") from None


def _saved_model_configs(path: Path) -> list[Any]:
    """The metadata (JSON) of every Keras object in a SavedModel folder, from keras_metadata.pb."""
    from google.protobuf.message import DecodeError
    from tf_keras.protobuf import saved_metadata_pb2

    source = path / "keras_metadata.pb"
    if not source.is_file():  # tf_keras would fall back to the raw TF graph: not a Keras model to us
        raise ModelError(f"cannot load model {path}: a folder without {KERAS_FILE} or keras_metadata.pb")
    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        metadata.ParseFromString(source.read_bytes())
    except (DecodeError, OSError) as exc:
        raise ModelError(f"cannot load model {path}: unreadable {source.name} ({one_line(exc)})") from None
    if not metadata.nodes:
        raise ModelError(f"cannot load model {path}: its {source.name} describes no Keras object")
    return [_json(path, source.name, node.metadata) for node in metadata.nodes]


def check_model_file(path: str | Path) -> None:
    """Refuse (ModelError, one line) a saved model whose config would run Python code when loaded:
    Lambda layers, classes or modules outside tf_keras and this job, marshalled functions.

    Reads only JSON (HDF5 attributes, config.json, keras_metadata.pb): nothing is deserialised, so
    the check itself runs nothing of the file.
    """
    try:
        problem = next(filter(None, (_find_code(config) for config in _model_configs(Path(path)))), None)
    except RecursionError:
        problem = "its config is nested too deeply to check"
    if problem:
        raise ModelError(
            f"model {path} refused: {problem}. A model file is a program: load it only if you wrote it, "
            f"with {TRUST_FLAG}"
        )


__all__ = ["KERAS_FILE", "TRUST_FLAG", "ModelError", "check_model_file"]
