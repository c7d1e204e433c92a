"""Every --backbone takes raw 0..255 RGB pixels and preprocesses them inside the model exactly as its
application's own `preprocess_input` does; weights load one way for each; the models save and reload
through the trust check (MobileNetV3's arithmetic TF-op layers, ResNet50's channel reversal)."""

import numpy as np
import pytest
import tf_keras

from utilities.backbones import backbone, backbone_of, build_backbone, display_name, preprocess
from utilities.data import feature_cache
from utilities.model import ModelError, build_model, load_model, save_model
from utilities.run.config import BACKBONES, ModelConfig
from utilities.run.fields import ConfigError

# The applications module whose preprocess_input each backbone's ImageNet weights were trained with.
OFFICIAL = {
    "densenet121": tf_keras.applications.densenet,
    **{f"efficientnetb{i}": tf_keras.applications.efficientnet for i in range(4)},
    "resnet50": tf_keras.applications.resnet50,
    "mobilenetv2": tf_keras.applications.mobilenet_v2,
    "mobilenetv3small": tf_keras.applications.mobilenet_v3,
}
SIZE = 32


def _pixels(n=4, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _inputs(n=4, seed=0) -> dict[str, np.ndarray]:
    return {
        "image": _pixels(n, seed),
        "metadata": np.random.default_rng(seed).integers(0, 2, (n, 28)).astype("float32"),
    }


@pytest.mark.parametrize("name", BACKBONES)
def test_preprocessing_inside_the_model_is_the_applications_own(name):
    assert set(OFFICIAL) == set(BACKBONES)
    image = tf_keras.Input((SIZE, SIZE, 3))
    ours = tf_keras.Model(image, preprocess(image, name))
    x = _pixels()
    official = OFFICIAL[name].preprocess_input(x.copy())
    np.testing.assert_allclose(ours.predict(x, verbose=0), official, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["efficientnetb0", "mobilenetv3small"])
def test_applications_that_preprocess_themselves_rescale_their_raw_input(name):
    """Their preprocess_input is the identity (checked above) because their first layer rescales 0..255."""
    assert backbone(name).preprocessing == "inside"
    network = build_backbone(name, "none", SIZE)
    assert isinstance(network.layers[1], tf_keras.layers.Rescaling), [layer.name for layer in network.layers[:3]]


def test_a_weights_file_loads_into_the_backbone_by_its_arrays(tmp_path):
    source = build_backbone("mobilenetv3small", "none", SIZE)
    source.save_weights(tmp_path / "weights.h5")
    model = build_model(ModelConfig(backbone="mobilenetv3small", weights=str(tmp_path / "weights.h5")), SIZE)
    for got, want in zip(backbone_of(model).get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ModelError, match="cannot load MobileNetV3Small weights"):  # DenseNet's arrays do not fit
        build_model(ModelConfig(backbone="mobilenetv3small", weights=str(_densenet_weights(tmp_path))), SIZE)


def _densenet_weights(tmp_path):
    path = tmp_path / "densenet.h5"
    build_backbone("densenet121", "none", SIZE).save_weights(path)
    return path


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv3small"])
def test_models_of_other_backbones_save_and_reload_through_the_trust_check(name, tmp_path):
    model = build_model(ModelConfig(backbone=name, weights="none", fcnn_nodes=8), SIZE)
    x = _inputs()
    reloaded = load_model(save_model(model, tmp_path))  # the config is checked before anything is rebuilt
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert backbone_of(reloaded).name == backbone_of(model).name


def test_the_feature_cache_reads_features_after_the_backbones_own_preprocessing():
    model = build_model(ModelConfig(backbone="resnet50", weights="none", fine_tune=False, fcnn_nodes=8), SIZE)
    x = _pixels()
    features = feature_cache.feature_extractor(model).predict({"image": x}, verbose=0)
    direct = backbone_of(model)(tf_keras.applications.resnet50.preprocess_input(x.copy()), training=False)
    assert features.shape == (4, 2048) and features.std() > 0
    np.testing.assert_allclose(features, direct.numpy(), rtol=1e-4, atol=1e-4)
    head = feature_cache.head_model(model)
    np.testing.assert_allclose(
        head.predict({"features": features, "metadata": np.zeros((4, 28), "float32")}, verbose=0),
        model.predict({"image": x, "metadata": np.zeros((4, 28), "float32")}, verbose=0),
        atol=1e-5,
    )


def test_backbone_names_are_checked_and_named_as_their_papers_do():
    assert display_name("mobilenetv3small") == "MobileNetV3Small" and display_name("future") == "future"
    with pytest.raises(ConfigError, match="--backbone must be one of densenet121, efficientnetb0"):
        ModelConfig(backbone="vgg16")
    with pytest.raises(ModelError, match="--backbone 'vgg16' is not one of"):
        backbone("vgg16")
