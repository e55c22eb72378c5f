"""Hostile or odd inputs (issue 23, point 9): a pathological record costs only itself (its file's other
records are kept and the counts add up), byte-order marks in every text format, an HTTP source that
never ends, YAML aliases and duplicate keys, inf/nan settings, '~' in paths, malformed storage URIs.
Plain functions and in-process `main()`; no Ray."""
from __future__ import annotations

import codecs
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import download as dl
from pipeline.cli import main
from pipeline.config import Config, ConfigError, load_config
from pipeline.prepare import file_events
from pipeline.sources import BUILTIN, Opts
from pipeline.sources.custom import custom_spec
from pipeline.storage import Store, StorageError

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
DEEP = "[" * 100_000 + "]" * 100_000          # deeper than Python's json parser goes (RecursionError)
DEEPISH = "[" * 200 + "]" * 200               # parses, but deeper than any real record


def claim(i: int, extra: str = "") -> dict:
    return {"claim_id": f"c{i}", "claim": f"Claim number {i} about the climate, long enough to keep.",
            "claim_label": "SUPPORTS", "evidences": [{"evidence_id": "e", "evidence_label": "SUPPORTS",
                                                      "article": "A", "evidence": f"Evidence sentence {i}."}]}


def run_file(source: str, path: Path, opts: Opts | None = None, spec=None) -> tuple[list[dict], list[dict]]:
    """(records kept, quarantine rows) of one file through prepare's per-file step."""
    src = spec or BUILTIN[source]
    evs = list(file_events(src, str(path), f"{src.raw_dir}/{path.name}", opts or Opts()))
    assert evs[-1][0] == "f"   # the file was read to its end
    return [e for k, e in evs if k == "r"], [e for k, e in evs if k == "q"]


# ---- a pathological record costs only itself -----------------------------------------------------

def test_jsonl_a_record_nested_too_deep_costs_only_itself(tmp_path):
    lines = [json.dumps(claim(1)), DEEP, json.dumps(claim(2)), json.dumps({**claim(3), "evidences": json.loads(DEEPISH)}),
             json.dumps(claim(4))]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines) + "\n")
    recs, qs = run_file("climate_fever", f)
    assert sorted(r["row"]["title"][:14] for r in recs) == ["Claim number 1", "Claim number 2", "Claim number 4"]
    assert [(q["location"], q["reason"]) for q in qs] == [("line 2", "too_deeply_nested"), ("line 4", "too_deeply_nested")]


def test_json_document_with_one_item_too_deep_keeps_the_others(tmp_path):
    # a JSON list (medical_meadow), {"data": [...]}, and an object keyed by id (pubmed_qa, ddo)
    items = [{"instruction": "Answer the medical question.", "input": f"What is condition {i}?",
              "output": f"Condition {i} is a long enough answer to keep."} for i in range(3)]
    text = json.dumps(items)
    deep_list = text[:-1] + ", " + DEEP + "]"
    for name, body in (("list.json", deep_list), ("data.json", '{"data": ' + deep_list + ', "v": 1}')):
        f = tmp_path / name
        f.write_text(body)
        recs, qs = run_file("medical_meadow", f)
        assert len(recs) == 3 and [(q["location"], q["reason"]) for q in qs] == [("item 3", "too_deeply_nested")]
    pq = {"1": {"QUESTION": "Does aspirin help with long headaches?", "CONTEXTS": ["An abstract sentence here."],
                "final_decision": "yes", "LONG_ANSWER": "It does."}}
    f = tmp_path / "ori_pqal.json"
    f.write_text(json.dumps(pq)[:-1] + ', "2": ' + DEEP + ', "3": ' + json.dumps(pq["1"]) + "}")
    recs, qs = run_file("pubmed_qa", f)
    assert len(recs) == 2 and [(q["location"], q["reason"]) for q in qs] == [("key 2", "too_deeply_nested")]


