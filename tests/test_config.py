"""Rules over several fields of the Config (no TensorFlow here)."""

import pytest

from utilities.config import Config, ConfigError


def _compression(**fields) -> Config:
    return Config().replace(compression=fields)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, False),
        ({"prune": True}, True),
        ({"distill": True}, True),
        ({"quantize": ("dynamic",)}, True),
        ({"target_sparsity": 0.9, "temperature": 2.0}, False),  # settings of a variant, not a variant
    ],
)
def test_compression_is_enabled_by_any_variant(fields, expected):
    assert _compression(**fields).compression.enabled is expected


def test_variants_that_train_need_training_examples():
    everything = _compression(prune=True, distill=True, quantize=("dynamic", "int8"))
    with pytest.raises(ConfigError) as caught:
        everything.check_train_examples(0)
    assert str(caught.value) == "-p, -d, -q int8 need training examples, but the train split is empty"
    with pytest.raises(ConfigError, match=r"^-d need training examples"):
        _compression(distill=True).check_train_examples(0)
    everything.check_train_examples(1)
    _compression(quantize=("dynamic", "float16")).check_train_examples(0)  # no calibration data needed
    Config().check_train_examples(0)
