"""pipeline/storage.py without a server: local atomic writes, path checks, settings, retries."""
from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.errors import UserFacingError
from pipeline.storage import (S3Settings, Store, StorageError, StorageNotFound, classify, is_s3, retry, safe_rel,
                              split_s3)


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "out"))


# ---- local writes -------------------------------------------------------------------------

def test_local_round_trip(store, tmp_path):
    store.check_writable()
    assert store.write_json("data/manifest.json", {"a": 1}) == str(tmp_path / "out" / "data" / "manifest.json")
    assert store.read_json("data/manifest.json") == {"a": 1}
    store.write_text("report/summary.md", "# hi\n")
    store.write_table("data/sft/debate/train/part-0.parquet", pa.table({"x": [1, 2, 3]}))
    assert store.read_table("data/sft/debate/train/part-0.parquet").column("x").to_pylist() == [1, 2, 3]
    assert store.list_files() == ["data/manifest.json", "data/sft/debate/train/part-0.parquet", "report/summary.md"]
    assert store.list_files("data", suffix=".parquet") == ["data/sft/debate/train/part-0.parquet"]
    assert store.exists("data") and store.is_file("data/manifest.json") and not store.is_file("data")
    assert store.size("report/summary.md") == 5
    store.delete("report")
    assert not store.exists("report/summary.md")


def test_local_write_is_atomic_and_leaves_no_temp_files(store, monkeypatch):
    store.write_text("state.json", "old")

    def crash(src, dst):
        raise OSError("disk pulled")
    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError):
        store.write_text("state.json", "new, half written")
    monkeypatch.undo()
    assert store.read_text("state.json") == "old"  # the previous complete file is still there
    leftovers = [p.name for p in store.local_path().iterdir()]
    assert leftovers == ["state.json"], leftovers


def test_hidden_temp_files_are_not_listed(store):
    store.write_text("a/b.txt", "x")
    (store.local_path("a") / ".b.txt.tmp-123").write_text("partial")
    assert store.list_files() == ["a/b.txt"]


def test_missing_file_is_not_found_at_once(store):
    with pytest.raises(StorageNotFound) as ei:
        store.read_bytes("nope.json")
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, StorageError)
    assert isinstance(ei.value, UserFacingError)
    assert store.read_json_or("nope.json", {"d": 1}) == {"d": 1}
    store.write_text("bad.json", "{not json")
    with pytest.raises(ValueError):
        store.read_json_or("bad.json", {})  # a damaged file is an error, not "missing"


