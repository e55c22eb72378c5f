"""Issue 23.3: the output is owned and locked. The project marks the outputs it makes and refuses `/`, the
home directory, the raw directory (and inside it), a custom source's folder, and a non-empty folder it did
not make (unless --force, which deletes nothing of the user's); one run per output (a lock naming its
owner; a stale one is taken over with a line). In-process `main()`; no Ray is started."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.ownership import LOCK_FILE, OUTPUT_MARKER, OutputLock
from pipeline.storage import Store

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


@pytest.mark.parametrize("where", ["root", "home", "raw", "inside raw", "custom source folder"])
def test_places_that_are_never_an_output(capsys, tmp_path, monkeypatch, where):
    raw = tmp_path / "raw"
    (raw / "iam").mkdir(parents=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "qa.jsonl").write_text('{"q": "a?", "a": "b"}\n')
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    out = {"root": "/", "home": str(tmp_path / "home"), "raw": str(raw), "inside raw": str(raw / "out"),
           "custom source folder": str(mine / "out")}[where]
    src = f"{{name: mine, domain: debate, path: '{mine / 'qa.jsonl'}', format: jsonl, prompt: q, response: a}}"
    rc, said = run(capsys, "report", "--config", DEMO, "--output", out, "--set", f"data.raw_dir={raw}",
                   "--set", f"data.custom_sources=[{src}]")   # report takes no --raw-dir: the config key
    assert rc == 2 and f"refusing --output {Path(out).resolve()}" in said, said
    assert not (Path(out) / OUTPUT_MARKER).exists() and not (Path(out) / "runs").exists()


def test_a_non_empty_folder_the_project_did_not_make_is_refused_unless_forced(capsys, tmp_path):
    out = tmp_path / "F"
    (out / "base_model").mkdir(parents=True)
    (out / "base_model" / "w.bin").write_bytes(b"the user's weights")
    rc, said = run(capsys, "report", "--config", DEMO, "--output", str(out))
    assert rc == 2 and "not empty and this project did not make it" in said and "--force" in said
    assert sorted(p.name for p in out.rglob("*")) == ["base_model", "w.bin"]   # nothing written
    rc, said = run(capsys, "report", "--config", DEMO, "--output", str(out), "--force")
    assert rc == 0, said
    assert (out / OUTPUT_MARKER).is_file() and (out / "base_model" / "w.bin").read_bytes() == b"the user's weights"
    rc, _ = run(capsys, "report", "--config", DEMO, "--output", str(out))   # marked: ours from now on
    assert rc == 0


def test_a_rebuilt_tiny_base_deletes_only_what_the_project_wrote(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_train import tiny_config, write_sft
    from pipeline.lm.tiny import ensure_tiny
    store = Store(str(tmp_path))
    (tmp_path / "base_model").mkdir()
    (tmp_path / "base_model" / "w.bin").write_bytes(b"mine")
    write_sft(store, domains=["debate"], n=(16, 4, 4))
    cfg = tiny_config(str(tmp_path), domains=["debate"], model__tiny__pretrain_steps=0)
    ensure_tiny(cfg, store)
    assert (tmp_path / "base_model" / "w.bin").read_bytes() == b"mine"
    written = store.read_json("base_model/tiny_meta.json")["files"]
    write_sft(store, domains=["debate"], n=(20, 4, 4))   # other data: the base is rebuilt
    ensure_tiny(cfg, store)
    assert (tmp_path / "base_model" / "w.bin").read_bytes() == b"mine"
    assert store.read_json("base_model/tiny_meta.json")["files"] == written


def test_a_second_run_on_the_same_output_fails_at_once_naming_the_owner(capsys, tmp_path):
    out = tmp_path / "o"
    store = Store(str(out))
    with OutputLock(store, "adapters run --config x"):
        rec = json.loads((out / LOCK_FILE).read_text())
        assert rec["pid"] and rec["host"] == socket.gethostname() and rec["heartbeat"]
        rc, said = run(capsys, "report", "--config", DEMO, "--output", str(out))
        assert rc == 1 and "is in use by another run" in said and f"pid {rec['pid']}" in said
        assert "adapters run --config x" in said
    assert not (out / LOCK_FILE).exists()   # released
    rc, _ = run(capsys, "report", "--config", DEMO, "--output", str(out))
    assert rc == 0 and not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("owner", ["dead pid here", "old heartbeat elsewhere"])
def test_a_stale_lock_is_taken_over_with_a_line(capsys, tmp_path, owner):
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = ({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": "2099-01-01T00:00:00Z"}
           if owner == "dead pid here" else {"host": "elsewhere", "pid": 1, "heartbeat": "2020-01-01T00:00:00Z"})
    (out / LOCK_FILE).write_text(json.dumps({**rec, "command": "adapters run"}))
    (out / OUTPUT_MARKER).write_text("{}")
    rc, said = run(capsys, "report", "--config", DEMO, "--output", str(out))
    assert rc == 0, said
    assert "taking over the lock" in said and ("is gone" in said if owner == "dead pid here" else "s old" in said)


def test_the_lock_on_s3_is_a_conditional_create(s3_server, monkeypatch):
    """On S3 the lock object is created with If-None-Match: * (SeaweedFS, the test server, honours it: the
    second put gets 412 PreconditionFailed), so two runs cannot both take it."""
    from botocore.exceptions import ClientError
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="probe/x", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        client.put_object(Bucket=bucket, Key="probe/x", Body=b"2", IfNoneMatch="*")
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    store = Store(f"s3://{bucket}/out")
    first = OutputLock(store, "adapters run (first)")
    first.acquire()
    try:
        from pipeline.ownership import OutputLocked
        with pytest.raises(OutputLocked, match=r"in use by another run.*\(first\)"):
            OutputLock(store, "adapters run (second)").acquire()
    finally:
        first.release()
    assert not store.exists(LOCK_FILE)
    with OutputLock(store, "adapters run (third)"):
        assert json.loads(store.read_bytes(LOCK_FILE))["command"] == "adapters run (third)"
