"""Fetch the raw sources into ``data.raw_dir``, with checksums, licenses, versions and completion markers.

What to fetch is each source's declaration (``pipeline.sources``: ``SourceSpec.parts``, and which
files to keep: its ``patterns``, the same globs prepare reads, plus README/LICENSE files). A source
has one or more *parts* (a Hugging Face dataset snapshot, a git clone, HTTP / Google-Drive files, an
``s3://`` prefix for a custom source); each part lands in its own directory under the raw dir:

    fetch into  <raw_dir>/<dest>/../.tmp-<name>-<pid>/   (files, then .complete.json, written last)
    rename to   <raw_dir>/<dest>/                         (one atomic rename)

so a download that dies half-way leaves only a ``.tmp-*`` directory (removed by the next run) and
never a directory that looks complete. Re-runs skip parts whose ``.complete.json`` exists.
A directory that exists without a marker was put there by the user (like the bundled fixtures):
it is recorded as ``local``, with the sha256 of every file, and never overwritten. A custom source
on local disk is read in place: recorded as ``local`` the same way.

Offline (``data.download.offline``, OFFLINE=1 / HF_HUB_OFFLINE=1): no network call at all; a source
that is not on disk is an error naming it and how to provide it, unless ``data.allow_missing``.

Tokens (HF_TOKEN, ...) are used by the libraries from the environment, never written or logged;
URLs and errors are recorded through ``pipeline.redaction``.
"""
from __future__ import annotations

import hashlib
import html
import http.cookiejar
import json
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline import layout
from pipeline.errors import UserFacingError
from pipeline.redaction import redact_url, scrub
from pipeline.sources import DownloadPart, SourceSpec, registry, selected_sources
from pipeline.sources.base import DOCS, OUTSIDE_RAW_DIR, glob_matcher, walk_contained
from pipeline.storage import Store, atomic_write, open_store

log = logging.getLogger("pipeline.download")

MARKER = ".complete.json"
MANIFEST = "download_manifest.json"
GDRIVE_DOWNLOAD = "https://drive.google.com/uc"  # file id -> ?export=download&id=<id>
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


# ---- which files a part keeps: the source's patterns --------------------------------------------

def _part_prefix(spec: SourceSpec, part: DownloadPart) -> str:
    """Where the part lands inside the source's folder ('' when it is the folder itself)."""
    if part.dest == spec.raw_dir:
        return ""
    if not part.dest.startswith(spec.raw_dir + "/"):
        raise ValueError(f"{spec.name}: part {part.dest!r} is not inside the source's folder {spec.raw_dir!r}")
    return part.dest[len(spec.raw_dir) + 1:] + "/"


def keep_filter(spec: SourceSpec, part: DownloadPart) -> Callable[[str], bool]:
    """A test on a file's path inside the part: kept when the reader would read it there (the source's
    patterns), or when it is a README / LICENSE at the top of the part."""
    prefix, data, docs = _part_prefix(spec, part), glob_matcher(spec.patterns), glob_matcher(DOCS)
    return lambda rel: data(prefix + rel) or ("/" not in rel and docs(rel))


def hf_allow_patterns(spec: SourceSpec, part: DownloadPart) -> list[str]:
    """The patterns for snapshot_download (fnmatch, '*' crosses '/'): a superset of what keep_filter
    keeps, so nothing the reader needs is left on the Hub; _prune trims the rest."""
    prefix = _part_prefix(spec, part)
    out: list[str] = []
    for p in spec.patterns:
        if p.startswith("**/"):
            out += [p, p[3:]]
        elif not prefix:
            out.append(p)
        elif p.startswith(prefix):
            out.append(p[len(prefix):])
    return out + list(DOCS)