def test_upload_and_download_dir_local(store, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    assert store.upload_dir(src, "adapters/debate").endswith("adapters/debate")
    assert store.list_files("adapters") == ["adapters/debate/adapter_config.json", "adapters/debate/sub/w.bin"]
    dst = store.download_dir("adapters/debate", tmp_path / "back")
    assert (dst / "sub" / "w.bin").read_bytes() == b"\x00\x01"


def test_check_writable_local_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot write to output directory .*choose another --output"):
        Store(str(blocker / "out")).check_writable()


# ---- path checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../x", "..", "a/../../x", "/etc/passwd", "s3://other/x", "a\\..\\..\\x", "C:/x", "a\x00b"])
def test_paths_that_leave_the_root_are_refused(store, bad):
    with pytest.raises(StorageError):
        safe_rel(bad)
    with pytest.raises(StorageError):
        store.write_text(bad, "x")
    assert not (store.local_path().parent / "x").exists()


def test_safe_rel_normalizes(store):
    assert safe_rel("a/./b//c") == "a/b/c"
    assert safe_rel("a/../b") == "b"
    assert safe_rel("") == ""
    sub = store.sub("adapters/debate")
    sub.write_text("x.txt", "1")
    assert store.read_text("adapters/debate/x.txt") == "1"
    with pytest.raises(StorageError):
        sub.write_text("../../../escape", "x")


def test_uri_checks():
    assert is_s3("s3://b/p") and not is_s3("/tmp/x")
    assert split_s3("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    for bad in ("s3://", "s3:///x", "s3://UPPER/x", "s3://a/x"):
        with pytest.raises(StorageError):
            split_s3(bad)
    with pytest.raises(StorageError, match="only local directories and s3://"):
        Store("gs://bucket/x")


# ---- settings -----------------------------------------------------------------------------------

ENV = {"AWS_ENDPOINT_URL": "http://env-endpoint:1", "AWS_ENDPOINT_URL_S3": "http://env-s3-endpoint:2",
       "AWS_ACCESS_KEY_ID": "AKIDENV", "AWS_SECRET_ACCESS_KEY": "supersecret-env-value", "AWS_REGION": "eu-west-3"}


def test_settings_config_wins_over_env():
    s = S3Settings.resolve(StorageConfig(endpoint_url="http://cfg:9000", region="us-west-2", retries=7), ENV)
    assert (s.endpoint_url, s.region, s.retries) == ("http://cfg:9000", "us-west-2", 7)
    assert (s.access_key, s.secret_key) == ("AKIDENV", "supersecret-env-value")


def test_settings_from_env():
    s = S3Settings.resolve(StorageConfig(), ENV)
    assert s.endpoint_url == "http://env-s3-endpoint:2"  # the S3-specific variable first
    assert S3Settings.resolve(None, {k: v for k, v in ENV.items() if k != "AWS_ENDPOINT_URL_S3"}).endpoint_url == "http://env-endpoint:1"
    assert s.region == "eu-west-3"
    assert S3Settings.resolve(None, {}).region == "us-east-1"
    assert S3Settings.resolve(None, {"AWS_DEFAULT_REGION": "ap-south-1"}).region == "ap-south-1"


def test_settings_incomplete_credentials():
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY is not set"):
        S3Settings.resolve(None, {"AWS_ACCESS_KEY_ID": "AKID"})


def test_settings_never_print_secrets():
    s = S3Settings.resolve(StorageConfig(endpoint_url="http://user:pw-in-url@host:9000/?token=abc"), ENV)
    for text in (repr(s), str(s), f"{s}", repr([s])):
        assert "supersecret-env-value" not in text and "AKIDENV" not in text
        assert "pw-in-url" not in text and "abc" not in text
    assert "credentials=set" in repr(s)
    assert pickle.loads(pickle.dumps(s)) == s  # Ray ships stores to workers


def test_arrow_and_boto3_get_settings_explicitly():
    s = S3Settings("http://127.0.0.1:9", "eu-west-1", "AK", "SK", None, None, 2)
    fs = storage.arrow_s3(s)
    assert fs.region == "eu-west-1"
    c = storage.boto3_client(s)
    assert c.meta.endpoint_url == "http://127.0.0.1:9" and c.meta.region_name == "eu-west-1"
    creds = c._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == ("AK", "SK")


def test_s3_store_repr_and_pickle_hide_nothing_needed(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    st = Store("s3://bucket-x/prefix", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    assert repr(st) == "Store('s3://bucket-x/prefix')"
    assert st.key("a/b") == "prefix/a/b" and st.path("a") == "bucket-x/prefix/a"
    st2 = pickle.loads(pickle.dumps(st))
    assert st2.uri == st.uri and st2.s3 == st.s3
    path, fs = st.ray_storage("runs/demo")
    assert path == "bucket-x/prefix/runs/demo" and isinstance(fs, storage.RayS3FileSystem)
    # Ray Tune pickles the storage filesystem into state files in the bucket: no credentials in it
    blob = pickle.dumps(fs)
    assert b"supersecret-env-value" not in blob and b"AKIDENV" not in blob
    assert b"supersecret-env-value" in pickle.dumps(storage.arrow_s3(st.s3))  # what a plain one would leak
    assert isinstance(pickle.loads(blob), storage.RayS3FileSystem)


# ---- retries --------------------------------------------------------------------------------

@pytest.fixture
def no_sleep(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", lambda s: slept.append(s))
    return slept


def test_transient_errors_are_retried_with_backoff(no_sleep):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect to server")
        return "ok"
    before = storage.STATS["retries"]
    assert retry(flaky, "write x", attempts=6) == "ok"
    assert len(calls) == 4 and no_sleep == [0.5, 1.0, 2.0]
    assert storage.STATS["retries"] - before == 3


def test_backoff_is_capped_and_gives_up_with_a_clear_message(no_sleep):
    def down():
        raise ConnectionRefusedError("Connection refused")
    with pytest.raises(StorageError, match=r"write s3://b/x failed after 7 attempts.*at http://h:1.*server is up") as ei:
        retry(down, "write s3://b/x", attempts=7, endpoint="http://h:1")
    assert no_sleep == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert "Traceback" not in str(ei.value)


def test_permanent_and_not_found_errors_are_not_retried(no_sleep):
    def denied():
        raise OSError("AWS Error SIGNATURE_DOES_NOT_MATCH during PutObject operation")
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY"):
        retry(denied, "write x", attempts=5)

    def missing():
        raise FileNotFoundError("nope")
    with pytest.raises(StorageNotFound):
        retry(missing, "read x", attempts=5)

    def bug():
        raise KeyError("a programming error")
    with pytest.raises(KeyError):
        retry(bug, "read x", attempts=5)
    assert no_sleep == []


@pytest.mark.parametrize("exc,kind", [
    (OSError("AWS Error NETWORK_CONNECTION ... curlCode: 7, Could not connect to server"), "transient"),
    (OSError("AWS Error INTERNAL_FAILURE during UploadPart operation"), "transient"),
    (OSError("AWS Error SLOW_DOWN during PutObject"), "transient"),
    (TimeoutError("timed out"), "transient"),
    (OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."), "permanent"),
    (OSError("AWS Error INVALID_ACCESS_KEY_ID during CreateMultipartUpload"), "permanent"),
    (OSError("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload"), "permanent"),
    (FileNotFoundError("Path does not exist 'b/k'"), "notfound"),
])
def test_classify(exc, kind):
    assert classify(exc)[0] == kind


def test_boto_errors_are_classified():
    from botocore.exceptions import ClientError, EndpointConnectionError
    assert classify(EndpointConnectionError(endpoint_url="http://h:1"))[0] == "transient"
    assert classify(ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"))[0] == "transient"
    assert classify(ClientError({"Error": {"Code": "503"}}, "PutObject"))[0] == "transient"
    assert classify(ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"))[0] == "notfound"
    kind, hint = classify(ClientError({"Error": {"Code": "InvalidAccessKeyId"}}, "PutObject"))
    assert kind == "permanent" and "AWS_ACCESS_KEY_ID" in hint