def test_a_chat_column_nested_too_deep_costs_only_its_row(tmp_path):
    import csv
    from pipeline.config import CustomSourceConfig
    c = CustomSourceConfig(name="chats", domain="law", path=str(tmp_path / "c.csv"), format="csv", messages="m")
    ok = json.dumps([{"role": "user", "content": "What is a tort in law?"},
                     {"role": "assistant", "content": "A civil wrong that causes harm to someone."}])
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["m"], [ok], [DEEP], [ok.replace("tort", "contract")]])
    recs, qs = run_file("chats", tmp_path / "c.csv", spec=custom_spec(c))
    assert len(recs) == 2 and [(q["location"], q["reason"]) for q in qs] == [("line 3", "too_deeply_nested")]


def test_a_record_its_normalizer_did_not_foresee_costs_only_itself(tmp_path, caplog):
    # "evidences": 5 made climate_fever's normalizer raise TypeError, which dropped the rest of the file
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (claim(1), {**claim(2), "evidences": 5}, claim(3))) + "\n")
    recs, qs = run_file("climate_fever", f)
    assert len(recs) == 2 and [(q["location"], q["reason"]) for q in qs] == [("line 2", "record_error")]
    assert qs[0]["snippet"].startswith("TypeError")


def test_a_line_over_the_record_limit_is_skipped_unread_and_counted(tmp_path):
    import tracemalloc
    opts = Opts(max_record_chars=1000)
    f = tmp_path / "c.jsonl"
    with open(f, "w") as fh:   # a 40 MB line between two good ones: it is never held in memory
        fh.write(json.dumps(claim(1)) + "\n" + '{"claim": "' + "x" * (40 << 20) + '"}\n' + json.dumps(claim(3)) + "\n")
    tracemalloc.start()
    try:
        recs, qs = run_file("climate_fever", f, opts)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(recs) == 2 and [(q["location"], q["reason"]) for q in qs] == [("line 2", "too_large")]
    assert peak < 8 << 20, f"peak {peak / 2**20:.0f} MB while reading"


def test_cnxml_nested_too_deep_is_quarantined_with_its_reason(tmp_path):
    mod = tmp_path / "openstax" / "osbooks-x" / "modules" / "m1"
    mod.mkdir(parents=True)
    deep = "<section>" * 5000 + "<para>Deep text.</para>" + "</section>" * 5000
    (mod / "index.cnxml").write_text(f'<document xmlns="http://cnx.rice.edu/cnxml"><title>T</title>'
                                     f"<content>{deep}</content></document>")
    src = BUILTIN["openstax"]
    evs = list(file_events(src, str(mod / "index.cnxml"), "openstax/osbooks-x/modules/m1/index.cnxml", Opts()))
    qs = [e for k, e in evs if k == "q"]
    assert [q["reason"] for q in qs] == ["too_deeply_nested"]


# ---- byte-order marks -----------------------------------------------------------------------------

def test_utf8_bom_keeps_the_first_record_of_a_jsonl_file_and_of_every_joined_part(tmp_path):
    f = tmp_path / "c.jsonl"
    bom = codecs.BOM_UTF8
    f.write_bytes(bom + json.dumps(claim(1)).encode() + b"\n" + json.dumps(claim(2)).encode() + b"\n"
                  + bom + json.dumps(claim(3)).encode() + b"\n")
    recs, qs = run_file("climate_fever", f)
    assert len(recs) == 3 and qs == []


