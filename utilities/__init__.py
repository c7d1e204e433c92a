"""Library of the training job.

Importing this package selects Keras 2 (`tf_keras`) for TensorFlow: tensorflow-model-optimization
supports only Keras 2, so the variable must be set before `tf.keras` is first used (TensorFlow reads
it lazily, on first access). Every module of ours imports from this package first. This is the
one place that sets it.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ warnings off unless the user chose a level (then native_log leaves the start-up lines too).
TF_LOG_LEVEL_CHOSEN = "TF_CPP_MIN_LOG_LEVEL" in os.environ
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
