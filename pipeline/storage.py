"""URIs: a local directory or s3://bucket/prefix. The one place that knows about filesystems.

Everything the pipeline writes goes through a ``Store`` rooted at ``--output``. Paths given to its
methods are relative, '/'-separated, and checked so that nothing can write outside the root.
Writes are atomic: local files are written to a temporary name and renamed (``atomic_write``, the
one place that does it; files get the mode the umask gives, 0644 by default, directories 0755);
S3 objects appear whole when their PUT (or multipart upload) completes, so a retried write
replaces, never duplicates.

Reading Parquet: ``read_table(rel, columns=...)`` reads one file or a directory of shards through
the store's pyarrow filesystem; ``parquet_paths(rel)`` gives (paths, filesystem) for
``ray.data.read_parquet``. Directories are copied with ``pyarrow.fs.copy_files`` (streamed, never
read whole into memory): ``upload_dir`` / ``download_dir``.

S3 endpoint, region and credentials are read here and nowhere else: config ``storage.*``, else the
standard AWS variables (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``). They are passed explicitly to pyarrow's S3FileSystem, to Ray Train's storage
(via ``ray_storage``) and to boto3, and never written or logged: ``repr`` of every object here
hides them, and error messages name the endpoint through ``pipeline.redaction``.

Retries: one policy, the AWS SDKs' own "standard" mode, sized from ``storage.retries`` (retries
after the first attempt) in both clients: pyarrow's ``AwsStandardS3RetryStrategy`` and botocore's
``retries={"mode": "standard"}``. They retry what is transient (connection refused/reset,
timeouts, 5xx, throttling) with jittered exponential backoff and never retry auth errors. What
still fails is turned into a ``StorageError`` whose message says what to fix (``_storage_error``):
not found -> ``StorageNotFound`` (also a ``FileNotFoundError``); credentials, access denied, no
such bucket -> the fix; unreachable or failing after the retries -> check the server, the
endpoint, or raise ``storage.retries``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional, TypeVar

import pyarrow.fs as pafs

from pipeline import uris
from pipeline.errors import NO_SPACE_ERRNOS, UsageError, UserFacingError
from pipeline.redaction import redact_url

T = TypeVar("T")
log = logging.getLogger("pipeline.storage")


class StorageError(UserFacingError):
    """A storage problem; the message says what to fix and never holds credentials."""


class BadStorageUri(StorageError, UsageError):
    """A malformed storage URI: nothing ran; exit 2 like any usage error."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object or file does not exist (catch as StorageError or FileNotFoundError)."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: Optional[str]
    region: Optional[str]
    access_key: Optional[str] = field(default=None, repr=False)
    secret_key: Optional[str] = field(default=None, repr=False)
    session_token: Optional[str] = field(default=None, repr=False)
    profile: Optional[str] = None
    retries: int = 5

    @classmethod
    def resolve(cls, storage_cfg: Any = None, environ: Optional[dict] = None) -> "S3Settings":
        """Config ``storage.*`` first, else the standard AWS environment variables."""
        env = os.environ if environ is None else environ
        get = (lambda k: getattr(storage_cfg, k, None)) if storage_cfg is not None else (lambda k: None)
        endpoint = get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        access_key = env.get("AWS_ACCESS_KEY_ID") or None
        secret_key = env.get("AWS_SECRET_ACCESS_KEY") or None
        if bool(access_key) != bool(secret_key):
            missing = "AWS_SECRET_ACCESS_KEY" if access_key else "AWS_ACCESS_KEY_ID"
            raise StorageError(f"S3 credentials are incomplete: {missing} is not set; set both AWS_ACCESS_KEY_ID "
                               "and AWS_SECRET_ACCESS_KEY, or neither (then storage.profile / AWS_PROFILE is used)")
        retries = get("retries")
        return cls(endpoint_url=endpoint, region=region,
                   access_key=access_key, secret_key=secret_key,
                   session_token=(env.get("AWS_SESSION_TOKEN") or None) if access_key else None,
                   profile=get("profile") or env.get("AWS_PROFILE") or None,
                   retries=int(retries) if retries is not None else 5)

    @property
    def safe_endpoint(self) -> str:
        """The endpoint for messages, secrets masked."""
        if not self.endpoint_url:
            return "the default AWS endpoint"
        return redact_url(self.endpoint_url)

    def with_credentials(self) -> "S3Settings":
        """Settings with explicit keys: from the environment, else resolved once from the profile."""
        if self.access_key or not self.profile:
            return self
        try:
            import boto3
            creds = boto3.session.Session(profile_name=self.profile).get_credentials()
        except Exception as e:  # botocore ProfileNotFound and friends
            raise StorageError(f"S3 profile {self.profile!r} cannot be used ({type(e).__name__}); "
                               "check storage.profile / AWS_PROFILE and ~/.aws/credentials") from None
        if creds is None:
            return self
        f = creds.get_frozen_credentials()
        return S3Settings(self.endpoint_url, self.region, f.access_key, f.secret_key, f.token, self.profile, self.retries)

    def __repr__(self) -> str:  # never print secrets
        return (f"S3Settings(endpoint_url={self.safe_endpoint if self.endpoint_url else None!r}, region={self.region!r}, "
                f"credentials={'set' if self.access_key else ('profile ' + repr(self.profile) if self.profile else 'default chain')}, "
                f"retries={self.retries})")

    __str__ = __repr__

    def __reduce__(self):  # pickling is allowed (Ray ships a Store to workers), printing is not
        return (S3Settings, (self.endpoint_url, self.region, self.access_key, self.secret_key,
                             self.session_token, self.profile, self.retries))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix; BadStorageUri (exit 2) for a malformed one (pipeline.uris)."""
    try:
        return uris.split_s3(uri)
    except uris.BadUri as e:
        raise BadStorageUri(str(e)) from None


def _endpoint_parts(endpoint_url: str) -> tuple[str, str]:
    """(scheme, host[:port]) of an endpoint URL; a bare host means https. Userinfo, path and query dropped."""
    url = endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}"
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.rsplit("@", 1)[-1]


def _attempts(settings: S3Settings) -> int:
    """Total attempts per request: the first one plus storage.retries."""
    return max(0, int(settings.retries)) + 1


def arrow_s3(settings: S3Settings, for_ray: bool = False) -> pafs.S3FileSystem:
    """pyarrow's S3FileSystem with endpoint, region and credentials passed explicitly.

    for_ray=True: a ``RayS3FileSystem``, whose pickle holds no credentials (see there)."""
    public = (settings.endpoint_url, settings.region, settings.retries, settings.profile)
    settings = settings.with_credentials()
    kw: dict[str, Any] = dict(region=settings.region, connect_timeout=5, request_timeout=60,
                              retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_attempts(settings)))
    if settings.endpoint_url:
        scheme, host = _endpoint_parts(settings.endpoint_url)
        kw["endpoint_override"] = host
        kw["scheme"] = scheme
    if settings.access_key:
        kw.update(access_key=settings.access_key, secret_key=settings.secret_key, session_token=settings.session_token)
    return RayS3FileSystem(public, **kw) if for_ray else pafs.S3FileSystem(**kw)


class RayS3FileSystem(pafs.S3FileSystem):
    """An S3FileSystem whose pickle carries no credentials.

    Ray Tune pickles the RunConfig, storage filesystem included, into its experiment and searcher
    state files, which it writes to the run's storage: a plain S3FileSystem would put the secret key
    into the bucket. This one pickles only endpoint, region and retries; where it is unpickled (a
    Ray worker, a restored Tune run) credentials are resolved again from that process's environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, else AWS_PROFILE, else the default chain, e.g. an
    instance role). Workers of a local Ray inherit the driver's environment."""

    def __init__(self, public: tuple, **kw: Any):
        super().__init__(**kw)
        self._public = public

    def __reduce__(self):
        return (_rebuild_ray_s3, self._public)


