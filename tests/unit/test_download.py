"""Download stage against servers on loopback that these tests start: an HTTP file server (with a
Google-Drive-like confirm page), a local bare git repository, and a minimal Hugging Face Hub API.
Never the internet."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import sys
import time
import os
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from pipeline import download as dl
from pipeline.config import Config, load_config
from pipeline.errors import UserFacingError
from pipeline.sources import BUILTIN, DownloadPart

pytestmark = pytest.mark.timeout(60)

SHA = "a" * 40


def make_cfg(tmp_path: Path, download: dict | None = None, **data) -> Config:
    d = {"output": str(tmp_path / "out"), "model": {"base": "tiny"}, "resources": {"device": "cpu"},
         "data": {"raw_dir": str(tmp_path / "raw"), "download": {"retries": 1, "timeout_s": 5, **(download or {})}, **data}}
    return Config.model_validate(d)


# ---- loopback servers ------------------------------------------------------------------------------

class Server:
    def __init__(self, handler_cls):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # type: ignore[attr-defined]
        self.httpd.hits = []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.t = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.t.start()

    @property
    def hits(self) -> list[str]:
        return self.httpd.hits  # type: ignore[attr-defined]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


DEBATES = json.dumps({"d1": {"rounds": [[{"side": "Pro", "text": "x"}]], "category": "Politics"}}).encode()
USERS = json.dumps({"u1": {"big_issues_dict": {}}}).encode()


class FileHandler(BaseHTTPRequestHandler):
    """/files/<name>: plain files; /uc?id=<id>: Google-Drive-like (a confirm page, then the file);
    /flaky/<name>: 503 once, then the file; /cut/<name>: announces more bytes than it sends."""
    files = {"debates.json": DEBATES, "users.json": USERS}
    ids = {"DEBATESFILEID12345": "debates.json", "USERSFILEID1234567": "users.json"}
    flaky_seen: set = set()

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code, body: bytes, ctype="application/octet-stream", length=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.hits.append(self.path)
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        parts = u.path.strip("/").split("/")
        if parts[0] == "files" and parts[-1] in self.files:
            return self._send(200, self.files[parts[-1]])
        if parts[0] == "flaky" and parts[-1] in self.files:
            if parts[-1] not in self.flaky_seen:
                self.flaky_seen.add(parts[-1])
                return self._send(503, b"busy", "text/plain")
            return self._send(200, self.files[parts[-1]])
        if parts[0] == "stall" and parts[-1] in self.files:   # half the body, then nothing (until killed)
            body = self.files[parts[-1]] * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(20)
            return
        if parts[0] == "cut":
            return self._send(200, b'{"partial', length=1000)
        if parts[0] == "uc" and q.get("id") in self.ids:
            page = (f'<html><body>Google Drive can\'t scan this file for viruses.'
                    f'<form id="download-form" action="/download" method="get">'
                    f'<input type="hidden" name="id" value="{q["id"]}">'
                    f'<input type="hidden" name="export" value="download">'
                    f'<input type="hidden" name="confirm" value="t">'
                    f'<input type="hidden" name="uuid" value="1234"></form></body></html>').encode()
            return self._send(200, page, "text/html; charset=utf-8")
        if parts[0] == "download" and q.get("confirm") == "t" and q.get("id") in self.ids:
            return self._send(200, self.files[self.ids[q["id"]]])
        if parts[0] == "folder":
            page = ('<html><script>window._DRIVE_ivd = [[["DEBATESFILEID12345xxxxx",["FOLDER"],"debates.json",'
                    '"application/json"],["USERSFILEID1234567xxxxxx",["FOLDER"],"users.json","application/json"]]]'
                    '</script></html>').encode()
            return self._send(200, page, "text/html")
        if parts[0] == "share":
            return self._send(200, b"<html>sign in</html>", "text/html")
        self._send(404, b"not found", "text/plain")


HF_FILES = {"train.csv": b"Full-Document,Extract,Abstract\nlong text,extract,abstract\n",
            "README.md": b"# DebateSum\n", "images/big.bin": b"\0" * 100}


class HubHandler(BaseHTTPRequestHandler):
    """The few Hugging Face Hub routes snapshot_download uses: dataset info, tree, file resolve."""

    def log_message(self, *a):
        pass

    def _json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", SHA)
        self.end_headers()
        self.wfile.write(body)

    def _file(self, name: str, head: bool):
        body = HF_FILES[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"' + hashlib.sha1(body).hexdigest() + '"')
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool):
        self.server.hits.append(self.command + " " + self.path)
        path = urlparse(self.path).path
        if self.headers.get("Authorization"):
            self.server.hits.append("AUTH")
        if path.startswith("/api/datasets/"):
            rest = path[len("/api/datasets/"):]
            if "/tree/" in rest:
                return self._json([{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                   for n, b in HF_FILES.items()])
            repo = rest.split("/revision/")[0]
            if repo != "Hellisotherpeople/DebateSum":
                return self._json({"error": "Repository not found"}, 404)
            return self._json({"id": repo, "sha": SHA, "private": False,
                               "siblings": [{"rfilename": n} for n in HF_FILES]})
        if path.startswith("/datasets/") and "/resolve/" in path:
            name = path.split("/resolve/", 1)[1].split("/", 1)[1]
            if name in HF_FILES:
                return self._file(name, head)
        self._json({"error": "not found"}, 404)

    def do_GET(self):
        self._route(False)

    def do_HEAD(self):
        self._route(True)


@pytest.fixture
def files_server():
    FileHandler.flaky_seen = set()
    s = Server(FileHandler)
    yield s
    s.close()


@pytest.fixture
def hub_server():
    s = Server(HubHandler)
    yield s
    s.close()


@pytest.fixture
def git_repo(tmp_path):
    """A bare repository with IAM-like files, pushed from a work tree; clone URL file://..."""
    work, bare = tmp_path / "work", tmp_path / "iam.git"
    (work / "stance").mkdir(parents=True)
    (work / "stance" / "train.txt").write_text("c\ttopic\tsentence\t1\t1\n")
    (work / "claims").mkdir()
    (work / "claims" / "dev.txt").write_text("c\ttopic\tsentence\t1\n")
    (work / "code.py").write_text("print('not data')\n")
    (work / "README.md").write_text("IAM\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x",
           "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    run = lambda *a, cwd=None: subprocess.run(a, cwd=cwd, env=env, check=True, capture_output=True)
    run("git", "init", "-q", "--bare", "-b", "main", str(bare))
    run("git", "init", "-q", "-b", "main", str(work))
    run("git", "add", "-A", cwd=work)
    run("git", "commit", "-q", "-m", "data", cwd=work)
    run("git", "push", "-q", str(bare), "main", cwd=work)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    return f"file://{bare}", commit


def only_table(**parts) -> dict:
    """The built-in sources with some sources' parts replaced (pointing at loopback)."""
    t = dict(BUILTIN)
    for name, p in parts.items():
        t[name] = replace(t[name], parts=(p,) if not isinstance(p, tuple) else p)
    return t


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connect or subprocess (git) fails the test."""
    def boom(*a, **k):
        raise AssertionError(f"network call in offline mode: {a[:2]}")
    monkeypatch.setattr(socket.socket, "connect", boom)
    monkeypatch.setattr(socket.socket, "connect_ex", boom)
    monkeypatch.setattr(socket, "create_connection", boom)
    monkeypatch.setattr(dl.subprocess, "run", boom)


# ---- HTTP / Google Drive ---------------------------------------------------------------------------

def test_ddo_http_download_writes_files_marker_and_manifest(tmp_path, files_server):
    cfg = make_cfg(tmp_path, {"only": ["ddo"], "ddo_debates_url": files_server.url + "/files/debates.json",
                              "ddo_users_url": files_server.url + "/files/users.json?token=SECRET123"})
    m = dl.run_download(cfg)
    ddo = tmp_path / "raw" / "DDO"
    assert (ddo / "debates.json").read_bytes() == DEBATES
    marker = json.loads((ddo / ".complete.json").read_text())
    assert {f["path"] for f in marker["files"]} == {"debates.json", "users.json"}
    assert marker["files"][0]["sha256"] == hashlib.sha256(DEBATES).hexdigest()
    assert m["sources"]["ddo"]["status"] == "downloaded"
    assert m["sources"]["debatesum"]["status"] == "skipped"
    text = (tmp_path / "raw" / "download_manifest.json").read_text()
    assert "SECRET123" not in text and "SECRET123" not in (ddo / ".complete.json").read_text()
    assert (tmp_path / "out" / "data" / "download_manifest.json").read_text() == text
    # a re-run skips the completed source: no request at all
    n = len(files_server.hits)
    m2 = dl.run_download(cfg)
    assert m2["sources"]["ddo"]["status"] == "complete" and len(files_server.hits) == n
    # a downloaded file deleted since: the marker no longer holds, the source is fetched again
    (ddo / "users.json").unlink()
    m3 = dl.run_download(cfg)
    assert m3["sources"]["ddo"]["status"] == "downloaded" and (ddo / "users.json").read_bytes() == USERS
    assert not (ddo / ".complete.json.stale").exists() and len(files_server.hits) == n + 2


def test_gdrive_confirm_page_and_share_urls(tmp_path, files_server, monkeypatch):
    assert dl.gdrive_file_id("https://drive.google.com/file/d/1AbCdEfGhIjK_lmn-op/view?usp=sharing") == "1AbCdEfGhIjK_lmn-op"
    assert dl.gdrive_file_id("https://drive.google.com/open?id=1AbCdEfGhIjK_lmn-op") == "1AbCdEfGhIjK_lmn-op"
    assert dl.gdrive_file_id("http://127.0.0.1/x?id=1AbCdEfGhIjK") is None
    monkeypatch.setattr(dl, "GDRIVE_DOWNLOAD", files_server.url + "/uc")
    cfg = make_cfg(tmp_path, {"only": ["ddo"],
                              "ddo_debates_url": "https://drive.google.com/file/d/DEBATESFILEID12345/view?usp=sharing",
                              "ddo_users_url": "https://drive.google.com/open?id=USERSFILEID1234567"})
    dl.run_download(cfg)
    assert (tmp_path / "raw" / "DDO" / "users.json").read_bytes() == USERS
    assert any(h.startswith("/download?") and "confirm=t" in h for h in files_server.hits)
    listing = dl.gdrive_folder_files(files_server.url + "/folder/abc", 5, 0)   # best effort: the embedded listing
    assert listing["debates.json"].endswith("/file/d/DEBATESFILEID12345xxxxx/view")
    assert set(listing) == {"debates.json", "users.json"}


def test_http_retries_transient_errors_and_rejects_html(tmp_path, files_server, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    out = tmp_path / "f.json"
    info = dl.http_download(files_server.url + "/flaky/debates.json", out, 5, 2)
    assert info["sha256"] == hashlib.sha256(DEBATES).hexdigest()
    assert files_server.hits.count("/flaky/debates.json") == 2
    with pytest.raises(dl.DownloadError, match="HTML page"):
        dl.http_download(files_server.url + "/share", tmp_path / "g.json", 5, 2)


def test_partial_download_is_never_complete_and_rerun_recovers(tmp_path, files_server, monkeypatch):
    monkeypatch.setattr(dl.time, "sleep", lambda s: None)
    cfg = make_cfg(tmp_path, {"only": ["ddo"], "ddo_debates_url": files_server.url + "/files/debates.json",
                              "ddo_users_url": files_server.url + "/cut/users.json"})
    with pytest.raises(UserFacingError, match="ddo"):
        dl.run_download(cfg)
    raw = tmp_path / "raw"
    assert not (raw / "DDO").exists()                      # nothing that looks like a source
    assert json.loads((raw / "download_manifest.json").read_text())["sources"]["ddo"]["status"] == "failed"
    # a process killed mid-way leaves a .tmp-* dir: the next run removes it and starts over
    (raw / ".tmp-DDO-999").mkdir()
    (raw / ".tmp-DDO-999" / "debates.json").write_text("{")
    cfg.data.download.ddo_users_url = files_server.url + "/files/users.json"
    m = dl.run_download(cfg)
    assert m["sources"]["ddo"]["status"] == "downloaded"
    assert not (raw / ".tmp-DDO-999").exists() and (raw / "DDO" / ".complete.json").is_file()


def test_killed_mid_download_leaves_nothing_that_looks_complete(tmp_path, files_server):
    """A real kill (SIGKILL) of a download process while a file is half written."""
    raw = tmp_path / "raw"
    d = {"output": str(tmp_path / "out"), "model": {"base": "tiny"}, "resources": {"device": "cpu"},
         "data": {"raw_dir": str(raw), "download": {"only": ["ddo"], "timeout_s": 30, "retries": 0,
                  "ddo_debates_url": files_server.url + "/files/debates.json",
                  "ddo_users_url": files_server.url + "/stall/users.json"}}}
    code = ("import json, sys; from pipeline.config import Config; from pipeline.download import run_download; "
            "run_download(Config.model_validate(json.loads(sys.argv[1])))")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(d)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 15
        while time.time() < deadline:
            part = [p for p in raw.glob(".tmp-DDO-*/users.json") if p.stat().st_size > 0]
            if part:
                break
            time.sleep(0.05)
        assert part, "the download never started"
    finally:
        proc.kill()
        proc.wait()
    assert not (raw / "DDO").exists()
    assert not list(raw.glob("**/.complete.json")) and not (raw / "download_manifest.json").exists()
    cfg = make_cfg(tmp_path, {"only": ["ddo"], "ddo_debates_url": files_server.url + "/files/debates.json",
                              "ddo_users_url": files_server.url + "/files/users.json"})
    m = dl.run_download(cfg)
    assert m["sources"]["ddo"]["status"] == "downloaded" and not list(raw.glob(".tmp-*"))
    assert (raw / "DDO" / "users.json").read_bytes() == USERS


def test_ddo_without_urls_names_the_env_vars(tmp_path):
    cfg = make_cfg(tmp_path, {"only": ["ddo"]})
    with pytest.raises(UserFacingError) as e:
        dl.run_download(cfg)
    assert "DDO_DEBATES_URL" in str(e.value) and str(tmp_path / "raw" / "DDO") in str(e.value)


# ---- git ---------------------------------------------------------------------------------------------

def test_git_clone_records_commit_and_keeps_only_reader_files(tmp_path, git_repo):
    url, commit = git_repo
    table = only_table(iam=DownloadPart("IAM", "git", url))
    m = dl.run_download(make_cfg(tmp_path, {"only": ["iam"]}), specs=table)
    iam = tmp_path / "raw" / "IAM"
    assert (iam / "stance" / "train.txt").is_file() and (iam / "README.md").is_file()
    assert not (iam / "code.py").exists() and not (iam / ".git").exists()
    marker = json.loads((iam / ".complete.json").read_text())
    assert marker["commit"] == commit and marker["kind"] == "git"
    assert m["sources"]["iam"]["parts"][0]["commit"] == commit


def test_git_unknown_repo_fails_clearly(tmp_path):
    table = only_table(iam=DownloadPart("IAM", "git", f"file://{tmp_path}/nope.git"))
    with pytest.raises(UserFacingError, match="iam: git clone"):
        dl.run_download(make_cfg(tmp_path, {"only": ["iam"]}), specs=table)
    assert not (tmp_path / "raw" / "IAM").exists()


# ---- Hugging Face ------------------------------------------------------------------------------------

def test_hf_snapshot_from_loopback_hub(tmp_path, hub_server, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETTOKENSHOULDNOTLEAK")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    cfg = make_cfg(tmp_path, {"only": ["debatesum"], "hf_endpoint": hub_server.url})
    m = dl.run_download(cfg)
    d = tmp_path / "raw" / "DebateSum"
    assert (d / "train.csv").read_bytes() == HF_FILES["train.csv"]
    assert (d / "README.md").is_file()
    assert not (d / "images").exists() and not (d / ".cache").exists()   # filtered / cleaned
    marker = json.loads((d / ".complete.json").read_text())
    assert marker["commit"] == SHA and marker["kind"] == "hf"
    assert m["sources"]["debatesum"]["status"] == "downloaded"
    for p in (d / ".complete.json", tmp_path / "raw" / "download_manifest.json"):
        assert "SECRETTOKEN" not in p.read_text()
    assert not any("images/big.bin" in h and h.startswith("GET") for h in hub_server.hits)


def test_custom_source_from_the_hub_lands_in_raw_custom_and_is_prepared(tmp_path, hub_server, monkeypatch):
    """A data.custom_sources entry naming a Hugging Face dataset is fetched like a built-in HF source,
    keeping only files of its format, then read by prepare from <raw_dir>/custom/<name>/."""
    from pipeline.prepare import run_prepare
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    mine = {"name": "my_debates", "domain": "debate", "path": "hf://Hellisotherpeople/DebateSum", "format": "csv",
            "prompt": "Full-Document", "response": "Abstract"}
    cfg = make_cfg(tmp_path, {"only": ["my_debates"], "hf_endpoint": hub_server.url}, custom_sources=[mine],
                   min_text_chars=5, sources=[])  # no built-in source: the custom one only
    m = dl.run_download(cfg)
    d = tmp_path / "raw" / "custom" / "my_debates"
    assert m["sources"]["my_debates"]["status"] == "downloaded" and m["sources"]["debatesum"]["status"] == "skipped"
    assert sorted(p.name for p in d.iterdir()) == [".complete.json", "README.md", "train.csv"]
    assert json.loads((d / ".complete.json").read_text())["commit"] == SHA
    cfg.data.download.offline = True  # offline now: what is on disk is complete, nothing fetched
    n = len(hub_server.hits)
    assert dl.run_download(cfg)["sources"]["my_debates"]["status"] == "complete" and len(hub_server.hits) == n
    p = run_prepare(cfg, use_ray=False)["sources"]["my_debates"]
    assert (p["kept"], p["sft_by_task"], p["files"][0]["path"]) == (1, {"instruction": 1}, "custom/my_debates/train.csv")


def test_hf_unknown_dataset_fails_without_retrying(tmp_path, hub_server, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    table = only_table(debatesum=DownloadPart("DebateSum", "hf", "nobody/nothing"))
    with pytest.raises(UserFacingError, match="nobody/nothing"):
        dl.run_download(make_cfg(tmp_path, {"only": ["debatesum"], "hf_endpoint": hub_server.url,
                                            "retries": 3}), specs=table)
    assert len([h for h in hub_server.hits if "nobody" in h]) == 1


# ---- selection, offline, local, allow_missing --------------------------------------------------------

def test_only_skip_and_opencaselist_opt_in_env_spellings(tmp_path):
    base = {"DOWNLOAD_ONLY": "DebateSum,IAM", "DOWNLOAD_SKIP": "iam"}
    cfg = load_config(None, sets=["model.base=tiny", "resources.device=cpu"], environ={**base})
    chosen, skipped = dl.download_plan(cfg)
    assert chosen == ["debatesum"] and "DOWNLOAD_SKIP" in skipped["iam"] and "DOWNLOAD_ONLY" in skipped["ddo"]
    for env in ({}, {"DOWNLOAD_OPENCASLIST": "1"}, {"DOWNLOAD_OPENCASELIST": "true"}):
        cfg = load_config(None, sets=["model.base=tiny", "resources.device=cpu"], environ=env)
        chosen, skipped = dl.download_plan(cfg)
        assert ("opencaselist" in chosen) == bool(env), env
        if not env:
            assert "DOWNLOAD_OPENCASELIST" in skipped["opencaselist"]


def test_offline_makes_no_network_call_and_names_missing_sources(tmp_path, no_network):
    raw = tmp_path / "raw"
    (raw / "pubmed_qa" / "data").mkdir(parents=True)
    (raw / "pubmed_qa" / "data" / "ori_pqal.json").write_text("{}")
    cfg = make_cfg(tmp_path, {"offline": True, "only": ["pubmed_qa", "medquad", "ddo"]})
    with pytest.raises(UserFacingError) as e:
        dl.run_download(cfg)
    msg = str(e.value)
    assert "medquad" in msg and str(raw / "MedQuAD") in msg and "abachaa/MedQuAD" in msg
    assert "ddo" in msg and "DDO_DEBATES_URL" in msg and "pubmed_qa:" not in msg


def test_offline_allow_missing_records_missing_and_local_with_sha(tmp_path, no_network):
    raw = tmp_path / "raw"
    (raw / "pubmed_qa" / "data").mkdir(parents=True)
    (raw / "pubmed_qa" / "data" / "ori_pqal.json").write_text("{}")
    cfg = make_cfg(tmp_path, {"offline": True}, allow_missing=True)
    m = dl.run_download(cfg)
    s = m["sources"]
    assert s["pubmed_qa"]["status"] == "local"
    f = s["pubmed_qa"]["parts"][0]["files"]
    assert [(x["path"], x["size"], x["sha256"]) for x in f] == [("data/ori_pqal.json", 2, hashlib.sha256(b"{}").hexdigest())]
    assert s["medquad"]["status"] == "missing" and "MedQuAD" in s["medquad"]["how"]
    assert s["opencaselist"]["status"] == "skipped"
    assert not (raw / "pubmed_qa" / ".complete.json").exists()       # user files are not ours to mark
    # a re-run does not hash unchanged user files again; a changed file is hashed again
    calls = []
    real = dl.sha256_file
    dl_sha = lambda p: calls.append(p) or real(p)
    import pipeline.download as mod
    mod.sha256_file, saved = dl_sha, mod.sha256_file
    try:
        dl.run_download(cfg)
        assert calls == []
        (raw / "pubmed_qa" / "data" / "ori_pqal.json").write_text('{"1": {}}')
        m = dl.run_download(cfg)
        assert len(calls) == 1
        assert m["sources"]["pubmed_qa"]["parts"][0]["files"][0]["size"] == 9
    finally:
        mod.sha256_file = saved


def test_user_provided_dir_is_local_even_online(tmp_path, files_server):
    raw = tmp_path / "raw"
    (raw / "DDO").mkdir(parents=True)
    (raw / "DDO" / "debates.json").write_text("{}")
    cfg = make_cfg(tmp_path, {"only": ["ddo"], "ddo_debates_url": files_server.url + "/files/debates.json",
                              "ddo_users_url": files_server.url + "/files/users.json"})
    m = dl.run_download(cfg)
    assert m["sources"]["ddo"]["status"] == "local" and files_server.hits == []
    assert (raw / "DDO" / "debates.json").read_text() == "{}"


def test_bundled_fixtures_offline(tmp_path, fixtures_raw, no_network):
    if not fixtures_raw.exists() or not any(fixtures_raw.iterdir()):
        pytest.skip("fixtures/raw not populated yet")
    import shutil
    shutil.copytree(fixtures_raw, tmp_path / "raw")          # never write into the project's fixtures
    m = dl.run_download(make_cfg(tmp_path, {"offline": True}, allow_missing=True))
    assert any(e["status"] == "local" for e in m["sources"].values())


def test_download_keeps_exactly_the_files_the_readers_read(tmp_path, fixtures_raw):
    """The one declaration of a source's files: pruning a fetched copy of each source (with extra files a
    repository or snapshot brings) leaves exactly the files its reader reads, plus README/LICENSE."""
    import shutil
    raw = tmp_path / "raw"
    shutil.copytree(fixtures_raw, raw)
    checked = 0
    for name, spec in BUILTIN.items():
        for part in spec.parts:
            d = raw / part.dest
            if not d.is_dir():
                continue
            (d / "README.md").write_text("docs")
            (d / "setup.py").write_text("not data")
            (d / "notes").mkdir(exist_ok=True)
            (d / "notes" / "LICENSE").write_text("below the top: not kept")
            before = set(spec.files(raw))
            dl._prune(d, dl.keep_filter(spec, part))
            assert set(spec.files(raw)) == before, name
            left = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
            assert left == {p.relative_to(d).as_posix() for p in before if d in p.parents} | {"README.md"}, name
            checked += 1
    assert checked >= 9
    # MedQuAD: download and reader agree on the collection folders (*_QA), and nothing else is read
    spec = BUILTIN["medquad"]
    (raw / "MedQuAD" / "scripts").mkdir()
    (raw / "MedQuAD" / "scripts" / "schema.xml").write_text("<x/>")
    assert not any("scripts" in str(p) for p in spec.files(raw))
    assert dl.hf_allow_patterns(BUILTIN["debatesum"], BUILTIN["debatesum"].parts[0])[:2] == ["**/*.csv", "*.csv"]


def test_every_part_kind_has_a_fetcher():
    """fetch_part dispatches through download.FETCHERS: each kind a DownloadPart may name has one entry, and
    every built-in source's parts name one of them."""
    import typing
    kinds = typing.get_args(typing.get_type_hints(DownloadPart)["kind"])
    assert set(kinds) == set(dl.FETCHERS)
    assert {p.kind for s in BUILTIN.values() for p in s.parts} <= set(dl.FETCHERS)
