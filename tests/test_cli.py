"""Flag parsing, environment → Config, and exit codes of cli.py (no training here)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from utilities.run.config import Config, ModelConfig, sections
from utilities.run.fields import ConfigError, source

ROOT = Path(__file__).resolve().parents[1]


def config(argv, env=None):
    return cli.config_from_args(cli.build_parser().parse_args(argv), env or {"HOME": "/nonexistent"})


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], False),
        (["-x"], True),
        (["-x", "True"], True),
        (["-x", "False"], False),
        (["-x", "0"], False),
        (["--tracking"], True),
        (["-x", "--no-tracking"], False),
        (["--tracking=yes"], True),
    ],
)
def test_tracking_flag_parses_booleans_correctly(argv, expected):
    assert config(argv).tracking.enabled is expected


def test_original_short_flags_and_defaults():
    c = config(
        [
            "-b",
            "32",
            "-e",
            "3",
            "-l",
            "0.001",
            "-f",
            "64",
            "-n",
            "m1",
            "-g",
            "2",
            "-p",
            "-d",
            "-q",
            "int8",
            "-q",
            "dynamic",
            "-q",
            "int8",
        ]
    )
    assert (c.train.batch_size, c.train.epochs, c.train.learning_rate, c.model.fcnn_nodes) == (32, 3, 0.001, 64)
    assert (c.output.model_name, c.train.gpus, c.compression.prune, c.compression.distill) == ("m1", 2, True, True)
    assert c.compression.quantize == ("int8", "dynamic")
    d = config([])
    assert (d.train.batch_size, d.train.epochs, d.train.learning_rate, d.model.fcnn_nodes, d.train.gpus) == (
        64,
        10,
        1e-4,
        1024,
        1,
    )
    # The original fine-tuned the whole DenseNet121; the frozen backbone (its teacher) is asked for.
    assert d.model.fine_tune is True and d.model.weights == "imagenet"
    assert config(["--freeze-backbone"]).model.fine_tune is False and config(["--fine-tune"]).model.fine_tune is True


def test_original_long_spellings_and_valued_switches():
    c = config(
        [
            "--batch_size",
            "32",
            "--num_gpus",
            "2",
            "--learning_rate",
            "0.01",
            "--fcnn_nodes",
            "8",
            "--model_name",
            "m",
            "--experiment_tracking",
            "False",
            "--pruning",
            "True",
            "--distillation",
            "1",
        ]
    )
    assert (c.train.batch_size, c.train.gpus, c.train.learning_rate, c.model.fcnn_nodes) == (32, 2, 0.01, 8)
    assert (c.output.model_name, c.tracking.enabled, c.compression.prune, c.compression.distill) == (
        "m",
        False,
        True,
        True,
    )
    for argv, expected in (
        (["-p"], True),
        (["-p", "True"], True),
        (["-p", "TRUE"], True),
        (["-p", "yes"], True),
        (["-p", "False"], False),
        (["-p", "no"], False),
        (["-p", "0"], False),
        ([], False),
    ):
        assert config(argv).compression.prune is expected, argv
        assert config([a.replace("-p", "-d") for a in argv]).compression.distill is expected, argv
    both = config(["-p", "-d", "True", "-x", "false"])
    assert (both.compression.prune, both.compression.distill, both.tracking.enabled) == (True, True, False)


def test_tracking_is_on_exactly_when_a_key_is_available(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert config([], {**home, "WANDB_API_KEY": "k" * 40}).tracking.enabled is True
    assert config(["-x", "False"], {**home, "WANDB_API_KEY": "k" * 40}).tracking.enabled is False
    assert config(["--no-tracking"], {**home, "WANDB_API_KEY": "k" * 40}).tracking.enabled is False
    assert config([], home).tracking.enabled is False
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert config([], home).tracking.enabled is True  # `wandb login` wrote the key there
    enabled, line = cli.tracking_choice(None, {"HOME": str(tmp_path / "nowhere")})
    assert not enabled and "no W&B key" in line and "\n" not in line


def test_contradicting_backbone_flags_are_refused():
    with pytest.raises(ValueError, match="contradict"):
        config(["--freeze-backbone", "--fine-tune"])


def test_environment_is_read_into_config():
    env = {
        "GCS_BUCKET_NAME": "bkt",
        "DVC_TAG": "dataset_v02",
        "AIP_MODEL_DIR": "gs://bkt/aip/model",
        "AIP_CHECKPOINT_DIR": "/ckpt",
        "CLOUD_ML_HP_METRIC_FILE": "/tmp/hp",
        "WANDB_API_KEY": "k" * 40,
        "DERMAID_GIT_COMMIT": "0123abc",  # baked into images by the Dockerfile
    }
    c = config([], env)
    assert c.cluster.code_commit == "0123abc" and config([], {}).cluster.code_commit is None
    assert c.output.output == "gs://bkt/models" and c.data.data_tag == "dataset_v02"
    assert c.output.model_dir == "gs://bkt/aip/model" and c.output.checkpoint_dir == "/ckpt"
    assert c.tracking.mode == "online"
    assert "k" * 40 not in json.dumps(c.to_dict())  # the key stays in the environment only
    assert config([], {}).tracking.mode == "offline"


def test_vertex_cluster_spec_becomes_tf_config():
    spec = {
        "cluster": {"workerpool0": ["a:2222"], "workerpool1": ["b:2222"]},
        "task": {"type": "workerpool1", "index": 0},
    }
    tf_config = json.loads(cli.tf_config_from_env({"CLUSTER_SPEC": json.dumps(spec)}))
    assert tf_config == {"cluster": {"chief": ["a:2222"], "worker": ["b:2222"]}, "task": {"type": "worker", "index": 0}}
    single = {"cluster": {"workerpool0": ["a:2222"]}, "task": {"type": "workerpool0", "index": 0}}
    assert cli.tf_config_from_env({"CLUSTER_SPEC": json.dumps(single)}) is None


def test_each_run_gets_a_new_run_id():
    assert config([]).output.run_id != config([]).output.run_id


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-b", "7", "-g", "2"], "not divisible"),
        (["-g", "0"], "-g 1 is one replica, the CPU on a machine without GPUs"),  # the original: -g 0 on a CPU
        (["--image-size", "16"], "minimum"),
        (["--target-sparsity", "1.5"], "target-sparsity"),
        (["-q", "int4"], "invalid choice"),
        (["-x", "maybe"], "true/false"),
        (["-p", "maybe"], "true/false"),
        (["--gate", "test.accuracy.ci95_low > 0.5"], "is not a metric"),
        (["--operating-point", "0.9"], "invalid choice"),
        (["--distillation", "2"], "true/false"),
        (["--bogus"], "unrecognized"),
        (["-e", "0"], "epochs"),
        (["-n", "../escape"], "model-name"),
        (["--teacher", "teacher.keras"], "only used with -d"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message):
    out = subprocess.run([sys.executable, "cli.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("script", ["cli.py", "training.py"])
def test_training_py_is_the_same_command_as_cli_py(script):
    """The original README runs `python training.py`; it must train, not import TensorFlow and exit 0."""
    help_out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert help_out.returncode == 0 and "--batch_size" in help_out.stdout and "--freeze-backbone" in help_out.stdout
    bad = subprocess.run([sys.executable, script, "-p", "maybe"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "true/false" in bad.stderr.strip().splitlines()[-1]


def test_help_is_fast_and_does_not_import_tensorflow():
    code = "import sys, cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\nassert 'tensorflow' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--manifest" in out.stdout and "default: 64" in out.stdout


def test_an_endless_manifest_is_refused_before_reading(tmp_path):
    out = subprocess.run(
        [sys.executable, "cli.py", "--manifest", "/dev/zero", "--output", str(tmp_path), "--weights", "none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "/dev/zero" in out.stderr.strip().splitlines()[-1], out.stderr[-2000:]


def test_missing_manifest_says_to_pull(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "cli.py",
            "--manifest",
            str(tmp_path / "none.pickle"),
            "--output",
            str(tmp_path / "out"),
            "--weights",
            "none",
            "--image-size",
            "32",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},  # as a user's shell
    )
    assert out.returncode == 2, out.stderr
    assert "dvc_pull.sh" in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    # TensorFlow's C++ start-up lines (absl's banner, the CUDA probe's "failed call to cuInit") are dropped.
    assert out.stderr.count("\n") == 2 and " INFO dermaid: W&B tracking off" in out.stderr, out.stderr


# ---------------------------------------------------------------- flags declared on the Config fields

# Fields without a flag: filled from the environment by cli.py, or (staging_dir) not settable.
ENV_ONLY = {
    "output.model_dir",
    "output.checkpoint_dir",
    "output.tensorboard_dir",
    "output.hp_metric_file",
    "tracking.mode",
    "tracking.wandb_dir",
    "cluster.tf_config",
    "cluster.gcp_project",
    "cluster.bucket",
    "cluster.code_commit",
}
NOT_SETTABLE = {"output.staging_dir"}  # local staging of a gs:// run; no flag, no variable


def declared_fields():
    for name, _, section in sections():
        for f in dataclasses.fields(section):
            yield f"{name}.{f.name}", f, source(f)


def test_every_field_has_a_flag_with_help_except_the_documented_ones():
    help_text = cli.build_parser().format_help()
    without_flag = set()
    for key, _, src in declared_fields():
        if src is None or not src.flags:
            without_flag.add(key)
            assert (src is not None and src.env) or key in NOT_SETTABLE, key
            continue
        for declared in src.flags:
            assert declared.help.strip() and len(declared.help) > 5, key
            assert all(name in help_text for name in declared.names), key
    assert without_flag == ENV_ONLY | NOT_SETTABLE


def test_no_flags_and_no_environment_give_the_dataclass_defaults():
    got, want = config([], {"HOME": "/nonexistent"}), Config()
    for key, f, _ in declared_fields():
        section = key.split(".")[0]
        value, default = getattr(getattr(got, section), f.name), getattr(getattr(want, section), f.name)
        if key == "output.run_id":  # a new time-stamped id
            assert value and value != default
        else:
            assert value == default and type(value) is type(default), key


def _sample(f, declared):
    """An argv giving the flag a value other than its default."""
    options = declared.options
    if options.get("action") is not None and options.get("action") != "append":
        return []
    if "choices" in options:  # one that is not the default, as typed on a command line
        return [str(next(c for c in reversed(options["choices"]) if c != f.default))]
    if options.get("nargs") == "?":
        return ["yes" if f.default is False else "no"]
    if f.type in ("int", "float"):
        return [str(f.default + 1 if f.type == "int" else (f.default / 2 or 0.5))]
    return [(f.default or "") + "x"]


def test_every_alias_parses_like_the_main_spelling():
    parser = cli.build_parser()
    defaults = vars(parser.parse_args([]))
    checked = 0
    for key, f, src in declared_fields():
        for declared in src.flags if src else ():
            main = next(n for n in declared.names if n.startswith("--"))
            value = _sample(f, declared)
            expected = vars(parser.parse_args([main, *value]))
            assert expected != defaults, main  # the sample changes something
            for alias in declared.names:
                assert vars(parser.parse_args([alias, *value])) == expected, (key, alias)
                checked += 1
            if declared.options.get("nargs") == "?":  # -p, -x: also without a value
                assert all(vars(parser.parse_args([a])) == vars(parser.parse_args([main])) for a in declared.names)
    assert checked >= 50


def test_flags_that_contradict_are_refused_in_the_config_layer():
    model = {f.name: source(f) for f in dataclasses.fields(ModelConfig)}
    with pytest.raises(ConfigError, match="--freeze-backbone and --fine-tune contradict each other"):
        model["fine_tune"].pick([False, True])
    assert model["fine_tune"].pick([None, None]) is None and model["fine_tune"].pick([False, None]) is False


def test_keep_checkpoints_is_an_off_by_default_switch_named_in_help():
    assert config([]).output.keep_checkpoints is False
    assert config(["--keep-checkpoints"]).output.keep_checkpoints is True
    assert config(["--keep-checkpoints", "no"]).output.keep_checkpoints is False
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "--keep-checkpoints [BOOL]" in help_text and "AIP_CHECKPOINT_DIR" in help_text
    assert "(default: removed once run.json and latest.json are written)" in help_text


class _Recording(dict):
    """An environment that remembers which variables were read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def test_the_environment_is_read_only_through_the_variables_fields_declare():
    declared = {name for _, _, src in declared_fields() if src for name in src.env}
    env = _Recording({"GCS_BUCKET_NAME": "bkt", "WANDB_MODE": "online", "UNRELATED": "x", "HOME": "/nonexistent"})
    config, notes = cli.resolve(cli.build_parser().parse_args([]), env)
    assert env.read <= declared and "UNRELATED" not in env.read
    assert {"CLUSTER_SPEC", "WANDB_API_KEY", "NETRC"} <= env.read  # the derivations' inputs, declared on their fields
    assert config.output.output == "gs://bkt/models" and config.tracking.mode == "offline"
    assert any("WANDB_MODE=online without a W&B key" in note for note in notes)


