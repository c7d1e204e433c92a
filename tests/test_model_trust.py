"""A model file is a program: configs holding Python code are refused before Keras deserialises them.

Hostile files are written here: a tiny model whose Lambda writes a marker file, saved as .h5, as a
Keras SavedModel folder and as .keras; a class registered by someone else; a config naming a module to
import. Each refusal is one line (ModelError, exit 2) and the marker stays absent: the payload never ran.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import tf_keras

from tools import evaluate
from utilities.compression.distillation import build_student, load_teacher
from utilities.model import (
    ModelError,
    ModelSaveError,
    check_model_file,
    compile_model,
    load_model,
    save_model,
    set_temperature,
)

ROOT = Path(__file__).resolve().parents[1]


@tf_keras.utils.register_keras_serializable(package="elsewhere")
class Elsewhere(tf_keras.layers.Layer):
    """A class some other imported code registered: its constructor is the payload."""

    def __init__(self, marker: str = "", **kwargs):
        super().__init__(**kwargs)
        self.marker = marker
        if marker:
            Path(marker).write_text("ran")

    def get_config(self):
        return {**super().get_config(), "marker": self.marker}


def _payload_model(marker: Path) -> tf_keras.Model:
    """(B, 3) → Dense → a Lambda that writes `marker` whenever Keras calls it (building, loading)."""
    payload = lambda x, marker=str(marker): (__import__("pathlib").Path(marker).write_text("ran"), x)[1]  # noqa: E731
    inputs = tf_keras.Input((3,), name="x")
    return tf_keras.Model(inputs, tf_keras.layers.Lambda(payload, name="payload")(tf_keras.layers.Dense(2)(inputs)))


def _rewrite_zip_config(source: Path, target: Path, change) -> Path:
    """A copy of the .keras zip `source` with config.json passed through `change(config)`."""
    config = json.loads(zipfile.ZipFile(source).read("config.json"))
    change(config)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, json.dumps(config) if name == "config.json" else src.read(name))
    return target


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """name → hostile model path, plus "marker": the file any payload writes (absent after this fixture)."""
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "marker"
    evil = _payload_model(marker)
    files = {"h5": folder / "evil.h5", "savedmodel": folder / "evil_savedmodel", "keras": folder / "evil.keras"}
    evil.save(str(files["h5"]))
    evil.save(str(files["savedmodel"]), save_format="tf")
    evil.save(str(files["keras"]))

    inputs = tf_keras.Input((3,), name="x")
    foreign = tf_keras.Model(inputs, Elsewhere(marker=str(marker), name="foreign")(inputs))
    files["foreign_h5"] = folder / "foreign.h5"
    foreign.save(str(files["foreign_h5"]))

    plain = tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="plain")(inputs))
    files["unknown_h5"] = folder / "unknown.h5"
    plain.save(str(files["unknown_h5"]))
    with h5py.File(files["unknown_h5"], "r+") as h5:  # the Dense layer becomes a class nobody knows
        config = h5.attrs["model_config"]
        config = config.decode() if isinstance(config, bytes) else config
        h5.attrs["model_config"] = config.replace('"Dense"', '"EvilLayer"')

    # Keras imports a v3 config's "module" to find its class, safe_mode or not: a module on sys.path runs.
    plain.save(str(folder / "plain.keras"))
    (folder / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    files["module_keras"] = _rewrite_zip_config(
        folder / "plain.keras", folder / "module.keras", lambda config: config.update(module="planted_module")
    )
    marker.unlink()  # building and saving the models ran their payloads once, here
    return {**files, "marker": marker}


# ---------------------------------------------------------------- refused before anything is deserialised


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("h5", "'payload' is a Lambda"),
        ("savedmodel", "'payload' is a Lambda"),
        ("keras", "'payload' is a Lambda"),
        ("foreign_h5", "'elsewhere>Elsewhere'"),
        ("unknown_h5", "'EvilLayer'"),
        ("module_keras", "module 'planted_module'"),
    ],
)
def test_a_model_holding_code_is_refused_and_its_code_never_runs(hostile, kind, named, monkeypatch):
    monkeypatch.syspath_prepend(str(hostile["module_keras"].parent))  # the planted module is importable
    with pytest.raises(ModelError) as caught:
        load_model(hostile[kind])
    message = str(caught.value)
    assert "\n" not in message and str(hostile[kind]) in message and named in message, message
    assert "--trust-model-code" in message
    assert not hostile["marker"].exists()


def _function(module: str, name: str) -> dict[str, str]:
    """A function reference as the .keras format writes one (Keras imports `module` to find it)."""
    return {"class_name": "function", "module": module, "config": name, "registered_name": "function"}


@pytest.mark.parametrize(
    ("layer", "named"),
    [
        ({"class_name": "TFOpLambda", "config": {"name": "op", "function": "io.write_file"}}, "TFOpLambda"),
        (  # MobileNetV3's arithmetic op, but looked up in a module of the file's choosing
            {"class_name": "TFOpLambda", "module": "planted", "config": {"name": "op", "function": "math.multiply"}},
            "'planted'",
        ),
        (  # a marshalled function under an innocent class name
            {"class_name": "Dense", "config": {"name": "d", "function": ["4wEAAAAA", None, None]}},
            "marshalled Python bytecode",
        ),
        (
            {"class_name": "Dense", "config": {"name": "d", "activation": _function("os", "system")}},
            "'system' of 'os'",
        ),
        (  # a tf_keras module, but not one of its activations
            {"class_name": "Dense", "config": {"name": "d", "activation": _function("keras.utils", "func_load")}},
            "'func_load' of 'keras.utils'",
        ),
        (  # a Lambda deep inside a nested model
            {
                "class_name": "Functional",
                "config": {"name": "inner", "layers": [{"class_name": "Lambda", "config": {}}]},
            },
            "'inner' is a Lambda",
        ),
        ({"class_name": "__typespec__", "spec_name": "X", "module": "planted", "config": {}}, "'__typespec__'"),
        ({"class_name": "Dense", "config": {"name": "d"}, "registered_name": "elsewhere>Dense"}, "'elsewhere>Dense'"),
    ],
)
def test_handmade_configs_with_code_are_refused(layer, named, tmp_path):
    path = tmp_path / "handmade.keras"
    model = {"class_name": "Functional", "module": "keras", "config": {"name": "m", "layers": [layer]}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(model))
    with pytest.raises(ModelError, match="refused") as caught:
        check_model_file(path)
    assert named in str(caught.value)


def test_compile_configs_and_deep_nesting_are_checked_too(tmp_path):
    path = tmp_path / "compiled.keras"
    compiled = {"class_name": "Functional", "config": {}, "compile_config": {"loss": _function("builtins", "exec")}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(compiled))
    with pytest.raises(ModelError, match="'exec' of 'builtins'"):
        check_model_file(path)
    deep = tmp_path / "deep.keras"
    with zipfile.ZipFile(deep, "w") as archive:
        archive.writestr("config.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelError, match="nested too deeply"):
        check_model_file(deep)


def test_a_savedmodel_folder_without_keras_metadata_is_not_loaded(tmp_path):
    folder = tmp_path / "graph_only"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"\x08\x01")
    with pytest.raises(ModelError, match=r"without model\.keras or keras_metadata\.pb"):
        load_model(folder)


def _weights_only_h5(path: Path) -> None:
    with h5py.File(path, "w") as h5:
        h5["kernel"] = np.zeros(3)


def _h5_with_config(path: Path) -> None:
    _weights_only_h5(path)
    with h5py.File(path, "r+") as h5:
        h5.attrs["model_config"] = "{not json"


def _zip_without_config(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", "{}")


def _metadata(content: bytes):
    def write(folder: Path) -> None:
        folder.mkdir()
        (folder / "keras_metadata.pb").write_bytes(content)

    return write


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("weights.h5", _weights_only_h5, "an HDF5 file without model_config"),
        ("config.h5", _h5_with_config, "its model_config is not JSON"),
        ("empty.keras", _zip_without_config, "a zip without config.json"),
        ("garbage", _metadata(b"\xff\xff\xff\xff"), "unreadable keras_metadata.pb"),
        ("no_nodes", _metadata(b""), "describes no Keras object"),
    ],
)
def test_files_that_are_no_keras_model_are_refused_in_one_line(name, write, message, tmp_path):
    write(tmp_path / name)
    with pytest.raises(ModelError, match=message) as caught:
        load_model(tmp_path / name)
    assert "\n" not in str(caught.value)


def test_the_teacher_is_checked(hostile):
    with pytest.raises(ModelError, match=r"^--teacher: model .*evil\.h5 refused: layer 'payload' is a Lambda"):
        load_teacher(str(hostile["h5"]), 32)
    assert not hostile["marker"].exists()


# ---------------------------------------------------------------- what still loads


def test_our_models_still_load_checked(tmp_path):
    """Compiled (BalancedAccuracy, Adam), FusionLayer with a calibration temperature, .keras and .h5."""
    student = build_student(32, 2)
    compile_model(student, 1e-3)
    set_temperature(student, 1.7)
    x = {"image": np.zeros((1, 32, 32, 3), np.float32), "metadata": np.zeros((1, 28), np.float32)}
    reloaded = load_model(save_model(student, tmp_path / "student"))
    assert reloaded.get_layer("fusion").temperature == pytest.approx(1.7)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), student.predict(x, verbose=0), rtol=1e-5)
    student.save(str(tmp_path / "student.h5"))
    assert load_model(tmp_path / "student.h5").name == "student"


def test_trust_model_code_loads_a_model_its_author_trusts(hostile, prepared, tmp_path, capsys):
    try:
        assert load_model(hostile["h5"], trust_code=True).get_layer("payload")
        assert hostile["marker"].exists()  # the user asked for it: the Lambda ran
        hostile["marker"].unlink()
        with pytest.raises(ModelError, match="takes"):  # loaded (safe_mode off), then refused for its inputs
            load_teacher(str(hostile["keras"]), 32, trust_code=True)
        assert hostile["marker"].exists()
        hostile["marker"].unlink()
        output = str(tmp_path / "o")
        argv = ["--model", str(hostile["h5"]), "--manifest", str(prepared.manifest_path), "--output", output]
        assert evaluate.main([*argv, "--trust-model-code"]) == 2  # loaded; not this job's inputs
        assert "does not take this job's inputs" in capsys.readouterr().err
        assert hostile["marker"].exists()
    finally:
        hostile["marker"].unlink(missing_ok=True)


# ---------------------------------------------------------------- the command lines


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr[-3000:]
    assert "Traceback" not in stderr
    return errors[0]


# tools.evaluate --model evil.h5 in-process: tests/test_probes.py


@pytest.mark.slow
def test_cli_refuses_a_lambda_teacher_before_training(hostile, prepared, tmp_path):
    data = ["--manifest", str(prepared.manifest_path), "--cache-dir", str(tmp_path / "cache"), "--image-size", "32"]
    run = ["--output", str(tmp_path / "runs"), "--run-id", "r", "--weights", "none", "-e", "1", "--no-tracking"]
    out = subprocess.run(
        [sys.executable, "cli.py", *data, *run, "-d", "--teacher", str(hostile["h5"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "--teacher: model" in _one_error_line(out.stderr)
    assert not hostile["marker"].exists()
    assert not list((tmp_path / "runs").rglob("model.keras"))  # refused before training


# ---------------------------------------------------------------- saving


def test_a_full_disk_keeps_the_previous_model_and_no_partial_file(tmp_path, monkeypatch):
    from tf_keras.src.saving import saving_lib

    student = build_student(32, 2)
    folder = tmp_path / "model"
    path = save_model(student, folder)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):  # after metadata and config went into the zip: a partial file exists
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving_lib, "_save_state", full_disk)
    with pytest.raises(ModelSaveError) as caught:
        save_model(student, folder)
    message = str(caught.value)
    assert str(path) in message and "disk is full" in message and "same --run-id" in message, message
    assert caught.value.exit_code == 1 and "\n" not in message
    assert [p.name for p in folder.iterdir()] == ["model.keras"] and path.read_bytes() == before
    fresh = tmp_path / "fresh"
    with pytest.raises(ModelSaveError):
        save_model(student, fresh)
    assert list(fresh.iterdir()) == []
