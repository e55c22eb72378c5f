"""pipeline/storage.py against a real S3 server (SeaweedFS on loopback, credentials enforced)."""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.storage import S3Settings, Store, StorageError, StorageNotFound
from tests.fixtures_s3 import serve_s3


def settings(srv, retries: int = 5, secret: str | None = None, key: str | None = None) -> S3Settings:
    return S3Settings(srv.endpoint, srv.region, key or srv.access_key, secret or srv.secret_key, None, None, retries)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A server of this module's own: its outage tests stop and restart it, which takes much longer with the
    objects that the pipeline tests leave in the session's server."""
    yield from serve_s3(tmp_path_factory)


@pytest.fixture
def bucket(s3_server):
    return s3_server.make_bucket()


def test_round_trip_pyarrow_and_boto3(s3_server, bucket, tmp_path):
    st = Store(f"s3://{bucket}/runs/r1", settings=settings(s3_server))
    st.check_writable()
    st.write_json("data/manifest.json", {"sources": {"medmcqa": {"kept": 3}}})
    st.write_table("data/sft/medicine/train/part-00000.parquet", pa.table({"prompt": ["q"], "response": ["a"]}))
    # pyarrow directly on the store's filesystem (as Ray Data / Ray Train use it)
    pq.write_table(pa.table({"x": list(range(100))}), st.path("data/corpus/medicine/part-0.parquet"), filesystem=st.fs)
    # boto3 managed upload of an adapter directory
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{"r": 16}')
    (ad / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    st.upload_dir(ad, "adapters/medicine")

    expected = ["adapters/medicine/adapter_config.json", "adapters/medicine/adapter_model.safetensors",
                "data/corpus/medicine/part-0.parquet", "data/manifest.json",
                "data/sft/medicine/train/part-00000.parquet"]
    assert st.list_files() == expected
    # what the server holds, seen by an independent boto3 client: exactly these keys, nothing more
    assert s3_server.list_keys(bucket) == [f"runs/r1/{k}" for k in expected]
    c = s3_server.client()
    body = c.get_object(Bucket=bucket, Key="runs/r1/data/sft/medicine/train/part-00000.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body)).to_pylist() == [{"prompt": "q", "response": "a"}]
    assert st.read_json("data/manifest.json")["sources"]["medmcqa"]["kept"] == 3
    assert pq.read_table(st.path("data/corpus/medicine/part-0.parquet"), filesystem=st.fs).num_rows == 100
    assert st.read_table("data/sft/medicine/train", columns=["response"]).to_pylist() == [{"response": "a"}]
    paths, fs = st.parquet_paths("data/corpus/medicine")  # what ray.data.read_parquet gets
    assert paths == [st.path("data/corpus/medicine/part-0.parquet")] and isinstance(fs, storage.RayS3FileSystem)
    assert pq.read_table(paths, filesystem=fs).num_rows == 100
    back = st.download_dir("adapters/medicine", tmp_path / "back")
    assert (back / "adapter_model.safetensors").read_bytes() == (ad / "adapter_model.safetensors").read_bytes()
    with st.local_copy("adapters/medicine") as copy:   # what PeftModel.from_pretrained reads: a local copy
        assert (Path(copy) / "adapter_model.safetensors").read_bytes() == (ad / "adapter_model.safetensors").read_bytes()
    assert not Path(copy).exists()                     # removed when the reader is done (was left in /tmp)
    with pytest.raises(StorageNotFound):
        st.read_bytes("data/nope.json")
    assert st.read_json_or("data/nope.json", "missing") == "missing"
    st.delete("adapters")
    assert st.list_files("adapters") == []
    # the Ray Train storage pair works on the same filesystem
    path, fs = st.ray_storage("runs/demo")
    with fs.open_output_stream(f"{path}/checkpoint_000001/state.json") as f:
        f.write(b"{}")
    assert st.is_file("runs/demo/checkpoint_000001/state.json")


def test_ray_storage_filesystem_pickles_without_credentials(s3_server, bucket, monkeypatch):
    import pickle
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    st = Store(f"s3://{bucket}/ray", StorageConfig(endpoint_url=s3_server.endpoint))
    path, fs = st.ray_storage("runs/demo")
    blob = pickle.dumps(fs)
    assert s3_server.secret_key.encode() not in blob and s3_server.access_key.encode() not in blob
    fs2 = pickle.loads(blob)  # a worker: credentials from its environment
    with fs2.open_output_stream(f"{path}/x.json") as f:
        f.write(b"{}")
    assert st.read_json("runs/demo/x.json") == {}


def test_settings_from_env_and_config(s3_server, bucket, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    st = Store(f"s3://{bucket}/env", StorageConfig())
    st.check_writable()
    st.write_text("a.txt", "from env")
    # config storage.endpoint_url wins over a wrong AWS_ENDPOINT_URL*
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    st2 = Store(f"s3://{bucket}/env", StorageConfig(endpoint_url=s3_server.endpoint))
    assert st2.read_text("a.txt") == "from env"


def test_no_bucket_is_a_clear_error_before_any_work(s3_server):
    st = Store("s3://no-such-bucket-here/x", settings=settings(s3_server))
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist: create it first"):
        st.check_writable()
    assert time.monotonic() - t0 < 10
    with pytest.raises(StorageError, match="bucket does not exist"):
        st.write_text("a", "b")


@pytest.mark.parametrize("which", ["secret", "key"])
def test_wrong_credentials_are_a_clear_error(s3_server, bucket, which, caplog):
    bad = "wrong-secret-never-printed-0123456789"
    s = settings(s3_server, secret=bad) if which == "secret" else settings(s3_server, key="AKNOTKNOWN", secret=bad)
    st = Store(f"s3://{bucket}/x", settings=s)
    want = "AWS_SECRET_ACCESS_KEY" if which == "secret" else "AWS_ACCESS_KEY_ID"
    t0 = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(StorageError, match=want) as ei:
            st.check_writable()
        with pytest.raises(StorageError, match=want):  # a write fails at once too, not after retries
            st.write_text("a.txt", "b")
    assert time.monotonic() - t0 < 10
    for text in (str(ei.value), caplog.text, repr(st), repr(st.s3)):
        assert bad not in text and s3_server.secret_key not in text
    assert s3_server.list_keys(bucket) == []


def test_cli_refuses_a_missing_bucket_before_any_work(s3_server, monkeypatch, capsys, tmp_path):
    from pipeline.cli import main
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    rc = main(["report", "--config", "configs/demo.yaml", "--output", "s3://not-created-bucket/out"])
    err = capsys.readouterr().err
    assert rc == 1 and "does not exist: create it first" in err, err
    assert s3_server.secret_key not in err


@pytest.mark.slow
def test_server_down_for_a_few_seconds_writes_are_retried_nothing_lost(s3_server, bucket, caplog):
    """The SDK's own retries (storage.retries=8) carry writes over a 3 s outage: a write that starts
    while the server is down returns only after the server is back, and nothing is lost or doubled."""
    st = Store(f"s3://{bucket}/outage", settings=settings(s3_server, retries=8))
    n, written, spans = 60, {}, {}
    outage = None
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        try:
            for i in range(n):
                if i == 10:
                    outage = s3_server.outage(seconds=3.0)
                    time.sleep(0.5)  # let the stop happen: the next writes meet a dead server
                rel = f"shards/part-{i:05d}.parquet" if i % 3 == 0 else f"state/{i:05d}.json"
                start = time.monotonic()
                if i % 3 == 0:
                    st.write_table(rel, pa.table({"i": [i] * 100}))
                else:
                    st.write_json(rel, {"i": i})
                spans[rel] = (start, time.monotonic())
                written[rel] = i
        finally:
            if outage is not None:
                outage.join(120)
            if not s3_server.is_running():
                s3_server.start()
    elapsed = time.monotonic() - t0
    tm = outage.timings
    during = [rel for rel, (a, b) in spans.items() if tm["stopped_at"] <= a < tm["started_at"]]
    print(f"\n60 writes with a {tm['started_at'] - tm['stopped_at']:.1f}s outage "
          f"(server back and ready after {tm['ready_at'] - tm['stopped_at']:.1f}s): {elapsed:.1f}s; "
          f"the write started in the outage returned {spans[during[0]][1] - tm['stopped_at']:.1f}s after the stop")
    # the write that met the dead server was retried until the server was back (it cannot succeed before)
    assert during and spans[during[0]][1] >= tm["started_at"]
    # nothing lost, nothing duplicated: exactly the written keys, each with its content
    keys = s3_server.list_keys(bucket, "outage/")
    assert keys == sorted(f"outage/{r}" for r in written)
    for rel, i in written.items():
        if rel.endswith(".json"):
            assert st.read_json(rel) == {"i": i}
        else:
            assert st.read_table(rel).column("i").to_pylist() == [i] * 100
    assert s3_server.secret_key not in caplog.text


@pytest.mark.slow
def test_server_stopped_mid_upload_the_upload_is_retried_and_completes(s3_server, bucket, tmp_path, monkeypatch):
    """A 48 MiB multipart upload of a model directory while the server is killed and restarted: the
    parts are retried by the SDK and the object is whole. download_dir streams it back (never
    through read_bytes, which would hold the whole file in memory)."""
    st = Store(f"s3://{bucket}/model", settings=settings(s3_server, retries=8))
    src = tmp_path / "model"
    src.mkdir()
    blob = bytes(range(256)) * (48 * 4096)
    (src / "model.safetensors").write_bytes(blob)
    (src / "config.json").write_text("{}")
    outage = s3_server.outage(seconds=2.0, delay=0.1)
    t0 = time.monotonic()
    try:
        st.upload_dir(src, "base")
    finally:
        outage.join(120)
    took = time.monotonic() - t0
    print(f"\nupload across an outage: {took:.1f}s (server stopped at +{outage.timings['stopped_at'] - t0:.1f}s, "
          f"ready at +{outage.timings['ready_at'] - t0:.1f}s)")
    assert t0 + took >= outage.timings["started_at"]  # it met the dead server and waited it out
    assert st.size("base/model.safetensors") == len(blob)

    def whole_file_read(self, rel):
        raise AssertionError(f"download_dir read {rel} whole into memory")
    monkeypatch.setattr(Store, "read_bytes", whole_file_read)
    back = st.download_dir("base", tmp_path / "back")
    assert (back / "model.safetensors").read_bytes() == blob and (back / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_server_down_for_good_is_a_clear_error_and_local_state_intact(s3_server, bucket, tmp_path):
    local = Store(str(tmp_path / "local"))
    local.write_json("state.json", {"step": 7})
    st = Store(f"s3://{bucket}/gone", settings=settings(s3_server, retries=2))
    st.write_text("before.txt", "kept")
    s3_server.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as ei:
            st.write_text("after.txt", "x")
        took = time.monotonic() - t0
        msg = str(ei.value)
        assert "failed after 3 attempts" in msg and s3_server.endpoint in msg and "server is up" in msg, msg
        with pytest.raises(StorageError, match="cannot connect to the endpoint"):
            st.check_writable()
        # storage.retries: 0 -> one attempt, no backoff, and the message says how to get retries
        t1 = time.monotonic()
        with pytest.raises(StorageError) as ei0:
            Store(f"s3://{bucket}/gone", settings=settings(s3_server, retries=0)).write_text("after.txt", "x")
        assert time.monotonic() - t1 < 5 and "after 1 attempt (storage.retries is 0)" in str(ei0.value)
        assert "raise storage.retries" in str(ei0.value)
        print(f"\nserver down for good: write gave up after {took:.1f}s (storage.retries=2): {msg[:120]}...")
        assert local.read_json("state.json") == {"step": 7}
        assert local.list_files() == ["state.json"]
    finally:
        s3_server.start()
    assert st.read_text("before.txt") == "kept"
    assert not st.exists("after.txt")


def test_custom_source_on_s3_is_downloaded_then_prepared(s3_server, bucket, tmp_path, monkeypatch):
    """data.custom_sources with an s3:// path: `adapters download` copies it into <raw_dir>/custom/<name>/
    (through the Store, credentials from the environment), prepare reads it like a built-in source."""
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.download import run_download
    from pipeline.prepare import run_prepare
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    law = Path(__file__).resolve().parents[2] / "fixtures" / "custom" / "law.jsonl"
    s3_server.client().put_object(Bucket=bucket, Key="mine/law/law.jsonl", Body=law.read_bytes())
    s3_server.client().put_object(Bucket=bucket, Key="mine/law/notes.txt", Body=b"not jsonl")
    src = (f"data.custom_sources=[{{name: harbour_code, domain: law, path: 's3://{bucket}/mine/law', "
           "format: jsonl, prompt: question, response: answer}]")
    cfg = load_config(None, sets=["model.base=tiny", "resources.device=cpu", src, "data.sources=[]", "domains=[law]"],
                      raw_dir=str(tmp_path / "raw"), output=str(tmp_path / "out"), environ={})
    m = run_download(cfg)
    entry = m["sources"]["harbour_code"]
    assert entry["status"] == "downloaded" and entry["parts"][0]["kind"] == "s3"
    got = tmp_path / "raw" / "custom" / "harbour_code"
    assert (got / "law.jsonl").read_bytes() == law.read_bytes() and not (got / "notes.txt").exists()
    assert s3_server.secret_key not in (tmp_path / "raw" / "download_manifest.json").read_text()
    p = run_prepare(cfg, use_ray=False)
    assert p["sources"]["harbour_code"]["kept"] == 60 and p["domains"]["law"]["status"] == "ok"
