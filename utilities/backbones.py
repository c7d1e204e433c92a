"""The image branch's backbones: `tf_keras.applications` networks without top, average-pooled.

    network = build_backbone("efficientnetb0", weights="none", image_size=64)
    features = network(preprocess(image, "efficientnetb0"))  # image: raw 0..255 RGB

Each takes raw 0..255 RGB pixels: its own ImageNet preprocessing is part of the model, as built-in layers
(DenseNet's "torch" normalisation, ResNet's "caffe" BGR mean subtraction, MobileNetV2's "tf" scaling to
[-1, 1]; EfficientNet and MobileNetV3 carry theirs inside the application), so a saved, served or TFLite
model needs nothing around it. Weights load one way for every backbone: `imagenet` (Keras' download),
`none` (random), or a weights file read by the application's own `load_weights` (arrays only: no config
in it is deserialised). Which backbone a model holds is found from the model (`backbone_of`), never from
a layer name, so every consumer (feature cache, pruning, Grad-CAM scripts) works for each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
import tf_keras

from utilities.errors import one_line
from utilities.model_trust import ModelError
from utilities.run.config import BACKBONES

# ImageNet statistics: "torch" mode (DenseNet) divides by 255 then standardises (RGB); "caffe" (ResNet50)
# subtracts Caffe's own means (0..255, BGR order) from BGR pixels.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass(frozen=True)
class Backbone:
    application: str  # the tf_keras.applications constructor
    preprocessing: str  # torch | caffe | tf | inside (the application rescales its input itself)


_REGISTRY = {
    "densenet121": Backbone("DenseNet121", "torch"),
    "efficientnetb0": Backbone("EfficientNetB0", "inside"),
    "efficientnetb1": Backbone("EfficientNetB1", "inside"),
    "efficientnetb2": Backbone("EfficientNetB2", "inside"),
    "efficientnetb3": Backbone("EfficientNetB3", "inside"),
    "resnet50": Backbone("ResNet50", "caffe"),
    "mobilenetv2": Backbone("MobileNetV2", "tf"),
    "mobilenetv3small": Backbone("MobileNetV3Small", "inside"),
}
assert tuple(_REGISTRY) == BACKBONES, "utilities.run.config.BACKBONES names the registry's keys"


def backbone(name: str) -> Backbone:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"--backbone {name!r} is not one of {', '.join(BACKBONES)}") from None


def display_name(name: str) -> str:
    """The backbone as its paper names it ('DenseNet121', 'MobileNetV3Small'); an unknown name as given."""
    return _REGISTRY[name].application if name in _REGISTRY else name


@tf_keras.utils.register_keras_serializable(package="dermaid")
class ReverseChannels(tf_keras.layers.Layer):
    """RGB → BGR (the last axis reversed): what Caffe-trained weights (ResNet50) expect."""

    def call(self, image):
        return tf.reverse(image, axis=[-1])


def preprocess(image: tf.Tensor, name: str) -> tf.Tensor:
    """Raw 0..255 RGB pixels → the input `name`'s ImageNet weights were trained on (built-in layers)."""
    mode = backbone(name).preprocessing
    if mode == "torch":
        scaled = tf_keras.layers.Rescaling(1.0 / 255.0, name="scale_0_1")(image)
        variance = [s * s for s in _IMAGENET_STD]
        return tf_keras.layers.Normalization(mean=_IMAGENET_MEAN, variance=variance, name="imagenet_norm")(scaled)
    if mode == "caffe":
        bgr = ReverseChannels(name="rgb_to_bgr")(image)
        return tf_keras.layers.Normalization(mean=_CAFFE_MEAN_BGR, variance=[1.0] * 3, name="caffe_mean")(bgr)
    if mode == "tf":
        return tf_keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_minus1_1")(image)
    return image


def build_backbone(name: str, weights: str, image_size: int) -> tf_keras.Model:
    """`name` without top, average-pooled (B, width). `weights`: imagenet | none | a weights file path."""
    spec = backbone(name)
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise ModelError(f"--weights {weights!r} is neither 'imagenet', 'none' nor an existing weights file")
    constructor = getattr(tf_keras.applications, spec.application)
    try:
        return constructor(
            include_top=False,
            weights=None if weights == "none" else weights,
            input_shape=(image_size, image_size, 3),
            pooling="avg",
        )
    except Exception as exc:  # download failure, wrong file, wrong shapes
        raise ModelError(f"cannot load {spec.application} weights {weights!r}: {one_line(exc)}") from exc


def backbone_of(model: tf_keras.Model) -> tf_keras.Model:
    """The nested backbone of a model build_model made (whatever its name): its one inner Model."""
    inner = [layer for layer in model.layers if isinstance(layer, tf_keras.Model)]
    if len(inner) != 1:
        raise ModelError(f"model {model.name!r} has {len(inner)} nested models; build_model's layout has one backbone")
    return inner[0]


__all__ = ["Backbone", "ReverseChannels", "backbone", "backbone_of", "build_backbone", "display_name", "preprocess"]