def _rebuild_ray_s3(endpoint_url: Optional[str], region: Optional[str], retries: int,
                    profile: Optional[str] = None) -> "RayS3FileSystem":
    env = S3Settings.resolve(None)
    return arrow_s3(S3Settings(endpoint_url, region, env.access_key, env.secret_key, env.session_token,
                               profile or env.profile, retries), for_ray=True)


def boto3_client(settings: S3Settings):
    """A boto3 S3 client with endpoint, region and credentials passed explicitly."""
    import boto3
    from botocore.config import Config as BotoConfig
    kw: dict[str, Any] = dict(region_name=settings.region,
                              config=BotoConfig(retries={"total_max_attempts": _attempts(settings), "mode": "standard"},
                                                connect_timeout=5, read_timeout=60,
                                                s3={"addressing_style": "path"} if settings.endpoint_url else None))
    if settings.endpoint_url:
        scheme, host = _endpoint_parts(settings.endpoint_url)
        kw["endpoint_url"] = f"{scheme}://{host}"
    if settings.access_key:
        session = boto3.session.Session()
        kw.update(aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
                  aws_session_token=settings.session_token)
    else:
        session = boto3.session.Session(profile_name=settings.profile) if settings.profile else boto3.session.Session()
    return session.client("s3", **kw)


