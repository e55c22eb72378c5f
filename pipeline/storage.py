"""URIs: a local directory or s3://bucket/prefix. The one place that knows about filesystems.

Everything the pipeline writes goes through a ``Store`` rooted at ``--output``. Paths given to its
methods are relative, '/'-separated, and checked so that nothing can write outside the root.
Writes are atomic: local files are written to a temporary name and renamed; S3 objects appear
whole when their PUT completes.

S3 endpoint, region and credentials are read here and nowhere else: config ``storage.*``, else the
standard AWS variables. They are passed explicitly to pyarrow's S3FileSystem, to Ray Train's
storage (via ``arrow_fs``) and to boto3, and never written anywhere.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")


class StorageError(RuntimeError):
    pass


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: Optional[str]
    region: Optional[str]
    access_key: Optional[str]
    secret_key: Optional[str]
    session_token: Optional[str]
    profile: Optional[str]
    retries: int

    @classmethod
    def resolve(cls, storage_cfg: Any = None, environ: Optional[dict] = None) -> "S3Settings":
        env = os.environ if environ is None else environ
        get = (lambda k: getattr(storage_cfg, k, None)) if storage_cfg is not None else (lambda k: None)
        endpoint = get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(endpoint_url=endpoint, region=region,
                   access_key=env.get("AWS_ACCESS_KEY_ID"), secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
                   session_token=env.get("AWS_SESSION_TOKEN"), profile=get("profile") or env.get("AWS_PROFILE"),
                   retries=int(get("retries") if get("retries") is not None else 5))

    def __repr__(self) -> str:  # never print secrets
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, credentials={'set' if self.access_key else 'default chain'})"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: use s3://bucket/prefix")
    return bucket, key.strip("/")


def arrow_s3(settings: S3Settings) -> pafs.S3FileSystem:
    kw: dict[str, Any] = dict(region=settings.region, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max(1, settings.retries + 1)))
    if settings.endpoint_url:
        scheme, _, host = settings.endpoint_url.partition("://")
        kw["endpoint_override"] = host or scheme
        kw["scheme"] = scheme if host else "https"
    if settings.access_key:
        kw.update(access_key=settings.access_key, secret_key=settings.secret_key, session_token=settings.session_token)
    return pafs.S3FileSystem(**kw)


def boto3_client(settings: S3Settings):
    import boto3
    from botocore.config import Config as BotoConfig
    session = boto3.session.Session(profile_name=settings.profile) if settings.profile else boto3.session.Session()
    kw: dict[str, Any] = dict(region_name=settings.region,
                              config=BotoConfig(retries={"max_attempts": max(1, settings.retries + 1), "mode": "standard"},
                                                connect_timeout=5, read_timeout=60))
    if settings.endpoint_url:
        kw["endpoint_url"] = settings.endpoint_url
    if settings.access_key:
        kw.update(aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
                  aws_session_token=settings.session_token)
    return session.client("s3", **kw)


def safe_rel(rel: str) -> str:
    """Normalize a relative path and refuse anything that would leave the root."""
    rel = rel.replace("\\", "/")
    if rel.startswith("/") or "://" in rel:
        raise StorageError(f"path {rel!r} must be relative to the output root")
    norm = posixpath.normpath(rel) if rel else ""
    if norm in (".", ""):
        return ""
    if norm == ".." or norm.startswith("../"):
        raise StorageError(f"path {rel!r} would write outside the output directory")
    return norm


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.5) -> T:
    """Retry transient I/O errors with exponential backoff; the last error is raised with context."""
    last: Optional[BaseException] = None
    for i in range(max(1, attempts)):
        try:
            return fn()
        except (OSError, ConnectionError, TimeoutError) as e:  # pyarrow raises OSError subclasses
            last = e
            if i + 1 < attempts:
                time.sleep(min(8.0, base_delay * 2 ** i))
        except Exception as e:  # botocore errors
            name = type(e).__name__
            if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError") and i + 1 < attempts:
                last = e
                time.sleep(min(8.0, base_delay * 2 ** i))
                continue
            raise
    raise StorageError(f"{what} failed after {attempts} attempts: {last}") from last


class Store:
    """A root location (local directory or s3://bucket/prefix) and atomic reads/writes under it."""

    def __init__(self, uri: str, storage_cfg: Any = None):
        self.uri = uri.rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().resolve())
        self.s3 = S3Settings.resolve(storage_cfg) if is_s3(uri) else None
        if self.s3 is not None:
            self.bucket, self.prefix = split_s3(self.uri)
            self.fs: pafs.FileSystem = arrow_s3(self.s3)
            self.root = f"{self.bucket}/{self.prefix}".rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = self.uri
        self._attempts = (self.s3.retries + 1) if self.s3 else 1

    # -- naming --
    @property
    def is_s3(self) -> bool:
        return self.s3 is not None

    def path(self, rel: str = "") -> str:
        """Filesystem path (for ``self.fs``) of a relative path under the root."""
        rel = safe_rel(rel)
        return f"{self.root}/{rel}" if rel else self.root

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

    # -- checks --
    def check_writable(self) -> None:
        """Fail early, with a clear message, if the root cannot be written."""
        if self.is_s3:
            client = boto3_client(self.s3)
            try:
                client.head_bucket(Bucket=self.bucket)
            except Exception as e:
                code = getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)
                hint = {"404": "create the bucket first", "NoSuchBucket": "create the bucket first",
                        "403": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy",
                        "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID", "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY"}
                raise StorageError(f"cannot use output {self.uri}: bucket {self.bucket!r} check failed ({code}); "
                                   f"{hint.get(str(code), 'check storage.endpoint_url / AWS_ENDPOINT_URL and the credentials')}") from None
            probe = f".write-probe-{os.getpid()}"
            try:
                self.write_bytes(probe, b"ok")
                self.delete(probe)
            except Exception as e:
                raise StorageError(f"cannot write to {self.uri}: {e}") from None
        else:
            root = Path(self.root)
            try:
                root.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-"):
                    pass
            except OSError as e:
                raise StorageError(f"cannot write to output directory {root}: {e.strerror or e}; "
                                   "choose another --output or fix its permissions") from None

    # -- I/O --
    def exists(self, rel: str) -> bool:
        info = retry(lambda: self.fs.get_file_info(self.path(rel)), f"stat {self.uri_of(rel)}", self._attempts)
        return info.type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        info = retry(lambda: self.fs.get_file_info(self.path(rel)), f"stat {self.uri_of(rel)}", self._attempts)
        return info.type == pafs.FileType.File

    def write_bytes(self, rel: str, data: bytes) -> str:
        path = self.path(rel)
        if self.is_s3:
            def put() -> None:
                with self.fs.open_output_stream(path) as f:
                    f.write(data)
            retry(put, f"write {self.uri_of(rel)}", self._attempts)
        else:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return self.uri_of(rel)

    def read_bytes(self, rel: str) -> bytes:
        def get() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        return retry(get, f"read {self.uri_of(rel)}", self._attempts)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode("utf-8"))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def read_json_or(self, rel: str, default: Any = None) -> Any:
        return self.read_json(rel) if self.is_file(rel) else default

    def write_table(self, rel: str, table) -> str:
        """Write a pyarrow Table as one Parquet file, atomically."""
        import pyarrow.parquet as pq
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(rel, buf.getvalue())

    def list_files(self, rel: str = "", suffix: str = "") -> list[str]:
        """Relative paths of the files under rel (recursive, sorted); hidden temp files left out."""
        base = self.path(rel)
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = retry(lambda: self.fs.get_file_info(sel), f"list {self.uri_of(rel)}", self._attempts)
        out = []
        for i in infos:
            if i.type != pafs.FileType.File or not i.path.endswith(suffix):
                continue
            name = i.path.rsplit("/", 1)[-1]
            if name.startswith("."):
                continue
            out.append(i.path[len(self.root) + 1:] if self.root else i.path)
        return sorted(out)

    def delete(self, rel: str) -> None:
        path = self.path(rel)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            retry(lambda: self.fs.delete_dir(path), f"delete {self.uri_of(rel)}", self._attempts)
        elif info.type == pafs.FileType.File:
            retry(lambda: self.fs.delete_file(path), f"delete {self.uri_of(rel)}", self._attempts)

    def upload_dir(self, local_dir: str | Path, rel: str) -> str:
        """Copy a local directory under rel (files written atomically, one by one)."""
        local_dir = Path(local_dir)
        for f in sorted(local_dir.rglob("*")):
            if f.is_file():
                self.write_bytes(f"{safe_rel(rel)}/{f.relative_to(local_dir).as_posix()}", f.read_bytes())
        return self.uri_of(rel)

    def download_dir(self, rel: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        for r in self.list_files(rel):
            sub = r[len(safe_rel(rel)) + 1:] if rel else r
            dst = local_dir / sub
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(self.read_bytes(r))
        return local_dir

    def iter_json_lines(self, rel: str) -> Iterator[Any]:
        for line in self.read_text(rel).splitlines():
            if line.strip():
                yield json.loads(line)

    # -- for Ray --
    def ray_storage(self, rel: str) -> tuple[str, Optional[pafs.FileSystem]]:
        """(storage_path, storage_filesystem) for Ray Train / Tune RunConfig."""
        if self.is_s3:
            return self.path(rel), self.fs
        p = self.local_path(rel)
        p.mkdir(parents=True, exist_ok=True)
        return str(p), None


def open_store(cfg) -> Store:
    """The Store for a loaded Config's output."""
    return Store(cfg.output, cfg.storage)
