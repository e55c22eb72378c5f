"""pipeline/storage.py without a server: local atomic writes, path checks, settings, retries."""
from __future__ import annotations

import os
import pickle

import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.errors import UserFacingError
from pipeline.storage import S3Settings, Store, StorageError, StorageNotFound, is_s3, safe_rel, split_s3


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
    (store.local_path("a") / ".c.tmp-9" / "tree").mkdir(parents=True)  # a copy killed half-way
    (store.local_path("a") / ".c.tmp-9" / "tree" / "w.bin").write_text("partial")
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
    # a local store's local copy is the directory itself (nothing copied, nothing to clean up)
    with store.local_copy("adapters/debate") as path:   # a local store: the folder itself, left in place
        assert path == str(store.local_path("adapters/debate"))
    assert store.local_path("adapters/debate").is_dir()


def test_read_table_projects_columns_and_reads_a_directory_of_shards(store):
    store.write_table("data/sft/d/train/part-00000.parquet", pa.table({"prompt": ["a", "b"], "response": ["1", "2"]}))
    store.write_table("data/sft/d/train/part-00001.parquet", pa.table({"prompt": ["c"], "response": ["3"]}))
    (store.local_path("data/sft/d/train") / ".part-00002.parquet.tmp-1").write_bytes(b"half written")
    one = store.read_table("data/sft/d/train/part-00001.parquet", columns=["response"])
    assert one.column_names == ["response"] and one.to_pylist() == [{"response": "3"}]
    both = store.read_table("data/sft/d/train", columns=["prompt"])
    assert both.column("prompt").to_pylist() == ["a", "b", "c"]  # shards in path order, temp files skipped
    paths, fs = store.parquet_paths("data/sft/d/train")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["part-00000.parquet", "part-00001.parquet"]
    import pyarrow.parquet as pq
    assert pq.read_table(paths, filesystem=fs).num_rows == 3
    with pytest.raises(StorageNotFound):
        store.read_table("data/sft/d/val")


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_are_readable_as_the_umask_allows(tmp_path, umask, file_mode, dir_mode):
    """Files the store writes get 0666 and directories 0777 less the umask (mkstemp alone gives 0600)."""
    old = os.umask(umask)
    try:
        store = Store(str(tmp_path / "out"))
        store.write_json("report/summary.json", {"a": 1})
        store.write_table("data/sft/d/train/part-00000.parquet", pa.table({"x": [1]}))
        src = tmp_path / "adapter"
        (src / "sub").mkdir(parents=True)
        (src / "adapter_config.json").write_text("{}")
        (src / "sub" / "w.bin").write_bytes(b"\x00")
        os.chmod(src / "adapter_config.json", 0o600)  # the source's own mode does not leak into the output
        store.upload_dir(src, "adapters/d")
        store.upload_file(src / "adapter_config.json", "adapters/e/adapter_config.json")
        back = store.download_dir("adapters/d", tmp_path / "back")
    finally:
        os.umask(old)
    root = store.local_path()
    files = [p for p in list(root.rglob("*")) + list(back.rglob("*")) if p.is_file()]
    dirs = [p for p in list(root.rglob("*")) + list(back.rglob("*")) if p.is_dir()]
    assert len(files) == 7 and dirs
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode)}, [(p, oct(p.stat().st_mode)) for p in files]
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(dir_mode)}


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


# ---- retries and errors ---------------------------------------------------------------------
# The SDKs retry (their "standard" mode, sized from storage.retries); the store only names the fix.

def test_retries_are_sized_from_storage_retries_in_both_sdks():
    s = S3Settings("http://127.0.0.1:9", "eu-west-1", "AK", "SK", None, None, 7)
    c = storage.boto3_client(s)
    assert c.meta.config.retries == {"total_max_attempts": 8, "mode": "standard"}
    assert storage._attempts(s) == 8 and storage._attempts(S3Settings(None, None, retries=0)) == 1


@pytest.mark.parametrize("exc,fix", [
    (OSError("AWS Error SIGNATURE_DOES_NOT_MATCH during PutObject operation"), "AWS_SECRET_ACCESS_KEY"),
    (OSError("AWS Error INVALID_ACCESS_KEY_ID during CreateMultipartUpload"), "AWS_ACCESS_KEY_ID"),
    (OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."), "bucket policy"),
    (OSError("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload"), "create it first"),
    (FileNotFoundError("Bucket 'b' not found: AWS Error NO_SUCH_BUCKET"), "create it first"),
])
def test_permanent_errors_name_the_fix(exc, fix):
    err = storage._storage_error(exc, "write s3://b/x", 6, "http://h:1")
    assert type(err) is StorageError and fix in str(err) and "attempts" not in str(err)


def test_what_the_sdk_gave_up_on_says_how_often_and_what_to_check():
    exc = OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect to server")
    err = storage._storage_error(exc, "write s3://b/x", 6, "http://h:1")
    assert isinstance(err, StorageError)
    assert "write s3://b/x failed after 6 attempts" in str(err) and "at http://h:1" in str(err)
    assert "server is up" in str(err) and "storage.retries" in str(err)
    assert "storage.retries is 0" in str(storage._storage_error(exc, "w", 1, ""))


def test_not_found_and_bugs():
    from botocore.exceptions import ClientError
    assert isinstance(storage._storage_error(FileNotFoundError("Path does not exist 'b/k'"), "read x", 3, ""),
                      StorageNotFound)
    assert isinstance(storage._storage_error(ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"), "r", 3, ""),
                      StorageNotFound)
    bug = KeyError("a programming error")
    assert storage._storage_error(bug, "read x", 3, "") is bug  # not an I/O error: raised as it is


def test_boto_errors_name_the_fix():
    from botocore.exceptions import ClientError, EndpointConnectionError
    err = storage._storage_error(ClientError({"Error": {"Code": "InvalidAccessKeyId"}}, "PutObject"), "w", 3, "")
    assert "AWS_ACCESS_KEY_ID" in str(err)
    err = storage._storage_error(EndpointConnectionError(endpoint_url="http://h:1"), "w", 3, "http://h:1")
    assert "failed after 3 attempts" in str(err) and "server is up" in str(err)
