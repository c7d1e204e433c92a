"""A run id is leased: the same --run-id and --output started twice is refused, a killed run's lease is taken
over (so that a rerun resumes), and a run folder is never written by two processes.

    .venv/bin/python -m pytest tests/test_lease.py -q

Races run as real processes (a few lines of Python calling `runs.open_run_folder` or `lease.acquire`, not
training runs). The GCS emulator ignores preconditions, so the GCS tests talk to it through
`PreconditionProxy`, which answers 412 where GCS does (`ifGenerationMatch`).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from utilities import storage
from utilities.run import folder as runs
from utilities.run import lease
from utilities.run.config import Config, DataConfig, OutputConfig

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "dermaid-lease"


def config_for(output: Path | str, run_id: str = "r1", manifest: str = "unused.pickle") -> Config:
    return Config(
        data=DataConfig(manifest=manifest),
        output=OutputConfig(output=str(output), model_name="m", run_id=run_id),
    )


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lease(folder: Path, holder: lease.Holder, age: float = 0.0) -> Path:
    """A lease file as a holder that is not this test would have left it, its heartbeat `age` seconds old."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lease.LEASE_NAME
    path.write_bytes(holder.to_bytes())
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def run_claimants(snippet: str, n: int, tmp_path: Path, env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """`n` processes running `snippet` at the same moment (each polls for a start file); (exit code, stderr)."""
    go, done = tmp_path / "go", tmp_path / "done"
    prelude = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        while not Path({str(go)!r}).exists():
            time.sleep(0.001)
    """)
    hold = f"\nwhile not Path({str(done)!r}).exists():\n    time.sleep(0.01)\n"
    script = (
        prelude
        + textwrap.dedent(snippet)
        + hold
        + "print('won')\nheld.release() if hasattr(held, 'release') else held.close(False)\n"
    )
    wrapped = f"try:\n{textwrap.indent(script, '    ')}\nexcept Exception as exc:\n    print(exc, file=sys.stderr)\n    sys.exit(getattr(exc, 'exit_code', 1))\n"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", wrapped],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    time.sleep(1.0)  # every claimant imported and polls
    go.touch()
    deadline = time.monotonic() + 30
    while sum(p.poll() is not None for p in procs) < n - 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the losers exit at once; the winner holds until `done`
    done.touch()
    return [(p.wait(timeout=30), p.communicate()[1]) for p in procs]


def assert_one_winner(results: list[tuple[int, str]]) -> list[str]:
    codes = sorted(code for code, _ in results)
    assert codes == [0] + [2] * (len(results) - 1), results
    refusals = [err.strip() for code, err in results if code == 2]
    for line in refusals:
        assert "\n" not in line and "is in use by pid" in line and "rerun the same command" in line, line
    return refusals


# ---------------------------------------------------------------------- local run folders


def test_two_processes_opening_one_run_folder_at_once_exactly_one_wins(tmp_path):
    out = tmp_path / "out"
    snippet = f"""
        from utilities.run import folder as runs
        from utilities.run.config import Config, OutputConfig
        config = Config(output=OutputConfig(output={str(out)!r}, model_name="m", run_id="r1"))
        held = runs.open_run_folder(config, is_chief=True)
    """
    refusals = assert_one_winner(run_claimants(snippet, 3, tmp_path))
    host = socket.gethostname()
    assert all(f"on host {host} since " in line and "--run-id r1 to resume" in line for line in refusals), refusals
    assert not (out / "m" / "r1" / lease.LEASE_NAME).exists()  # released by the winner


def test_a_lease_is_released_at_the_end_so_a_rerun_resumes(tmp_path):
    config = config_for(tmp_path / "out")
    with runs.open_run_folder(config, is_chief=True) as folder:
        (folder.path("history.csv")).write_text("epoch,loss\n0,1.0\n")
        with pytest.raises(lease.LeaseHeld, match=rf"in use by pid {os.getpid()} "):  # while held: refused
            runs.open_run_folder(config, is_chief=True)
    assert not folder.path(lease.LEASE_NAME).exists()
    with pytest.raises(RuntimeError, match="boom"), runs.open_run_folder(config, is_chief=True) as again:
        assert again.path("history.csv").exists() and not again.created
        raise RuntimeError("boom")  # a failed (or preempted) run releases it too
    with runs.open_run_folder(config, is_chief=True):  # and the next rerun gets it
        pass
    assert sorted(p.name for p in folder.local.iterdir()) == ["history.csv"]


def test_a_complete_run_is_refused_without_touching_it(tmp_path):
    config = config_for(tmp_path / "out")
    run_dir = tmp_path / "out" / "m" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    with pytest.raises(runs.RunError, match="already complete"):
        runs.open_run_folder(config, is_chief=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]


def test_a_refused_start_leaves_no_run_folder(tmp_path):
    config = config_for(tmp_path / "out")
    with pytest.raises(ValueError, match="bad shard"), runs.open_run_folder(config, is_chief=True):
        raise ValueError("bad shard")  # refused after the folder was opened, before anything was written
    assert not (tmp_path / "out" / "m" / "r1").exists()


def test_the_lease_of_a_dead_process_on_this_machine_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    me = lease.Holder.me()
    write_lease(folder, replace(me, token="old", pid=dead_pid(), pid_start=None))  # SIGKILLed mid-run
    with lease.acquire(folder, "advice") as held:
        assert json.loads((folder / lease.LEASE_NAME).read_bytes())["token"] == held.holder.token
    assert "taking over the stale lease" in caplog.text
    # A live pid that is another process now (the holder died, its pid was reused): taken over too.
    write_lease(folder, replace(me, token="reused", pid_start="1"))
    with lease.acquire(folder, "advice") as held:
        assert held.holder.token != "reused"


def test_a_live_process_keeps_its_lease_on_this_machine_however_old_its_heartbeat(tmp_path):
    folder = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = replace(lease.Holder.me(), token="live", pid=sleeper.pid, pid_start=lease._process_start(sleeper.pid))
        path = write_lease(folder, holder, age=10 * lease.STALE_SECONDS)
        with pytest.raises(lease.LeaseHeld, match=rf"in use by pid {sleeper.pid} on host .*; do this$"):
            lease.acquire(folder, "do this")
        assert json.loads(path.read_bytes())["token"] == "live"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_another_machines_lease_is_kept_until_its_heartbeat_is_stale(tmp_path):
    folder = tmp_path / "run"
    other = replace(lease.Holder.me(), token="other", host="other-host", pid=1)  # its pid cannot be checked here
    write_lease(folder, other, age=lease.STALE_SECONDS / 2)
    with pytest.raises(lease.LeaseHeld, match=r"on host other-host .*stale 300 s after its last heartbeat"):
        lease.acquire(folder, "advice")
    write_lease(folder, other, age=lease.STALE_SECONDS + 5)
    with lease.acquire(folder, "advice") as held:
        assert held.holder.host == socket.gethostname()


def test_the_heartbeat_refreshes_and_a_taken_over_lease_is_lost(tmp_path):
    folder = tmp_path / "run"
    held = lease.acquire(folder, "advice", heartbeat_seconds=0.05)
    path = folder / lease.LEASE_NAME
    os.utime(path, (0, 0))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.stat().st_mtime > time.time() - 60  # the heartbeat touched it
    held.check()
    path.unlink()  # another process judged it stale and took it over
    write_lease(folder, replace(held.holder, token="successor"))
    with pytest.raises(lease.LeaseLost, match="taken over"):
        held.check()
    held.release()
    assert json.loads(path.read_bytes())["token"] == "successor"  # the successor's lease stays


# ---------------------------------------------------------------------- GCS


class PreconditionProxy:
    """HTTP proxy to the emulator that enforces `ifGenerationMatch` (412 on a mismatch), as GCS does.

    Every conditional request is checked and forwarded under one lock, so check and write are one step."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def request(self, method: str, path: str, body: bytes = b"", headers=None) -> tuple[int, list, bytes]:
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            upstream.request(method, path, body=body or None, headers=headers or {})
            response = upstream.getresponse()
            return response.status, response.getheaders(), b"" if method == "HEAD" else response.read()
        finally:
            upstream.close()

    def generation(self, bucket: str, name: str) -> int:
        status, _, body = self.request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
        return int(json.loads(body)["generation"]) if status == 200 else 0

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urllib.parse.urlsplit(self.path)
                expected = urllib.parse.parse_qs(url.query).get("ifGenerationMatch")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
                if body:
                    headers["Content-Length"] = str(len(body))
                with proxy.lock:
                    if expected and proxy.generation(*_object_of(url.path, body)) != int(expected[0]):
                        payload = json.dumps({"error": {"code": 412, "message": "conditionNotMet"}}).encode()
                        status, kept = 412, {"Content-Type": "application/json"}
                    else:
                        status, got, payload = proxy.request(self.command, self.path, body, headers)
                        kept = {k: v for k, v in got if k.lower() not in ("connection", "content-length")}
                self.send_response(status)
                for key, value in kept.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        return Handler


def _object_of(path: str, body: bytes) -> tuple[str, str]:
    """(bucket, object name) of a JSON API request: in the path, or in a multipart upload's metadata part."""
    parts = path.split("/")
    bucket = parts[parts.index("b") + 1]
    if "o" in parts and parts.index("o") + 1 < len(parts):
        return bucket, urllib.parse.unquote("/".join(parts[parts.index("o") + 1 :]))
    metadata = body.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    return bucket, json.loads(metadata)["name"]


@pytest.fixture(scope="module")
def gcs(gcs_emulator):
    gcs_emulator.make_bucket(BUCKET)
    proxy = PreconditionProxy(gcs_emulator.port)
    yield proxy
    proxy.server.shutdown()
    proxy.server.server_close()


@pytest.fixture
def on_gcs(gcs, monkeypatch):
    """This test's GCS requests go through the precondition proxy."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.host)
    return gcs


def gcs_lease(prefix: str) -> dict | None:
    uri = f"gs://{BUCKET}/{prefix}/{lease.LEASE_NAME}"
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def put_gcs_lease(prefix: str, holder: lease.Holder) -> None:
    storage.write_bytes(f"gs://{BUCKET}/{prefix}/{lease.LEASE_NAME}", holder.to_bytes())


def test_the_proxy_enforces_preconditions_as_gcs_does(on_gcs):
    uri = f"gs://{BUCKET}/proxy-check/x"
    generation = lease._write_gcs(uri, b"a", 0)
    with pytest.raises(lease._PreconditionFailed):
        lease._write_gcs(uri, b"b", 0)
    lease._write_gcs(uri, b"c", generation)
    with pytest.raises(lease._PreconditionFailed):
        lease._write_gcs(uri, b"d", generation)  # a stale generation
    assert storage.read_bytes(uri) == b"c"


def test_two_processes_claiming_one_gcs_run_at_once_exactly_one_wins(on_gcs, tmp_path):
    snippet = f"""
        from utilities.run import lease
        held = lease.acquire("gs://{BUCKET}/race/m/r1", "rerun the same command with --run-id r1 to resume")
    """
    assert_one_winner(run_claimants(snippet, 3, tmp_path, env={"STORAGE_EMULATOR_HOST": on_gcs.host}))
    assert gcs_lease("race/m/r1") is None  # released by the winner


def test_a_live_gcs_lease_is_refused_and_a_stale_one_taken_over(on_gcs):
    other = replace(lease.Holder.me(), token="other", host="other-host", pid=1)
    put_gcs_lease("stale/m/r1", other)
    with pytest.raises(lease.LeaseHeld, match=r"in use by pid 1 on host other-host .*; advice; a lease is stale"):
        lease.acquire(f"gs://{BUCKET}/stale/m/r1", "advice")
    assert gcs_lease("stale/m/r1")["token"] == "other"
    old = time.time() - lease.STALE_SECONDS - 5
    put_gcs_lease("stale/m/r1", replace(other, heartbeat=old))  # its holder stopped beating 5 min ago
    with lease.acquire(f"gs://{BUCKET}/stale/m/r1", "advice", heartbeat_seconds=0.05) as held:
        assert gcs_lease("stale/m/r1")["token"] == held.holder.token
        first = gcs_lease("stale/m/r1")["heartbeat"]
        deadline = time.monotonic() + 10
        while gcs_lease("stale/m/r1")["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gcs_lease("stale/m/r1")["heartbeat"] > first  # refreshed, conditionally on its own generation
        held.check()
    assert gcs_lease("stale/m/r1") is None


def test_a_gcs_lease_of_a_dead_process_on_this_machine_is_taken_over_and_a_taken_over_one_lost(on_gcs):
    put_gcs_lease("dead/m/r1", replace(lease.Holder.me(), token="dead", pid=dead_pid(), pid_start=None))
    held = lease.acquire(f"gs://{BUCKET}/dead/m/r1", "advice")
    assert gcs_lease("dead/m/r1")["token"] == held.holder.token
    put_gcs_lease("dead/m/r1", replace(held.holder, token="successor"))
    with pytest.raises(lease.LeaseLost):
        held.check()
    held.release()  # conditional on its own generation: the successor's lease stays
    assert gcs_lease("dead/m/r1")["token"] == "successor"


def test_a_gcs_run_leases_its_run_folder_and_its_local_staging_copy(on_gcs, tmp_path):
    base = Config(output=OutputConfig(output=f"gs://{BUCKET}/models", model_name="m", run_id="r1"))
    config = replace(base, output=replace(base.output, staging_dir=str(tmp_path / "staging")))
    with runs.open_run_folder(config, is_chief=True) as folder:
        assert gcs_lease("models/m/r1")["pid"] == os.getpid()
        assert folder.path(lease.LEASE_NAME).exists()
        with pytest.raises(lease.LeaseHeld, match=f"gs://{BUCKET}/models/m/r1 is in use by pid {os.getpid()}"):
            runs.open_run_folder(config, is_chief=True)
        folder.path("metrics.json").write_text("{}")
        folder.path("run.json").write_text("{}")
        runs.publish_files(folder)
    assert sorted(storage.list_uris(f"gs://{BUCKET}/models/m/r1/")) == [
        f"gs://{BUCKET}/models/m/r1/metrics.json",
        f"gs://{BUCKET}/models/m/r1/run.json",
    ]  # the staging copy's lease was not uploaded; the run folder's own was released


# ---------------------------------------------------------------------- runs.write_json


def test_write_json_uses_a_temp_file_of_its_own_and_syncs_it(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    (tmp_path / "metrics.tmp").write_text("someone else's")  # the old fixed temp name
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    runs.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and synced
    assert (tmp_path / "metrics.tmp").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "metrics.tmp"]


def test_a_failed_write_json_keeps_the_old_content_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text('{"old": true}')

    def no_replace(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="No space"):
        runs.write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# ---------------------------------------------------------------------- the CLI


def test_a_bad_manifest_is_refused_before_a_run_folder_exists(tmp_path, capsys):
    import cli

    bad = tmp_path / "versioned_paths.pickle"
    bad.write_bytes(b"not a pickle")
    out = tmp_path / "out"
    code = cli.main(["--manifest", str(bad), "--output", str(out), "-n", "m", "--run-id", "r1", "--no-tracking"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "manifest" in err, err
    assert not (out / "m" / "r1").exists()


def test_a_second_cli_run_with_a_run_id_in_use_is_refused_at_once(prepared, tmp_path, capsys):
    import cli

    run_dir = tmp_path / "out" / "m" / "r1"
    holder = f"""
import sys
from utilities.run import lease
held = lease.acquire({str(run_dir)!r}, "advice")
print("held", flush=True)
sys.stdin.read()
held.release()
"""
    first = subprocess.Popen(  # the first run, still training
        [sys.executable, "-c", holder], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "held"
        args = ["--manifest", str(prepared.manifest_path), "--output", str(tmp_path / "out"), "-n", "m"]
        args += ["--run-id", "r1", "--weights", "none", "--freeze-backbone", "--image-size", "32", "-e", "1"]
        code = cli.main([*args, "--no-tracking"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {run_dir} is in use by pid {first.pid} on host {socket.gethostname()} "), err
        assert "rerun the same command with --run-id r1 to resume" in err
        assert [p.name for p in run_dir.iterdir()] == [lease.LEASE_NAME]  # before any training
    finally:
        first.communicate("", timeout=30)
    assert first.returncode == 0 and not any(run_dir.iterdir())  # the first run's lease was left alone