@pytest.mark.parametrize(
    ("bucket", "output"),
    [
        ("bkt", "gs://bkt/models"),
        ("gs://bkt/", "gs://bkt/models"),
        ("my.dotted-bucket_1", "gs://my.dotted-bucket_1/models"),
        ("./outputs", "./outputs"),
        ("/mnt/out", "/mnt/out"),
    ],
)
def test_a_bucket_becomes_the_output_once_in_cli(bucket, output):
    assert config([], {"GCS_BUCKET_NAME": bucket, "HOME": "/nonexistent"}).output.output == output
    given = config(["--output", "gs://other/x"], {"GCS_BUCKET_NAME": bucket, "HOME": "/nonexistent"})
    assert given.output.output == "gs://other/x"  # a flag wins over the variable


@pytest.mark.parametrize("bucket", ["gs://bkt/models", "https://storage.googleapis.com/bkt", "B", "my bucket"])
def test_a_bucket_that_is_not_a_bucket_name_is_refused(bucket):
    with pytest.raises(ConfigError, match="is not a bucket name"):
        config([], {"GCS_BUCKET_NAME": bucket, "HOME": "/nonexistent"})


def test_wandb_mode_follows_the_key(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert cli.tracking_mode({**home, "WANDB_API_KEY": "k" * 40}) == ("online", None)
    assert cli.tracking_mode(home) == ("offline", None)
    assert cli.tracking_mode({**home, "WANDB_MODE": "disabled"}) == ("disabled", None)
    mode, note = cli.tracking_mode({**home, "WANDB_MODE": "online"})
    assert mode == "offline" and "without a W&B key" in note
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n")
    assert cli.tracking_mode(home) == ("online", None)  # `wandb login` is a key too