@pytest.mark.parametrize("enc", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_with_a_bom_are_read(tmp_path, enc):
    bom = {"utf-16": b"", "utf-16-be": codecs.BOM_UTF16_BE, "utf-32": b""}[enc]   # utf-16/32 write their own
    text = json.dumps(claim(1)) + "\n" + json.dumps(claim(2)) + "\n"
    (tmp_path / "c.jsonl").write_bytes(bom + text.encode(enc))
    recs, qs = run_file("climate_fever", tmp_path / "c.jsonl")
    assert len(recs) == 2 and qs == []
    # a JSON document read whole, and IAM's tab-separated text
    items = [{"instruction": "Answer.", "input": "What is a fever in adults?", "output": "A body temperature above normal."}]
    (tmp_path / "m.json").write_bytes(bom + json.dumps(items).encode(enc))
    assert len(run_file("medical_meadow", tmp_path / "m.json")[0]) == 1
    line = "C\tThe topic sentence\tA candidate sentence that is long enough.\t1\t1\n"
    (tmp_path / "iam.txt").write_bytes(bom + line.encode(enc))
    recs, qs = run_file("iam", tmp_path / "iam.txt")
    assert len(recs) == 1 and qs == []


def test_bom_before_a_quoted_csv_header(tmp_path):
    from pipeline.config import CustomSourceConfig
    c = CustomSourceConfig(name="pairs", domain="law", path=str(tmp_path / "p.csv"), format="csv",
                           prompt="prompt", response="response")
    body = '"prompt","response"\n"What is a tort?","A civil wrong that causes harm."\n'
    (tmp_path / "p.csv").write_bytes(codecs.BOM_UTF8 + body.encode())
    recs, qs = run_file("pairs", tmp_path / "p.csv", spec=custom_spec(c))
    assert len(recs) == 1 and qs == []
    (tmp_path / "p.csv").write_bytes(body.encode("utf-16"))
    recs, qs = run_file("pairs", tmp_path / "p.csv", spec=custom_spec(c))
    assert len(recs) == 1 and qs == []


def test_bom_in_xml_and_txt(tmp_path):
    xml = ('<?xml version="1.0" encoding="UTF-8"?><Document id="1" source="x"><Focus>Fever</Focus><QAPairs>'
           '<QAPair pid="1"><Question qid="1" qtype="information">What is a fever in adults?</Question>'
           "<Answer>A body temperature above the normal range.</Answer></QAPair></QAPairs></Document>")
    (tmp_path / "a.xml").write_bytes(codecs.BOM_UTF8 + xml.encode())
    recs, qs = run_file("medquad", tmp_path / "a.xml")
    assert len(recs) == 1 and qs == []
    book = "Biology Book\nChapter 1 Cells\n" + "Cells are the basic unit of life in every organism. " * 3 + "\n"
    (tmp_path / "b.txt").write_bytes(codecs.BOM_UTF8 + book.encode())
    recs, qs = run_file("openstax", tmp_path / "b.txt")
    assert len(recs) == 1 and qs == [] and json.loads(recs[0]["row"]["metadata"])["book"] == "Biology Book"


# ---- an HTTP source that never ends ---------------------------------------------------------------

class Endless(BaseHTTPRequestHandler):
    """Streams zeros forever, without a Content-Length; /slow trickles a few bytes a second."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        block = b"0" * (64 << 10)
        try:
            while True:
                if self.path.startswith("/slow"):
                    self.wfile.write(b"0")
                    self.wfile.flush()
                    time.sleep(0.05)
                else:
                    self.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *a):
        pass


@pytest.fixture
def endless():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_an_endless_http_source_stops_at_max_file_mb_and_leaves_nothing(tmp_path, endless):
    d = {"output": str(tmp_path / "out"), "model": {"base": "tiny"}, "resources": {"device": "cpu"},
         "data": {"raw_dir": str(tmp_path / "raw"), "download": {
             "only": ["ddo"], "retries": 2, "timeout_s": 5, "max_file_mb": 3,
             "ddo_debates_url": endless + "/debates.json", "ddo_users_url": endless + "/users.json"}}}
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"more than download.max_file_mb \(3 MB\)"):
        dl.run_download(Config.model_validate(d))
    assert time.monotonic() - t0 < 30
    left = [p for p in (tmp_path / "raw").rglob("*") if p.is_file() and p.name != "download_manifest.json"]
    assert left == []


def test_a_trickling_http_source_stops_at_max_time_s(tmp_path, endless):
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError, match=r"not finished after download.max_time_s"):
        dl.http_download(endless + "/slow", tmp_path / "f.bin", 5, 2, max_bytes=1 << 30, max_total_s=1.5)
    assert time.monotonic() - t0 < 10 and not (tmp_path / "f.bin").exists()


# ---- the config ---------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "c.yaml"
    f.write_text("model: {base: tiny}\nresources: {device: cpu}\n" + text)
    return f


def test_yaml_aliases_are_refused_at_once_with_one_line(tmp_path):
    # nested aliases: each level doubles the last; 30 levels used to hang and take gigabytes
    lines = ["x0: &a0 [1, 2]"] + [f"x{i}: &a{i} [*a{i-1}, *a{i-1}]" for i in range(1, 30)]
    f = write(tmp_path, "run_name: &name r\n" + "\n".join(lines) + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={})
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "alias *a0 is not allowed" in msg and "line 5" in msg


def test_duplicate_yaml_keys_are_refused_naming_both_lines(tmp_path):
    f = write(tmp_path, "train:\n  max_steps: 5\n  learning_rate: 0.001\n  max_steps: 50\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={})
    assert str(e.value) == f"config file {f}, line 6: duplicate key 'max_steps' (first on line 4): keep one of them"
    f = write(tmp_path, "lora: {r: 8, r: 16}\n")
    with pytest.raises(ConfigError, match="duplicate key 'r'"):
        load_config(f, environ={})


@pytest.mark.parametrize("key,value", [("train.learning_rate", ".inf"), ("train.learning_rate", ".nan"),
                                       ("train.max_grad_norm", "inf"), ("data.download.timeout_s", "nan"),
                                       ("train.per_domain.debate.learning_rate", ".inf"),
                                       ("train.memory_budget_gb", "1e999")])
def test_non_finite_numbers_are_refused_at_config_time(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, sets=[f"{key}={value}"], environ={})
    assert key in str(e.value) and "finite number" in str(e.value)


def test_home_is_expanded_in_config_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    f = write(tmp_path, "output: ~/out\ndata: {raw_dir: ~/raw}\n")
    cfg = load_config(f, environ={})
    assert cfg.output == str(tmp_path / "out") and cfg.data.raw_dir == str(tmp_path / "raw")
    cfg = load_config(DEMO, sets=["output=~/o2", "data.raw_dir=~/r2"], environ={})
    assert cfg.output == str(tmp_path / "o2") and cfg.data.raw_dir == str(tmp_path / "r2")
    cfg = load_config(DEMO, output="~/o3", raw_dir="~/r3", environ={})
    assert cfg.output == str(tmp_path / "o3") and cfg.data.raw_dir == str(tmp_path / "r3")


BAD_URIS = ["s3:/bucket/x", "s3:bucket/x", "S3://bucket/x", "s3://", "s3:///x", "s3://a/x", "s3://Bad_Bucket/x",
            "s3://bucket//x", "s3://bucket/a/../b", "s3://key:secretvalue@bucket/x", "gs://bucket/x", "file:///tmp/x",
            "s3a://bucket/x", "s3:/key:secretvalue@bucket/x", "gs://key:secretvalue@bucket/x"]


@pytest.mark.parametrize("uri", BAD_URIS)
def test_every_malformed_output_uri_exits_2_with_one_line(tmp_path, capsys, uri):
    os.chdir(tmp_path)
    rc = main(["prepare", "--config", str(DEMO), "--output", uri])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "output" in err[0]
    assert "secretvalue" not in err[0]
    assert list(tmp_path.iterdir()) == []     # no local folder named 's3:' or anything else


@pytest.mark.parametrize("uri", ["s3:/bucket/x", "s3://"])
def test_malformed_uris_in_yaml_paths_and_status(tmp_path, capsys, uri):
    for text in (f"output: '{uri}'\n", f"model: {{base: '{uri}'}}\nresources: {{device: cpu}}\n"):
        f = tmp_path / "c.yaml"
        f.write_text(("model: {base: tiny}\nresources: {device: cpu}\n" if "base" not in text else "") + text)
        with pytest.raises(ConfigError, match=r"(output|model\.base) .*(S3 URI|no bucket)"):
            load_config(f, environ={})
    rc = main(["status", "--output", uri])
    assert rc == 2 and "error:" in capsys.readouterr().err
    with pytest.raises(StorageError) as e:
        Store(uri)
    assert e.value.exit_code == 2
