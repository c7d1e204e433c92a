"""Training-time augmentation: random flips, rotations, shifts and zooms of image batches, seeded per batch.

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
    """Random geometric changes of training images; lesions have no canonical orientation."""

    flip: bool = True  # horizontal and vertical, each with p = 0.5
    rotation: float = 0.1  # max |angle| as a fraction of a full turn (0.1 → ±36°)
    shift: float = 0.1  # max |translation| as a fraction of the side
    zoom: float = 0.1  # max relative change of scale (0.1 → 0.9×..1.1×)


def _affine(
    batch: tf.Tensor, height: tf.Tensor, width: tf.Tensor, aug: Augmentation, seeds: tf.Tensor, flips: tf.Tensor
) -> tf.Tensor:
    """Per-image transforms [B, 8] mapping output pixel → input pixel (ImageProjectiveTransformV3 convention).

    `flips` bool [B, 2] (left-right, up-down) mirror the input image first, folded into the same
    transform: x_in → (W-1) - x_in is a sign change plus an offset, so a flip costs nothing extra.
    """
    angle = tf.random.stateless_uniform([batch], seeds[0], -aug.rotation * 2 * math.pi, aug.rotation * 2 * math.pi)
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


def augment_images(images: tf.Tensor, seed: tf.Tensor, aug: Augmentation = Augmentation()) -> tf.Tensor:
    """float32 [B,H,W,3] → same shape, randomly flipped/rotated/shifted/zoomed; `seed` int [2] (stateless ops).

    One bilinear resampling per batch does all of it: the flips are folded into the affine transform
    (mirroring with tf.reverse + tf.where cost as much as the whole transform).
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6)
    shape = tf.shape(images)
    batch, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    if aug.flip:
        left_right = tf.random.stateless_uniform([batch], seeds[4]) < 0.5
        up_down = tf.random.stateless_uniform([batch], seeds[5]) < 0.5
        flips = tf.stack([left_right, up_down], axis=1)  # [B, 2]
    else:
        flips = tf.zeros([batch, 2], tf.bool)
    if not (aug.flip or aug.rotation or aug.shift or aug.zoom):
        return images
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=_affine(batch, height, width, aug, seeds, flips),
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",  # no black corners: the skin continues
    )


def make_augmenter(aug: Augmentation = Augmentation()) -> Callable[..., tuple[dict[str, tf.Tensor], tf.Tensor]]:
    """A map function for `zip(batches, seeds)`: ((features, labels), seed[2]) → (features, labels), image augmented."""

    def augment_batch(
        batch: tuple[dict[str, tf.Tensor], tf.Tensor], seed: tf.Tensor
    ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        features, labels = batch
        return {**features, "image": augment_images(features["image"], seed, aug)}, labels

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