# ---- small helpers ------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(root: Path, known: Optional[dict[str, dict]] = None,
                 contain: Optional[Path] = None) -> list[dict[str, Any]]:
    """Every regular file under root (the marker and hidden files left out): path, size, sha256.
    With ``known`` ({path: record with mtime_ns}), a file whose size and mtime are unchanged keeps its
    recorded sha256 (user-provided sources can be large; they are hashed once). A symbolic link that
    resolves outside ``contain`` (default: root) is listed as refused, never opened."""
    found, refused = walk_contained(root, contain or root)
    out: list[dict[str, Any]] = [{"path": rel, "refused": OUTSIDE_RAW_DIR} for _, rel in refused]
    for p, rel in found:
        st = p.stat()
        rec: dict[str, Any] = {"path": rel, "size": st.st_size}
        old = (known or {}).get(rel)
        if known is not None:
            rec["mtime_ns"] = st.st_mtime_ns
        if old and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns and old.get("sha256"):
            rec["sha256"] = old["sha256"]
        else:
            rec["sha256"] = sha256_file(p)
        out.append(rec)
    return sorted(out, key=lambda r: Path(r["path"]).parts)


def _local_records(src_dir: Path, previous: dict[str, Any], name: str, contain: Path) -> list[dict[str, Any]]:
    known: dict[str, dict] = {}
    for part in (previous.get("sources", {}).get(name, {}) or {}).get("parts", []) or []:
        if part.get("kind") == "local":
            known.update({f["path"]: f for f in part.get("files", []) if isinstance(f, dict) and "path" in f})
    return file_records(src_dir, known, contain)


def _prune(root: Path, keep: Callable[[str], bool]) -> None:
    """Keep only the files the readers use (and docs); drop hidden dirs (.git, .cache) and empty dirs."""
    for p in sorted(root.rglob("*"), key=lambda x: len(x.parts), reverse=True):
        rel = p.relative_to(root).as_posix()
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if p.is_dir() and not p.is_symlink():
            if hidden and p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
            elif not any(p.iterdir()):
                p.rmdir()
        elif hidden or not keep(rel):
            p.unlink()


