"""The image itself: who it runs as, what it holds, and how its layers are ordered.

.venv/bin/python -m pytest tests/container/test_image.py -q
"""

from __future__ import annotations

import re

import pytest

from tests.container.conftest import ROOT, copy_checkout, secrets_folder
from tests.container.engine import build, layers


def test_runs_as_non_root_with_secrets_read_only_and_code_not_writable(engine, image, tmp_path):
    secrets = secrets_folder(tmp_path)
    script = (
        "id -u; "
        "head -c0 /secrets/git.txt && echo secrets-readable; "
        "touch /secrets/probe 2>/dev/null && echo secrets-WRITABLE; "
        "touch /app/cli.py 2>/dev/null && echo code-WRITABLE; "
        "touch /app/probe && echo workdir-writable; "
        "printf '%s\\n' \"$DVC_REPO\""
    )
    result = engine.docker(
        *("run", "--rm", "-v", f"{secrets}:/secrets:ro", "--entrypoint", "/bin/bash", image.tag, "-c", script)
    )
    uid, *lines = result.stdout.split()
    assert uid != "0", "the job must not run as root"
    assert lines == ["secrets-readable", "workdir-writable", "https://github.com/csci-e-115/dermaid-versioning.git"]


def test_no_package_tool_or_cache_is_left_at_run_time(engine, image, numbers):
    script = (
        "python -c 'import pipenv' 2>/dev/null && echo pipenv-installed; "
        "ls -A /root/.cache /home/app/.cache 2>/dev/null | grep . && echo caches-left; "
        "ls -A /var/lib/apt/lists | grep -v '^partial$' | grep -q . && echo apt-lists-left; "
        "ls -A /var/cache/apt/archives | grep -q '[.]deb$' && echo debs-left; "
        "ls -d /usr/local/lib/python3*/*-packages/tensorflow/include 2>/dev/null && echo tf-headers-left; "
        "echo checked"
    )
    result = engine.docker("run", "--rm", "--user", "0", "--entrypoint", "/bin/bash", image.tag, "-c", script)
    assert result.stdout.split() == ["checked"], result.stdout + result.stderr

    rows = layers(engine, image.tag)
    total = int(engine.docker("image", "inspect", "--format", "{{.Size}}", image.tag).stdout)
    numbers["image_size_mb"] = round(total / 1e6)
    top = sorted(rows, key=lambda row: -row[1])[:4]
    numbers["largest_layers_mb"] = " | ".join(f"{size / 1e6:.0f} {_short(created)}" for _, size, created in top)


def _short(created_by: str) -> str:
    text = re.sub(r"^/bin/(ba)?sh -c (#\(nop\) )?|^\|\d+ \S+ /bin/bash -o pipefail -c ", "", created_by)
    return " ".join(text.split())[:70]


def test_a_code_only_change_reuses_the_dependency_layers(engine, image, numbers, tmp_path):
    context = copy_checkout(tmp_path / "checkout")
    (context / "cli.py").write_text((context / "cli.py").read_text() + "\n# a code-only change\n")
    changed = "dermaid-training:code-change"
    seconds = build(engine, context, changed, log_path=tmp_path / "build.log")
    numbers["rebuild_after_code_change_s"] = round(seconds, 1)
    try:
        old, new = layers(engine, image.tag)[::-1], layers(engine, changed)[::-1]  # oldest first
        # COPY . . is recorded as "COPY dir:<digest> in ." (COPY Pipfile Pipfile.lock as "COPY multi:").
        copy_code = next(i for i, row in enumerate(new) if "COPY dir:" in row[2])
        install = next(i for i, row in enumerate(new) if "pipenv install" in row[2])
        assert install < copy_code
        # Every layer up to the code's is the very same layer (same id): nothing reinstalled.
        assert [row[0] for row in new[:copy_code]] == [row[0] for row in old[:copy_code]]
        assert new[copy_code][0] != old[copy_code][0], "the changed code must be in a new layer"
        log = (tmp_path / "build.log").read_text()
        assert "Collecting" not in log and "Downloading" not in log, "packages were downloaded again"
    finally:
        engine.docker("rmi", changed, check=False)


def test_dockerignore_keeps_local_state_out_of_the_context(engine, image):
    # What COPY . . took: no secrets, environments, caches or data (the image holds the code only).
    listed = engine.docker(
        "run", "--rm", "--entrypoint", "/bin/bash", image.tag, "-c", "cd /app && find . -maxdepth 1 | sort"
    ).stdout.split()
    for unwanted in ("./secrets", "./.venv", "./.tools", "./.cache", "./.git", "./demo", "./tests", "./outputs"):
        assert unwanted not in listed, listed
    assert {"./cli.py", "./training.py", "./run-commands.sh", "./dvc_pull.sh", "./utilities"} <= set(listed)


def test_an_unknown_accelerator_stops_the_build_with_one_line(engine, image, tmp_path):
    # ACCELERATOR=gpu adds the CUDA wheels (not built here: ~3 GB); anything but cpu/gpu is refused.
    with pytest.raises(RuntimeError, match="ACCELERATOR must be cpu or gpu, not 'tpu'"):
        build(engine, ROOT, "dermaid-training:tpu", "--build-arg", "ACCELERATOR=tpu", log_path=tmp_path / "build.log")
