"""Training-time augmentation of batches, seeded per batch: the dermoscopy symmetries (flips, quarter turns) with
small rotations, shifts and zooms; colour jitter; cutout; and metadata dropout (each of age, site and sex
set to its unknown encoding, all zeros, at random — Gessert et al.'s ISIC 2019 recipe).

Library module (no command line); `utilities.data.pipeline` and `utilities.data.feature_cache` apply it:

    batches = augment_dataset(batches, batch_seeds(seed))   # batch i augmented from (seed, i) alone

Stateless random ops throughout: the same seed gives the same images on any run or resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class Augmentation:
    """Random changes of training batches; lesions have no canonical orientation, colour or framing."""

    flip: bool = True  # horizontal and vertical, each with p = 0.5
    quarter_turns: bool = True  # a random multiple of 90° on top of `rotation`: with the flips, the dihedral group
    rotation: float = 0.1  # max |angle| as a fraction of a full turn (0.1 → ±36°)
    shift: float = 0.1  # max |translation| as a fraction of the side
    zoom: float = 0.1  # max relative change of scale (0.1 → 0.9×..1.1×)
    colour: float = (
        0.0  # jitter strength s: brightness and contrast ×U(1−s, 1+s), saturation ×U(1−2s, 1+2s), hue ±s/2 turn
    )
    cutout: float = 0.0  # side of one square set to the image's mean colour, as a fraction of the side (0: none)
    metadata_dropout: float = 0.0  # probability that each of age, site and sex is made unknown

    @property
    def geometric(self) -> bool:
        return bool(self.flip or self.quarter_turns or self.rotation or self.shift or self.zoom)


def _affine(
    batch: tf.Tensor, height: tf.Tensor, width: tf.Tensor, aug: Augmentation, seeds: tf.Tensor, flips: tf.Tensor
) -> tf.Tensor:
    """Per-image transforms [B, 8] mapping output pixel → input pixel (ImageProjectiveTransformV3 convention).

    `flips` bool [B, 2] (left-right, up-down) mirror the input image first, folded into the same
    transform: x_in → (W-1) - x_in is a sign change plus an offset, so a flip costs nothing extra.
    """
    angle = tf.random.stateless_uniform([batch], seeds[0], -aug.rotation * 2 * math.pi, aug.rotation * 2 * math.pi)
    if aug.quarter_turns:
        turns = tf.random.stateless_uniform([batch], seeds[6], 0, 4, dtype=tf.int32)
        angle += tf.cast(turns, tf.float32) * (math.pi / 2)
    scale = tf.random.stateless_uniform([batch], seeds[1], 1 - aug.zoom, 1 + aug.zoom)  # > 1 zooms in
    tx = tf.random.stateless_uniform([batch], seeds[2], -aug.shift, aug.shift) * width
    ty = tf.random.stateless_uniform([batch], seeds[3], -aug.shift, aug.shift) * height
    cx, cy = (width - 1) / 2, (height - 1) / 2  # rotate and zoom about the image centre
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    sign = tf.where(flips, -1.0, 1.0)  # [B, 2]
    offset = tf.where(flips, tf.stack([width - 1, height - 1]), 0.0)  # [B, 2]
    sx, sy, ox, oy = sign[:, 0], sign[:, 1], offset[:, 0], offset[:, 1]
    zero = tf.zeros_like(angle)
    return tf.stack(
        [
            sx * cos,
            -sx * sin,
            sx * (cx - cos * cx + sin * cy - tx) + ox,
            sy * sin,
            sy * cos,
            sy * (cy - sin * cx - cos * cy - ty) + oy,
            zero,
            zero,
        ],
        axis=1,
    )


_SEEDS = 12  # independent streams per batch: 0-3 affine, 4-5 flips, 6 quarter turns, 7-9 colour, 10-11 cutout
# RGB → YIQ and back: a hue rotation is a rotation of the (I, Q) plane (luma Y kept)
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _jitter_colour(images: tf.Tensor, strength: float, seeds: tf.Tensor) -> tf.Tensor:
    """Per-image brightness, contrast, saturation and hue, on 0..255 pixels; clipped back to 0..255."""
    batch = tf.shape(images)[0]

    def factor(seed, spread):
        return tf.random.stateless_uniform([batch, 1, 1, 1], seed, 1 - spread, 1 + spread)

    brightness_contrast = tf.random.experimental.stateless_split(seeds[7], 2)
    images = images * factor(brightness_contrast[0], strength)
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = (images - mean) * factor(brightness_contrast[1], strength) + mean
    grey = tf.reduce_mean(images, axis=3, keepdims=True)
    images = grey + (images - grey) * factor(seeds[8], min(2 * strength, 1.0))
    angle = tf.random.stateless_uniform([batch], seeds[9], -math.pi * strength, math.pi * strength)
    cos, sin, one, zero = tf.cos(angle), tf.sin(angle), tf.ones_like(angle), tf.zeros_like(angle)
    rotate = tf.reshape(tf.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], axis=1), [-1, 3, 3])
    yiq = tf.constant(_YIQ, tf.float32)
    mix = tf.linalg.inv(yiq)[None] @ rotate @ yiq[None]  # [B, 3, 3]: RGB → rotated-hue RGB
    images = tf.einsum("bhwc,bdc->bhwd", images, mix)
    return tf.clip_by_value(images, 0.0, 255.0)


def _cut_out(images: tf.Tensor, fraction: float, seeds: tf.Tensor) -> tf.Tensor:
    """One square of side `fraction` × the side per image, at a random centre, set to that image's mean colour."""
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    cy = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[10]) * tf.cast(height, tf.float32)
    cx = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[11]) * tf.cast(width, tf.float32)
    half = fraction * tf.cast(tf.minimum(height, width), tf.float32) / 2
    ys = tf.cast(tf.range(height), tf.float32)[None, :, None, None]
    xs = tf.cast(tf.range(width), tf.float32)[None, None, :, None]
    inside = (tf.abs(ys + 0.5 - cy) <= half) & (tf.abs(xs + 0.5 - cx) <= half)  # [B, H, W, 1]
    return tf.where(inside, tf.reduce_mean(images, axis=[1, 2], keepdims=True), images)