def safe_rel(rel: str) -> str:
    """Normalize a relative path and refuse anything that would leave the root."""
    rel = str(rel).replace("\\", "/")
    if rel.startswith("/") or "://" in rel or "\x00" in rel or re.match(r"^[A-Za-z]:", rel):
        raise StorageError(f"path {rel!r} must be relative to the output root")
    norm = posixpath.normpath(rel) if rel else ""
    if norm in (".", ""):
        return ""
    if norm == ".." or norm.startswith("../"):
        raise StorageError(f"path {rel!r} would write outside the output directory")
    return norm


# ---- errors -----------------------------------------------------------------------------------
# The SDKs retry (see the module docstring); these only name the fix for what still fails.

_NOT_FOUND_CODES = ("404", "NoSuchKey", "NotFound")
_HINTS = (  # (markers in the error code or text, what to do)
    (("NO_SUCH_BUCKET", "NoSuchBucket"), "the bucket does not exist: create it first or fix the s3:// URI"),
    (("SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch"), "the secret key is wrong: check AWS_SECRET_ACCESS_KEY"),
    (("INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId"), "the access key is unknown to the server: check AWS_ACCESS_KEY_ID"),
    (("ACCESS_DENIED", "AccessDenied", "HTTP response code: 403", "Forbidden"),
     "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"),
    (("INVALID_BUCKET_NAME", "InvalidBucketName"), "the bucket name is not valid"),
    (("EXPIRED_TOKEN", "ExpiredToken"), "the session token has expired: refresh the credentials"),
    (("NoCredentialsError", "Unable to locate credentials"),
     "no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or storage.profile)"),
)


def _error_code(e: BaseException) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", ""))
    return ""


def _hint(text: str) -> Optional[str]:
    """What to fix for an error whose code, class name or message is ``text``, when it says."""
    return next((hint for markers, hint in _HINTS if any(m in text for m in markers)), None)


def _storage_error(e: Exception, what: str, attempts: int, endpoint: str) -> Exception:
    """The error to raise for an I/O failure the SDK gave up on: StorageNotFound, a StorageError that
    names the fix, or ``e`` itself when it is not an I/O error (a bug should keep its traceback)."""
    code = _error_code(e)
    hint = _hint(f"{type(e).__name__} {code} {e}")
    if hint:
        return StorageError(f"{what} failed: {hint} ({_short(e)})")
    if code in _NOT_FOUND_CODES or (isinstance(e, FileNotFoundError) and not code):
        return StorageNotFound(f"{what}: not found")
    if isinstance(e, (OSError, ConnectionError, TimeoutError)) or code or type(e).__module__.startswith("botocore"):
        where = f" at {endpoint}" if endpoint else ""
        tries = f"after {attempts} attempts" if attempts > 1 else "after 1 attempt (storage.retries is 0)"
        return StorageError(f"{what} failed {tries}: storage{where} unreachable or failing ({_short(e)}); "
                            "check that the server is up and storage.endpoint_url / AWS_ENDPOINT_URL, "
                            "or raise storage.retries")
    return e


def _short(e: Optional[BaseException], limit: int = 300) -> str:
    if e is None:
        return ""
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + "..."


# ---- local files --------------------------------------------------------------------------------

def _umask() -> int:
    """The process's umask, read without changing it where /proc says it (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def atomic_write(path: Path, fill: Callable[[IO[bytes]], None]) -> None:
    """Write a local file whole or not at all: ``fill`` writes into a hidden temp file beside it, which
    is flushed to disk, given the mode a new file gets (0666 less the umask: 0644 by default, where
    mkstemp would leave 0600) and renamed over ``path``. A crash leaves the old file or none, plus
    at most a hidden ``.<name>.tmp-*`` file that listings skip. Directories get 0777 less the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in NO_SPACE_ERRNOS and not e.filename:   # a write's error names no file; the full-disk line should
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_into(src: Path, out: IO[bytes]) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)


