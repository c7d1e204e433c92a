"""Shared test set-up: offline W&B, quiet TensorFlow, fixtures from tests/fixtures/, and the session's
summary sections (tests/fixtures/summary.py) carried from pytest-xdist workers to the controller.

`make test` runs two workers (`-n 2 --dist loadgroup`): tests that share an expensive fixture carry
one `xdist_group` mark so that one worker makes it once, and slow tests are handed out first so that
no worker is left running a long one alone at the end."""

import os

import pytest

from tests.fixtures import summary

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"

pytest_plugins = ["tests.fixtures.data", "tests.fixtures.gcs"]


@pytest.fixture
def mixed_precision():
    """mixed_float16 as the global Keras policy for one test (the policy is process-global)."""
    import tf_keras

    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    tf_keras.mixed_precision.set_global_policy("float32")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker; stable: the slow and the other tests keep their order
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker
        session.config.workeroutput["summary"] = summary.SECTIONS


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # the xdist controller, as each worker finishes
    summary.merge(getattr(node, "workeroutput", {}).get("summary", {}))


def pytest_terminal_summary(terminalreporter):
    for heading in summary.SECTIONS:
        if body := summary.lines(heading):
            terminalreporter.write_sep("-", heading)
            for line in body:
                terminalreporter.write_line(line)