def augment_images(images: tf.Tensor, seed: tf.Tensor, aug: Augmentation = Augmentation()) -> tf.Tensor:
    """float32 [B,H,W,3] 0..255 → same shape: colour-jittered, then flipped/turned/rotated/shifted/zoomed, then
    cut out (each when on); `seed` int [2] (stateless ops).

    One bilinear resampling per batch does all the geometry: the flips and quarter turns are folded into the
    affine transform (mirroring with tf.reverse + tf.where cost as much as the whole transform).
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), _SEEDS)
    if aug.colour:
        images = _jitter_colour(images, aug.colour, seeds)
    if aug.geometric:
        shape = tf.shape(images)
        batch, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        if aug.flip:
            left_right = tf.random.stateless_uniform([batch], seeds[4]) < 0.5
            up_down = tf.random.stateless_uniform([batch], seeds[5]) < 0.5
            flips = tf.stack([left_right, up_down], axis=1)  # [B, 2]
        else:
            flips = tf.zeros([batch, 2], tf.bool)
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=_affine(batch, height, width, aug, seeds, flips),
            output_shape=shape[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",  # no black corners: the skin continues
        )
    if aug.cutout:
        images = _cut_out(images, aug.cutout, seeds)
    return images


def drop_metadata(metadata: tf.Tensor, probability: float, seed: tf.Tensor) -> tf.Tensor:
    """(B, 28) multi-hot → each of its age, site and sex groups zeroed (unknown) with `probability`, per image."""
    from utilities.data.schema import AGE_BINS, SEXES, SITES

    sizes = (len(AGE_BINS), len(SITES), len(SEXES))
    keep = tf.random.stateless_uniform([tf.shape(metadata)[0], len(sizes)], seed) >= probability  # [B, 3]
    columns = tf.repeat(tf.cast(keep, metadata.dtype), sizes, axis=1)  # [B, 28]
    return metadata * columns


def make_augmenter(aug: Augmentation = Augmentation()) -> Callable[..., tuple[dict[str, tf.Tensor], tf.Tensor]]:
    """A map function for `zip(batches, seeds)`: ((features, labels), seed[2]) → (features, labels), image (and,
    with `metadata_dropout`, metadata) augmented."""

    def augment_batch(
        batch: tuple[dict[str, tf.Tensor], tf.Tensor], seed: tf.Tensor
    ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        features, labels = batch
        features = {**features, "image": augment_images(features["image"], seed, aug)}
        if aug.metadata_dropout:
            dropout_seed = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), _SEEDS + 1)[_SEEDS]
            features["metadata"] = drop_metadata(features["metadata"], aug.metadata_dropout, dropout_seed)
        return features, labels

    return augment_batch


def batch_seeds(seed: int, first: int = 0) -> tf.data.Dataset:
    """Endless int64 [2] seeds `(seed, i)` for batches i = first, first + 1, …: batch i's augmentation
    depends on its position alone, so a run resumed mid-epoch augments the rest exactly as before."""
    return tf.data.Dataset.counter(first).map(lambda i: tf.stack([tf.constant(seed, tf.int64), i]))


def augment_dataset(
    batches: tf.data.Dataset, seeds: tf.data.Dataset, aug: Augmentation = Augmentation()
) -> tf.data.Dataset:
    """Augment a dataset of batches with one int64 [2] seed per batch (see `batch_seeds`)."""
    return tf.data.Dataset.zip((batches, seeds)).map(make_augmenter(aug), num_parallel_calls=AUTOTUNE)