def _copy_tree_atomic(src_fs: pafs.FileSystem, src_dir: str, dst_dir: Path) -> None:
    """Copy a directory tree from any filesystem into a local directory with pyarrow.fs.copy_files
    (streamed in chunks), then move each file into place with one rename, so no file under dst_dir
    is ever partly written. The staging directory is hidden and removed afterwards."""
    dst_dir = Path(dst_dir)
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst_dir.parent, prefix=f".{dst_dir.name}.tmp-"))
    try:
        tree = staging / "tree"
        tree.mkdir()  # copy_files makes sub-directories, not the top one
        pafs.copy_files(src_dir, str(tree), src_fs, pafs.LocalFileSystem())
        for f in sorted(p for p in tree.rglob("*") if p.is_file()):
            target = dst_dir / f.relative_to(tree)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- the store ---------------------------------------------------------------------------------

class Store:
    """A root location (local directory or s3://bucket/prefix) and atomic reads/writes under it."""

    def __init__(self, uri: str, storage_cfg: Any = None, settings: Optional[S3Settings] = None):
        uri = str(uri)
        if not uri:
            raise StorageError("output is empty: pass --output DIR or --output s3://bucket/prefix")
        try:
            uris.check_location(uri, "output")
        except uris.BadUri as e:
            raise BadStorageUri(str(e)) from None
        if "://" in uri and not is_s3(uri):
            raise BadStorageUri(f"output {redact_url(uri)!r}: only local directories and s3://bucket/prefix are supported")
        self.uri = uri.rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().resolve())
        if is_s3(uri):
            self.s3: Optional[S3Settings] = (settings or S3Settings.resolve(storage_cfg)).with_credentials()
        else:
            self.s3 = None
        if self.s3 is not None:
            self.bucket, self.prefix = split_s3(self.uri)
            self.fs: pafs.FileSystem = arrow_s3(self.s3)
            self.root = f"{self.bucket}/{self.prefix}".rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = self.uri
        self._attempts = _attempts(self.s3) if self.s3 else 1
        self._client = None
        self._ray_fs: Optional[pafs.FileSystem] = None

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_client"] = None  # boto3 clients do not pickle; made again on first use
        d["_ray_fs"] = None
        return d

    # -- naming --
    @property
    def is_s3(self) -> bool:
        return self.s3 is not None

    def path(self, rel: str = "") -> str:
        """Filesystem path (for ``self.fs``) of a relative path under the root."""
        rel = safe_rel(rel)
        return f"{self.root}/{rel}" if rel else self.root

    def key(self, rel: str = "") -> str:
        """The S3 object key of a relative path (S3 stores only)."""
        rel = safe_rel(rel)
        if not self.is_s3:
            raise StorageError(f"{self.uri} is not an S3 location")
        return f"{self.prefix}/{rel}".strip("/") if self.prefix else rel

    def uri_of(self, rel: str = "") -> str:
        rel = safe_rel(rel)
        return f"{self.uri}/{rel}" if rel else self.uri

    def sub(self, rel: str) -> "Store":
        s = object.__new__(Store)
        s.__dict__.update(self.__dict__)
        s.uri, s.root = self.uri_of(rel), self.path(rel)
        if self.s3 is not None:
            s.bucket, s.prefix = split_s3(s.uri)
        return s

    def local_path(self, rel: str = "") -> Path:
        if self.is_s3:
            raise StorageError(f"{self.uri} is not a local directory")
        return Path(self.path(rel))

    @property
    def client(self):
        """A boto3 client for this store's S3 settings (S3 stores only)."""
        if not self.is_s3:
            raise StorageError(f"{self.uri} is not an S3 location")
        if self._client is None:
            self._client = boto3_client(self.s3)
        return self._client

    def _io(self, fn: Callable[[], T], what: str) -> T:
        """Run one filesystem call (the SDK retries inside it); failures become errors that say what to fix."""
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            raise _storage_error(e, what, self._attempts, self.s3.safe_endpoint if self.s3 else "") from None

    # -- checks --
    def check_writable(self) -> None:
        """Fail early, with a clear message, if the root cannot be written (before any work)."""
        if self.is_s3:
            self._check_s3()
        else:
            root = Path(self.root)
            try:
                root.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-"):
                    pass
            except OSError as e:
                raise StorageError(f"cannot write to output directory {root}: {e.strerror or e}; "
                                   "choose another --output or fix its permissions") from None

    def _check_s3(self) -> None:
        assert self.s3 is not None
        where = f"output {self.uri} (endpoint {self.s3.safe_endpoint})"
        client = self.client
        probe = self.key(f".write-probe-{os.getpid()}-{threading.get_ident()}")
        try:
            client.head_bucket(Bucket=self.bucket)
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            client.delete_object(Bucket=self.bucket, Key=probe)
            return
        except Exception as e:
            first = e
        code = _error_code(first) or type(first).__name__
        if code in ("403", "Forbidden"):
            # HEAD responses carry no body: ask once more with a request that says why.
            try:
                client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
            except Exception as e2:
                code = _error_code(e2) or code
        if code in ("404", "NoSuchBucket"):
            hint = (f"bucket {self.bucket!r} does not exist: create it first "
                    f"(for example `aws s3 mb s3://{self.bucket}`) or fix --output")
        elif code in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            hint = "cannot connect to the endpoint: check storage.endpoint_url / AWS_ENDPOINT_URL and that the server is up"
        else:
            hint = _hint(code) or "check storage.endpoint_url / AWS_ENDPOINT_URL and the credentials"
        raise StorageError(f"cannot use {where}: {code}: {hint}") from None

    # -- I/O --
    def _info(self, rel: str) -> pafs.FileInfo:
        return self._io(lambda: self.fs.get_file_info(self.path(rel)), f"stat {self.uri_of(rel)}")

    def exists(self, rel: str) -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self._info(rel).type == pafs.FileType.File

    def size(self, rel: str) -> int:
        info = self._info(rel)
        if info.type != pafs.FileType.File:
            raise StorageNotFound(f"{self.uri_of(rel)}: not found")
        return int(info.size)

    def _file_path(self, rel: str, what: str) -> str:
        if not safe_rel(rel):
            raise StorageError(f"{what} needs a file path, not the root")
        return self.path(rel)

    def _write(self, rel: str, fill: Callable[[IO[bytes]], None]) -> str:
        """Write one file whole: ``fill`` writes its bytes into a binary stream."""
        path = self._file_path(rel, "a write")
        if self.is_s3:
            def put() -> None:
                with self.fs.open_output_stream(path) as f:
                    fill(f)
            self._io(put, f"write {self.uri_of(rel)}")
        else:
            atomic_write(Path(path), fill)
        return self.uri_of(rel)

    def write_bytes(self, rel: str, data: bytes) -> str:
        return self._write(rel, lambda f: f.write(data))

    def read_bytes(self, rel: str) -> bytes:
        def get() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        return self._io(get, f"read {self.uri_of(rel)}")

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def read_json_or(self, rel: str, default: Any = None) -> Any:
        """The parsed JSON at rel, or default when it is missing (a damaged file still raises)."""
        try:
            return self.read_json(rel)
        except StorageNotFound:
            return default

    def write_table(self, rel: str, table) -> str:
        """Write a pyarrow Table as one Parquet file (zstd), atomically."""
        import pyarrow.parquet as pq
        return self._write(rel, lambda f: pq.write_table(table, f, compression="zstd"))

    def read_table(self, rel: str, columns: Optional[list[str]] = None):
        """One Parquet file, or every shard of a directory (in path order), as a pyarrow Table,
        read through the store's filesystem; ``columns`` reads only those columns."""
        import pyarrow.parquet as pq
        paths, fs = self.parquet_paths(rel)
        if not paths:
            raise StorageNotFound(f"read {self.uri_of(rel)}: no Parquet file there")
        cols = list(columns) if columns is not None else None
        return self._io(lambda: pq.read_table(paths if len(paths) > 1 else paths[0], filesystem=fs, columns=cols,
                                              partitioning=None), f"read {self.uri_of(rel)}")

    def parquet_paths(self, rel: str) -> tuple[list[str], pafs.FileSystem]:
        """(paths, filesystem) of the Parquet file rel, or of the .parquet files under the directory rel
        (sorted), for ``ray.data.read_parquet(paths, filesystem=fs)`` or ``pq.read_table``. On S3 the
        filesystem is a ``RayS3FileSystem`` (its pickle, shipped to Ray workers, holds no credentials)."""
        fs = self._ray_filesystem()
        if self._info(rel).type == pafs.FileType.File:
            return [self.path(rel)], fs
        return [self.path(r) for r in self.list_files(rel, ".parquet")], fs

    def list_files(self, rel: str = "", suffix: str = "") -> list[str]:
        """Relative paths of the files under rel (recursive, sorted); hidden names (temp files, the
        staging folders of a copy in progress) left out."""
        base = self.path(rel)
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._io(lambda: self.fs.get_file_info(sel), f"list {self.uri_of(rel)}")
        out = []
        for i in infos:
            if i.type != pafs.FileType.File or not i.path.endswith(suffix):
                continue
            r = i.path[len(self.root) + 1:] if self.root else i.path
            if any(part.startswith(".") for part in r.split("/")):
                continue
            out.append(r)
        return sorted(out)

    def delete(self, rel: str) -> None:
        path = self.path(rel)
        info = self._info(rel)
        if info.type == pafs.FileType.Directory:
            self._io(lambda: self.fs.delete_dir(path), f"delete {self.uri_of(rel)}")
        elif info.type == pafs.FileType.File:
            self._io(lambda: self.fs.delete_file(path), f"delete {self.uri_of(rel)}")

    # -- copies (pyarrow.fs.copy_files: streamed in chunks, never a whole file in memory) --
    def upload_file(self, local_file: str | Path, rel: str) -> str:
        """Copy one local file to rel (on S3 a multipart upload for big files)."""
        src = Path(local_file)
        if not self.is_s3:
            return self._write(rel, lambda f: _copy_into(src, f))
        dst = self._file_path(rel, "upload_file")
        self._io(lambda: pafs.copy_files(str(src), dst, pafs.LocalFileSystem(), self.fs), f"upload {self.uri_of(rel)}")
        return self.uri_of(rel)

    def upload_dir(self, local_dir: str | Path, rel: str) -> str:
        """Copy a local directory under rel (a local store gets each file atomically)."""
        local_dir = Path(local_dir)
        if not self.is_s3:
            _copy_tree_atomic(pafs.LocalFileSystem(), str(local_dir), self.local_path(rel))
            return self.uri_of(rel)
        self._io(lambda: pafs.copy_files(str(local_dir), self.path(rel), pafs.LocalFileSystem(), self.fs),
                 f"upload {local_dir} to {self.uri_of(rel)}")
        return self.uri_of(rel)

    def download_file(self, rel: str, local_file: str | Path) -> Path:
        """Copy the file rel ('' for a store rooted at one object) to local_file, streamed, atomically."""
        dst = Path(local_file)

        def fill(out: IO[bytes]) -> None:
            with self.fs.open_input_stream(self.path(rel)) as f:
                shutil.copyfileobj(f, out, 1 << 20)
        self._io(lambda: atomic_write(dst, fill), f"download {self.uri_of(rel)} to {dst}")
        return dst

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        """Copy the directory rel into local_dir (each file atomically; streamed, not read into memory)."""
        local_dir = Path(local_dir)
        if self._info(rel).type != pafs.FileType.Directory:
            raise StorageNotFound(f"download {self.uri_of(rel)}: no such directory")
        self._io(lambda: _copy_tree_atomic(self.fs, self.path(rel), local_dir),
                 f"download {self.uri_of(rel)} to {local_dir}")
        return local_dir

    @contextlib.contextmanager
    def local_copy(self, rel: str, prefix: str = "adapter-") -> Iterator[str]:
        """`with store.local_copy(rel) as path:` a local directory holding rel, for readers that need a path
        (from_pretrained, PeftModel, lm-eval): the directory itself on a local store; on S3 a temporary copy
        (mkdtemp with `prefix`), removed when the block ends (what was read from it stays loaded)."""
        if not self.is_s3:
            yield str(self.local_path(rel))
            return
        d = tempfile.mkdtemp(prefix=prefix)
        try:
            self.download_dir(rel, d)
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    # -- for Ray --
    def ray_storage(self, rel: str) -> tuple[str, Optional[pafs.FileSystem]]:
        """(storage_path, storage_filesystem) for Ray Train / Tune RunConfig.

        On S3 the filesystem is a ``RayS3FileSystem``: Ray pickles it into state files it writes to
        the bucket, so its pickle holds no credentials (they are resolved again where unpickled)."""
        if self.is_s3:
            return self.path(rel), self._ray_filesystem()
        p = self.local_path(rel)
        p.mkdir(parents=True, exist_ok=True)
        return str(p), None

    def _ray_filesystem(self) -> pafs.FileSystem:
        """The filesystem to hand to Ray (its pickle holds no credentials on S3)."""
        if not self.is_s3:
            return self.fs
        if getattr(self, "_ray_fs", None) is None:
            self._ray_fs = arrow_s3(self.s3, for_ray=True)
        return self._ray_fs


def open_store(cfg) -> Store:
    """The Store for a loaded Config's output."""
    return Store(cfg.output, cfg.storage)