def _retry(fn: Callable[[], Any], what: str, retries: int, transient: Callable[[BaseException], bool],
           base_delay: float = 1.0) -> Any:
    """The download stage's one retry policy, for the transports that have none of their own that we can
    size (urllib, `git clone`, the Hub's snapshot call): `retries` more attempts after the first when
    `transient(error)`, waiting 1, 2, 4 ... s (at most 30). S3 sources go through the AWS SDKs' standard
    retries instead (pipeline/storage.py), sized by storage.retries."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt >= retries or not transient(e):
                raise
            delay = min(30.0, base_delay * 2 ** attempt)
            log.warning("%s: %s; retrying in %.0fs (%d/%d)", what, scrub(e), delay, attempt + 1, retries)
            time.sleep(delay)


class DownloadError(RuntimeError):
    pass


# ---- HTTP and Google Drive ----------------------------------------------------------------------

_GDRIVE_ID = [re.compile(r"drive\.google\.com/file/d/([\w-]{10,})"), re.compile(r"[?&]id=([\w-]{10,})")]


def gdrive_file_id(url: str) -> Optional[str]:
    """The file id of a Google Drive share URL (file/d/<id>/view, open?id=, uc?id=), else None."""
    host = urllib.parse.urlparse(url).netloc
    if "google.com" not in host:
        return None
    for rx in _GDRIVE_ID:
        m = rx.search(url)
        if m:
            return m.group(1)
    return None


def direct_url(url: str) -> str:
    fid = gdrive_file_id(url)
    return f"{GDRIVE_DOWNLOAD}?export=download&id={fid}" if fid else url


def _confirm_url(page: str, base: str) -> Optional[str]:
    """The real download URL from Google Drive's 'cannot scan this file for viruses' page."""
    form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"[^>]*>(.*?)</form>', page, re.S)
    if form:
        action = html.unescape(form.group(1))
        params = dict(re.findall(r'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form.group(2)))
        q = urllib.parse.urlencode({k: html.unescape(v) for k, v in params.items()})
        return urllib.parse.urljoin(base, action + ("&" if "?" in action else "?") + q)
    m = re.search(r'href="(/uc\?export=download[^"]*confirm=[^"]+)"', page)
    if m:
        return urllib.parse.urljoin(base, html.unescape(m.group(1)))
    m = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    if m:
        sep = "&" if "?" in base else "?"
        return f"{base}{sep}confirm={m.group(1)}"
    return None


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, urllib.error.HTTPError):
        return e.code in _TRANSIENT_HTTP
    return isinstance(e, (urllib.error.URLError, TimeoutError, ConnectionError, OSError)) and not isinstance(e, DownloadError)


def http_download(url: str, dest: Path, timeout_s: float, retries: int, max_bytes: int = 10240 << 20,
                  max_total_s: float = 7200.0) -> dict[str, Any]:
    """Stream url (or a Google Drive share link) to dest; follows the gdrive confirm page. Bounded: a file
    larger than max_bytes (Content-Length or what arrives) and a download longer than max_total_s over all
    attempts are stopped with DownloadError (timeout_s bounds each read only: a server that never stops
    sending filled the disk)."""
    deadline = time.monotonic() + max_total_s

    def over_size(n: int) -> DownloadError:
        return DownloadError(f"{redact_url(url)}: {n / 2**20:,.0f} MB is more than download.max_file_mb "
                             f"({max_bytes / 2**20:,.0f} MB): raise it if the file is really that large")

    def once() -> dict[str, Any]:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        target = direct_url(url)
        for _hop in range(3):
            req = urllib.request.Request(target, headers={"User-Agent": "domain-adapters-download/0.1"})
            with opener.open(req, timeout=timeout_s) as resp:
                ctype = resp.headers.get("Content-Type", "")
                if "text/html" in ctype and not dest.name.endswith((".html", ".htm")):
                    page = resp.read(2_000_000).decode("utf-8", "replace")
                    nxt = _confirm_url(page, resp.geturl())
                    if nxt is None:
                        raise DownloadError(f"{redact_url(url)} returned an HTML page, not the file "
                                            "(is the share link public, 'Anyone with the link'?)")
                    target = nxt
                    continue
                h = hashlib.sha256()
                n = 0
                expected = resp.headers.get("Content-Length")
                if expected is not None and expected.isdigit() and int(expected) > max_bytes:
                    raise over_size(int(expected))
                with open(dest, "wb") as f:
                    for block in iter(lambda: resp.read1(1 << 20), b""):
                        f.write(block)
                        h.update(block)
                        n += len(block)
                        if n > max_bytes:
                            raise over_size(n)
                        if time.monotonic() > deadline:
                            raise DownloadError(f"{redact_url(url)}: not finished after download.max_time_s "
                                                f"({max_total_s:,.0f} s; {n / 2**20:,.0f} MB received): raise it "
                                                "for a slow link, or fetch the file by hand")
                if expected is not None and int(expected) != n:
                    raise ConnectionError(f"short read: got {n} of {expected} bytes")
                return {"sha256": h.hexdigest(), "size": n}
        raise DownloadError(f"{redact_url(url)}: too many confirmation pages")
    try:
        return _retry(once, f"GET {redact_url(url)}", retries, _is_transient)
    except BaseException:
        dest.unlink(missing_ok=True)  # nothing half-downloaded is left behind
        raise


def gdrive_folder_files(folder_url: str, timeout_s: float, retries: int) -> dict[str, str]:
    """Best effort: {file name: file URL} from a public Google Drive folder page (embedded listing)."""
    def once() -> str:
        req = urllib.request.Request(folder_url, headers={"User-Agent": "Mozilla/5.0"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.read(20 << 20).decode("utf-8", "replace")  # a folder page, not a file: bounded
    page = _retry(once, f"GET {redact_url(folder_url)}", retries, _is_transient)
    page = page.encode().decode("unicode_escape", "ignore") if "\\x22" in page else page
    found: dict[str, str] = {}
    for fid, name in re.findall(r'\[\s*"([\w-]{20,})"\s*,\s*\[[^\]]*\]\s*,\s*"([^"]+\.json)"', page):
        found.setdefault(name, f"https://drive.google.com/file/d/{fid}/view")
    for name, fid in re.findall(r'"([^"/]+\.json)"[^\[\]]{0,200}?"([\w-]{25,})"', page):
        found.setdefault(name, f"https://drive.google.com/file/d/{fid}/view")
    return found


# ---- git ----------------------------------------------------------------------------------------

def _git(args: list[str], cwd: Optional[Path], timeout_s: float) -> str:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="true")
    try:
        r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise DownloadError("git is not installed: install git, or put the files in the raw directory by hand")
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"git {args[0]} took longer than {timeout_s:.0f}s")
    if r.returncode != 0:
        cmd = next((a for a in args if a in ("clone", "rev-parse")), args[0])
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        fatal = [ln for ln in lines if ln.startswith(("fatal:", "error:"))]
        msg = scrub((fatal or lines or [f"exit {r.returncode}"])[0])
        if any(s in r.stderr for s in ("Could not resolve host", "Connection timed out", "Connection reset",
                                       "early EOF", "RPC failed", "Operation too slow")):
            raise ConnectionError(f"git {cmd}: {msg}")
        raise DownloadError(f"git {cmd}: {msg}")
    return r.stdout.strip()


def fetch_git(part: DownloadPart, keep: Callable[[str], bool], tmp: Path, timeout_s: float, retries: int) -> dict[str, Any]:
    stall = str(max(1, int(timeout_s)))
    def once() -> str:
        if tmp.exists():
            shutil.rmtree(tmp)
        args = ["-c", "http.lowSpeedLimit=1000", "-c", f"http.lowSpeedTime={stall}",
                "clone", "--depth", "1", "--quiet"]
        if part.revision:
            args += ["--branch", part.revision]
        _git(args + [part.repo, str(tmp)], None, timeout_s * 20)
        return _git(["rev-parse", "HEAD"], tmp, 30)
    commit = _retry(once, f"git clone {redact_url(part.repo)}", retries,
                    lambda e: isinstance(e, (ConnectionError, TimeoutError)))
    _prune(tmp, keep)
    return {"commit": commit, "revision": part.revision or "HEAD"}


# ---- Hugging Face -------------------------------------------------------------------------------

def fetch_hf(part: DownloadPart, allow: list[str], keep: Callable[[str], bool], tmp: Path, timeout_s: float,
             retries: int, endpoint: Optional[str]) -> dict[str, Any]:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    permanent = tuple(getattr(hf_errors, n) for n in ("RepositoryNotFoundError", "GatedRepoError",
                                                       "RevisionNotFoundError", "EntryNotFoundError")
                      if hasattr(hf_errors, n))

    def transient(e: BaseException) -> bool:
        if isinstance(e, permanent):
            return False
        resp = getattr(e, "response", None)
        code = getattr(resp, "status_code", None)
        return code is None or code in _TRANSIENT_HTTP

    api = HfApi(endpoint=endpoint)

    def once() -> str:
        info = api.dataset_info(part.repo, revision=part.revision, timeout=timeout_s)
        sha = info.sha
        snapshot_download(part.repo, repo_type="dataset", revision=sha, local_dir=str(tmp),
                          allow_patterns=allow or None, endpoint=endpoint,
                          etag_timeout=timeout_s, max_workers=4)
        return sha
    try:
        sha = _retry(once, f"huggingface {part.repo}", retries, transient)
    except permanent as e:
        raise DownloadError(f"Hugging Face dataset {part.repo}: {type(e).__name__}: {scrub(str(e).splitlines()[0])}"
                            + (" (gated: accept its terms on the Hub and set HF_TOKEN)" if "Gated" in type(e).__name__ else ""))
    _prune(tmp, keep)
    return {"revision": part.revision or "main", "commit": sha}


# ---- S3 (custom sources) ------------------------------------------------------------------------

def fetch_s3(part: DownloadPart, keep: Callable[[str], bool], tmp: Path, storage_cfg: Any) -> dict[str, Any]:
    """Copy an s3:// object or prefix (streamed; the SDK retries per storage.retries), then prune."""
    store = Store(part.repo, storage_cfg)
    if store.is_file(""):
        store.download_file("", tmp / part.repo.rstrip("/").rsplit("/", 1)[-1])
    else:
        store.download_dir("", tmp)
    _prune(tmp, keep)
    return {}


# ---- one part, one source -----------------------------------------------------------------------

def _http_urls(part: DownloadPart, spec: SourceSpec, dl: Any, timeout_s: float, retries: int) -> dict[str, str]:
    """Each file's URL: its own setting, else the listing of the part's Google Drive folder setting."""
    urls = {name: getattr(dl, key, None) for name, key in part.files}
    missing = [n for n, u in urls.items() if not u]
    folder = getattr(dl, part.folder_key, None) if part.folder_key else None
    if missing and folder:
        listing = gdrive_folder_files(folder, timeout_s, retries)
        for n in missing:
            if n in listing:
                urls[n] = listing[n]
    missing = [n for n, u in urls.items() if not u]
    if missing:
        keys = ", ".join(spec.setting(k).env[-1] for n, k in part.files if n in missing)
        alt = f" (or {spec.setting(part.folder_key).env[-1]})" if part.folder_key else ""
        raise DownloadError(f"no URL for {', '.join(missing)}: set {keys}{alt}")
    return urls  # type: ignore[return-value]


# One fetcher per DownloadPart.kind: (part, spec, keep, tmp dir, cfg) -> what the part's marker records
# (revision, commit, url / urls). A new kind of part is one function and one entry here.
Fetcher = Callable[[DownloadPart, SourceSpec, Callable[[str], bool], Path, Any], dict[str, Any]]


def _from_hf(part: DownloadPart, spec: SourceSpec, keep: Callable[[str], bool], tmp: Path, cfg: Any) -> dict[str, Any]:
    dl = cfg.data.download
    info = fetch_hf(part, hf_allow_patterns(spec, part), keep, tmp, dl.timeout_s, dl.retries, dl.hf_endpoint or None)
    return {**info, "url": f"{(dl.hf_endpoint or 'https://huggingface.co').rstrip('/')}/datasets/{part.repo}"}


def _from_git(part: DownloadPart, spec: SourceSpec, keep: Callable[[str], bool], tmp: Path, cfg: Any) -> dict[str, Any]:
    dl = cfg.data.download
    return {**fetch_git(part, keep, tmp, dl.timeout_s, dl.retries), "url": redact_url(part.repo)}


def _from_http(part: DownloadPart, spec: SourceSpec, keep: Callable[[str], bool], tmp: Path, cfg: Any) -> dict[str, Any]:
    dl = cfg.data.download
    urls = _http_urls(part, spec, dl, dl.timeout_s, dl.retries)
    for name, url in urls.items():
        http_download(url, tmp / name, dl.timeout_s, dl.retries, dl.max_file_mb << 20, dl.max_time_s)
    return {"urls": {n: redact_url(u) for n, u in urls.items()}}


def _from_s3(part: DownloadPart, spec: SourceSpec, keep: Callable[[str], bool], tmp: Path, cfg: Any) -> dict[str, Any]:
    return {**fetch_s3(part, keep, tmp, cfg.storage), "url": redact_url(part.repo)}


FETCHERS: dict[str, Fetcher] = {"hf": _from_hf, "git": _from_git, "http": _from_http, "s3": _from_s3}


def fetch_part(part: DownloadPart, spec: SourceSpec, raw: Path, cfg: Any) -> dict[str, Any]:
    """Fetch one part into a temp dir next to its destination, write its marker, rename in place."""
    dest = raw / part.dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    keep = keep_filter(spec, part)
    try:
        fetcher = FETCHERS.get(part.kind)
        if fetcher is None:
            raise DownloadError(f"unknown fetch kind {part.kind!r} (known: {', '.join(FETCHERS)})")
        info: dict[str, Any] = {"kind": part.kind, **fetcher(part, spec, keep, tmp, cfg)}
        files = file_records(tmp)
        if not files:
            raise DownloadError(f"nothing matching {list(spec.patterns)} was found")
        marker = {"source": spec.name, "dir": part.dest, "license": spec.license, **info,
                  "files": files, "n_files": len(files), "bytes": sum(f.get("size", 0) for f in files), "time": _now()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last
        if dest.exists():   # only an empty leftover can be here (checked by the caller)
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return marker
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_marker(d: Path, check_files: bool = True) -> Optional[dict[str, Any]]:
    """The part's marker when it is there and every file it lists is present with its size, else None.
    A marker whose files were changed or deleted since is renamed to .complete.json.stale (so the
    directory is fetched again online, or taken as the user's own files offline)."""
    try:
        m = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    if check_files and "files" in m:
        for f in m["files"]:
            p = d / f.get("path", "")
            if not p.is_file() or p.stat().st_size != f.get("size"):
                log.warning("%s: %s changed or missing since it was downloaded; not taken as complete", d, f.get("path"))
                try:
                    os.replace(d / MARKER, d / (MARKER + ".stale"))
                except OSError:
                    pass
                return None
    return m


def _present(d: Path) -> bool:
    return d.is_dir() and any(not p.name.startswith(".") for p in d.iterdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return pid != os.getpid()
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _clean_stale_tmp(raw: Path) -> None:
    """Remove temp dirs of earlier, dead download processes (not those of one running now)."""
    for p in list(raw.glob(".tmp-*")) + list(raw.glob("*/.tmp-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if p.is_dir():
            log.info("removing a partial download left by an earlier run: %s", p)
            shutil.rmtree(p, ignore_errors=True)


def download_plan(cfg) -> tuple[list[str], dict[str, str]]:
    """(sources to fetch, {source: why skipped}) over every source the config knows."""
    dl = cfg.data.download
    selected = {s.name for s in selected_sources(cfg)}
    fetch: list[str] = []
    skipped: dict[str, str] = {}
    for name, spec in registry(cfg.data).items():
        if dl.only and name not in dl.only:
            skipped[name] = "not in data.download.only (DOWNLOAD_ONLY)"
        elif not dl.only and name not in selected:
            skipped[name] = ("not in data.sources" if spec.domain in cfg.domains
                             else f"its domain {spec.domain!r} is not in domains")
        elif name in dl.skip:
            skipped[name] = "in data.download.skip (DOWNLOAD_SKIP)"
        elif spec.opt_in and not getattr(dl, spec.opt_in.key, False):
            skipped[name] = (f"opt-in: set {spec.opt_in.env[-1]}=1 (or data.download.{spec.opt_in.key}: true)")
        else:
            fetch.append(name)
    return fetch, skipped


def _local_entry(src: SourceSpec, folder: Path, contain: Path, previous: dict[str, Any]) -> dict[str, Any]:
    """A source the user put in place: its files with checksums, never overwritten."""
    if folder.is_file():
        files = [{"path": folder.name, "size": folder.stat().st_size, "sha256": sha256_file(folder)}]
    else:
        files = _local_records(folder, previous, src.name, contain)
    return {"status": "local", "parts": [{"dir": str(folder) if src.local_path else src.raw_dir, "kind": "local",
                                          "files": files}]}


def _do_source(src: SourceSpec, raw: Path, cfg: Any, offline: bool, previous: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"source": src.name, "domain": src.domain, "dir": src.raw_dir, "license": src.license,
                             "url": src.url, "parts": []}
    top = src.folder(raw)
    if src.local_path:  # a custom source read in place
        if not top.exists():
            raise DownloadError(f"custom source {src.name!r}: {top} does not exist; {src.how_to_get}")
        entry.update(_local_entry(src, top, top if top.is_dir() else top.parent, previous))
        return entry
    multi = len(src.parts) > 1
    top_marker = read_marker(top, check_files=False) if multi else None
    if top_marker is not None and not all(read_marker(raw / p.dest) for p in src.parts):
        top_marker = None
    if multi and top_marker is not None:
        entry.update(status="complete", parts=top_marker.get("parts", []), time=top_marker.get("time"))
        return entry
    if not multi:
        m = read_marker(top)
        if m is not None:
            entry.update(status="complete", parts=[m], time=m.get("time"))
            return entry
        stale = (top / (MARKER + ".stale")).is_file()
        if _present(top) and not (stale and not offline):
            entry.update(_local_entry(src, top, raw, previous))
            return entry
    elif _present(top) and not any(read_marker(raw / p.dest) or (raw / p.dest / (MARKER + ".stale")).is_file()
                                   for p in src.parts):
        # the user's own files (no part of ours is there): take them as they are
        entry.update(_local_entry(src, top, raw, previous))
        return entry
    if offline or not src.parts:
        why = "offline mode forbids fetching it" if offline else "nothing fetches it"
        raise DownloadError(f"source {src.name!r} is not in {top} and {why}; {src.how_to_get_at(raw)}"
                            + ("; or unset OFFLINE/HF_HUB_OFFLINE" if offline else ""))
    statuses = []
    for part in src.parts:
        d = raw / part.dest
        m = read_marker(d)
        if m is not None:
            entry["parts"].append(m)
            statuses.append("complete")
            continue
        if (d / (MARKER + ".stale")).is_file():   # ours, changed since: fetch it again
            shutil.rmtree(d)
        elif _present(d):
            entry["parts"].append({"dir": part.dest, "kind": "local", "files": file_records(d, contain=raw)})
            statuses.append("local")
            continue
        log.info("download %s: %s %s -> %s", src.name, part.kind, redact_url(part.repo) or "urls", d)
        t0 = time.time()
        m = fetch_part(part, src, raw, cfg)
        log.info("download %s: %d files, %.1f MB in %.1fs", src.name, m["n_files"], m["bytes"] / 1e6, time.time() - t0)
        entry["parts"].append(m)
        statuses.append("downloaded")
    entry["status"] = "downloaded" if "downloaded" in statuses else ("complete" if set(statuses) == {"complete"} else "local")
    entry["time"] = _now()
    if multi:
        marker = json.dumps({"source": src.name, "license": src.license, "url": src.url,
                             "parts": entry["parts"], "time": entry["time"]}, indent=2) + "\n"
        atomic_write(top / MARKER, lambda f: f.write(marker.encode()))
    return entry


def run_download(cfg, specs: Optional[dict[str, SourceSpec]] = None) -> dict[str, Any]:
    """Fetch every selected source into cfg.data.raw_dir; returns (and writes) the download manifest.

    ``specs`` replaces the config's registry of sources (tests point parts at loopback servers)."""
    specs = specs or registry(cfg.data)
    dl = cfg.data.download
    if "://" in cfg.data.raw_dir:
        raise UserFacingError(f"data.raw_dir must be a local directory, got {cfg.data.raw_dir}")
    raw = Path(cfg.data.raw_dir).expanduser().resolve()
    offline = bool(dl.offline)
    if not offline or not raw.exists():
        raw.mkdir(parents=True, exist_ok=True)
    if not offline:
        _clean_stale_tmp(raw)
    _, skipped = download_plan(cfg)
    try:
        previous = json.loads((raw / MANIFEST).read_text())
    except (OSError, ValueError):
        previous = {}
    manifest: dict[str, Any] = {"raw_dir": str(raw), "offline": offline, "time": _now(), "sources": {}}
    errors: list[str] = []
    for name, src in specs.items():
        if name in skipped:
            manifest["sources"][name] = {"source": name, "domain": src.domain, "dir": src.raw_dir,
                                         "status": "skipped", "reason": skipped[name]}
            continue
        try:
            entry = _do_source(src, raw, cfg, offline, previous)
        except Exception as e:
            msg = scrub(str(e) or type(e).__name__)
            entry = {"source": name, "domain": src.domain, "dir": src.raw_dir, "license": src.license,
                     "status": "missing" if offline else "failed", "error": msg, "how": src.how_to_get_at(raw)}
            if offline and cfg.data.allow_missing:
                log.warning("source %s is missing (recorded; ALLOW_MISSING_DATA is set): %s", name, msg)
            elif not offline and cfg.data.allow_missing:
                entry["status"] = "missing"
                log.warning("source %s could not be fetched (recorded as missing): %s", name, msg)
            else:
                errors.append(f"{name}: {msg}" if offline else f"{name}: {msg}; {src.how_to_get_at(raw)}")
                log.error("source %s failed: %s", name, msg)
        entry["n_files"] = sum(len(p.get("files", [])) for p in entry.get("parts", []))
        manifest["sources"][name] = entry
        log.info("source %-15s %s", name, entry["status"])
    text = json.dumps(manifest, indent=2) + "\n"
    try:
        atomic_write(raw / MANIFEST, lambda f: f.write(text.encode()))
    except OSError as e:   # a read-only raw dir of the user's own files: the output's copy is enough
        if any(ent.get("status") == "downloaded" for ent in manifest["sources"].values()):
            raise
        log.warning("cannot write %s (%s); the manifest is in the output only", raw / MANIFEST, e.strerror or e)
    open_store(cfg).write_text(layout.DOWNLOAD_MANIFEST, text)
    if errors:
        raise UserFacingError("download failed for " + str(len(errors)) + " source(s):\n  " + "\n  ".join(errors)
                              + "\n(set ALLOW_MISSING_DATA=1 to record missing sources and go on, or "
                                "DOWNLOAD_SKIP=<source> to leave one out)")
    return manifest
