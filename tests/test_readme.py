"""The README's shell blocks work as pasted (issue: every README command works as written).

Every ```sh block of README.md is one of:
- the first block (`make demo`, `make test`): the Makefile must have both targets (`make -n`);
- marked as needing the reader's own values: its first line is `# needs …: NAME, NAME` and each
  CAPS name it lists appears in the block (Docker blocks are run by tests/container/);
- anything else: run as written, in order, by one dash shell in a copy of the checkout, as a reader
  in one terminal would (the venv is only on PATH where the README puts it there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NEEDS = re.compile(r"#\s*needs [^:]*:\s*(?P<names>.+)")
# TensorFlow's C++ start-up lines, hidden unless -v (issue: a quiet start).
NOISE = ("cuInit", "cpu_feature_guard", "oneDNN custom operations", "absl::InitializeLog")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


def _placeholders(block: str) -> list[str] | None:
    match = NEEDS.match(block.splitlines()[0])
    if not match:
        return None
    return re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", match["names"])


def _runnable(blocks: list[str]) -> list[str]:
    return [b for b in blocks[1:] if _placeholders(b) is None]


def test_every_block_is_run_or_names_the_values_it_needs():
    blocks = shell_blocks(README.read_text(encoding="utf-8"))
    assert "make demo" in blocks[0] and "make test" in blocks[0]
    dry = subprocess.run(["make", "-n", "demo", "test"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    for block in blocks[1:]:
        names = _placeholders(block)
        if names is None:
            continue
        assert names, f"a '# needs' block names no CAPS placeholder:\n{block}"
        body = block.split("\n", 1)[1]
        for name in names:
            assert re.search(rf"\b{name}\b", body), f"{name} is not in the block it is listed for:\n{block}"
    runnable = _runnable(blocks)
    assert any("cli.py" in b for b in runnable) and any("tools.evaluate" in b for b in runnable)
    assert any("vertex_submit" in b and "--dry-run" in b for b in runnable)


def _checkout_copy(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))


@pytest.mark.slow
@pytest.mark.xdist_group("readme")
def test_the_readme_runs_as_pasted(tmp_path):
    work = tmp_path / "checkout"
    work.mkdir()
    _checkout_copy(work)
    script = "\n".join(_runnable(shell_blocks(README.read_text(encoding="utf-8"))))
    keep = ("PATH", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(sys.prefix))
    env["HOME"] = str(tmp_path / "home")  # no wandb login, git config or netrc of this machine
    done = subprocess.run(["sh", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert not [line for line in output.splitlines() if any(n in line for n in NOISE)], output[-4000:]

    model_dir = work / "example/outputs/my_model"
    run_id = json.loads((model_dir / "latest.json").read_text())["run_id"]
    run = model_dir / run_id
    assert (run / "model" / "saved_model.pb").is_file() and (run / "report.md").is_file()
    assert (run / "wandb").is_dir() and not (work / "wandb").exists()  # offline W&B in the run folder
    assert not (run / "checkpoints").exists()  # a complete run keeps no backups
    evaluation = json.loads((work / "example/evaluations/my_model_v01/evaluation.json").read_text())
    assert evaluation["model_run"]["run_id"] == run_id, evaluation
    assert '"worker_pool_specs"' in done.stdout  # vertex_submit --dry-run printed its spec
