"""What a complete run leaves behind: its training backups go, W&B's local files stay local (no TensorFlow).

    .venv/bin/python -m pytest tests/test_leftovers.py -q

The end-to-end checks (a CLI run without checkpoints/, one with --keep-checkpoints, the offline W&B run
inside the run folder and not in the current folder) are in tests/test_training.py's full_run tests.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from utilities import storage
from utilities.run import folder as runs
from utilities.run.folder import RunFolder


def backups(folder: Path) -> Path:
    """A checkpoint folder as a run leaves it: the main backup and a variant's."""
    for name in ("backup/chief/ckpt-1.data-00000-of-00001", "backup/chief/checkpoint", "pruned_backup/chief/ckpt-2"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\0" * 1000)
    return folder


def test_a_complete_runs_checkpoints_are_removed_and_its_outputs_kept(tmp_path, caplog):
    folder = RunFolder(local=tmp_path / "m" / "r1", uri=str(tmp_path / "m" / "r1"), publish=True)
    backups(folder.checkpoints)
    (folder.path("run.json")).write_text("{}")
    with caplog.at_level(logging.INFO, logger="utilities.run.folder"):
        assert runs.remove_checkpoints(folder) is True
    assert sorted(p.name for p in folder.local.iterdir()) == ["run.json"]
    assert "removed the training backups" in caplog.text and "--keep-checkpoints keeps them" in caplog.text
    assert runs.remove_checkpoints(folder) is True  # nothing left to remove: fine


def test_a_vertex_checkpoint_dir_loses_only_this_runs_folder(tmp_path):
    folder = RunFolder(local=tmp_path / "run", uri=str(tmp_path / "run"), publish=True)
    mount = tmp_path / "gcs" / "bucket" / "aip-checkpoints"  # AIP_CHECKPOINT_DIR through /gcs
    folder.checkpoints = backups(mount / "m" / "r1")
    other = backups(mount / "m" / "r0")  # another run's: untouched
    assert runs.remove_checkpoints(folder) is True
    assert not folder.checkpoints.exists() and other.is_dir() and (mount / "m").is_dir()


def test_a_failed_removal_is_a_warning_and_the_run_stays_complete(tmp_path, monkeypatch, caplog):
    folder = RunFolder(local=tmp_path / "r1", uri=str(tmp_path / "r1"), publish=True)
    backups(folder.checkpoints)

    def refuse(path, onerror=None):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING, logger="utilities.run.folder"):
        assert runs.remove_checkpoints(folder) is False
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "\n" not in record.getMessage()
    assert f"could not remove the training backups {folder.checkpoints}" in record.getMessage()
    assert "Permission denied" in record.getMessage() and folder.checkpoints.is_dir()


def test_a_file_removed_meanwhile_is_not_a_failure(tmp_path, monkeypatch):
    folder = RunFolder(local=tmp_path / "r1", uri=str(tmp_path / "r1"), publish=True)
    backups(folder.checkpoints)
    real = shutil.rmtree

    def racing(path, onerror=None):  # another worker's cleanup got to a file first
        onerror(Path.unlink, str(Path(path) / "gone"), (FileNotFoundError, FileNotFoundError(2, "gone"), None))
        real(path)

    monkeypatch.setattr(shutil, "rmtree", racing)
    assert runs.remove_checkpoints(folder) is True and not folder.checkpoints.exists()


def test_a_gcs_run_uploads_neither_its_backups_nor_wandbs_files(tmp_path, monkeypatch):
    # The staging copy sits under a folder named "checkpoints": only the run's own subfolders are left out.
    local = tmp_path / "checkpoints" / "staging" / "m" / "r1"
    folder = RunFolder(local=local, uri="gs://bucket/models/m/r1", publish=True)
    backups(folder.checkpoints)
    for name in ("run.json", "metrics.json", "model/model.keras", "wandb/offline-run-x/run-r1.wandb", ".lease"):
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text("x")
    (local / "wandb" / "latest-run").symlink_to(local / "wandb" / "offline-run-x")
    uploaded: list[str] = []
    monkeypatch.setattr(storage, "upload_file", lambda path, uri: uploaded.append(uri))
    runs.publish_files(folder)
    prefix = "gs://bucket/models/m/r1/"
    assert [u.removeprefix(prefix) for u in uploaded] == ["metrics.json", "model/model.keras", "run.json"]
