"""pipeline/report/ on fake-but-realistic output trees (written through the Store)."""
from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.report import run_report, scrub
from pipeline.storage import Store

ROOT = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
TOKEN = "tok-0123456789abcdefSECRET"
URL_PASSWORD = "hunter2pw"


def fake_manifest() -> dict:
    def src(domain, read, kept, q, dd, cap, reasons, lic, files):
        return {"status": "ok", "domain": domain, "license": lic, "url": f"https://example.org/{domain}",
                "read": read, "kept": kept, "quarantined": q, "quarantined_by_reason": reasons,
                "deduplicated": dd, "capped": cap, "cap": 200 if cap else None, "sft_examples": kept,
                "files": [{"path": f, "size": 1234 + i, "sha256": f"{i:02d}" * 32, "status": "read"} for i, f in enumerate(files)]}
    sources = {
        "debatesum": src("debate", 250, 200, 20, 10, 20, {"empty_text": 12, "bad_csv_row": 8}, "MIT", ["DebateSum/debateallcsv.csv"]),
        "iam": src("debate", 60, 55, 5, 0, 0, {"wrong_column_count": 5}, "CC BY-SA 4.0", ["IAM/claims/train.txt", "IAM/stance/train.txt"]),
        "medmcqa": src("medicine", 120, 118, 2, 0, 0, {"invalid_json_line": 2}, "Apache-2.0", ["MedMCQA/train.json"]),
        "medquad": src("medicine", 40, 30, 10, 0, 0, {"empty_answer": 9, "truncated_xml": 1}, "CC BY 4.0", ["MedQuAD/1_CancerGov/a.xml"]),
        "openstax": src("education", 80, 80, 0, 0, 0, {}, "CC BY 4.0", ["OpenStax/biology.txt"]),
        "climate_fever": src("ecology", 0, 0, 0, 0, 0, {}, "CC BY-SA 4.0", []),
    }
    sources["climate_fever"]["status"] = "missing"
    for m in sources.values():
        assert m["read"] == m["kept"] + m["quarantined"] + m["deduplicated"] + m["capped"]
    domains = {
        "debate": {"status": "ok", "corpus_rows": 255, "sft_rows": {"train": 160, "val": 20, "test": 20},
                   "tokens_estimate": {"corpus": 91000}},
        "medicine": {"status": "ok", "corpus_rows": 148, "sft_rows": {"train": 118, "val": 15, "test": 15},
                     "tokens_estimate": {"corpus": 40000}},
        "education": {"status": "ok", "corpus_rows": 80, "sft_rows": {"train": 64, "val": 8, "test": 8},
                      "tokens_estimate": {"corpus": 60000}},
        "ecology": {"status": "empty", "corpus_rows": 0, "sft_rows": {"train": 0, "val": 0, "test": 0},
                    "reason": "no records: every source is missing or fully quarantined"},
    }
    return {"version": 1, "fingerprint": "f" * 64, "sources": sources, "domains": domains,
            "totals": {k: sum(s[k] for s in sources.values()) for k in ("read", "kept", "quarantined", "deduplicated", "capped")}}


def fake_report(domain: str, base: float, final: float, uri: str) -> dict:
    train = [{"step": s, "loss": base - (base - final) * (1 - math.exp(-s / 12)) + 0.05 * math.sin(s), "lr": 2e-3}
             for s in range(5, 45, 5)]
    val = [{"step": s, "loss": base - (base - final - 0.05) * (1 - math.exp(-s / 12))} for s in (20, 40)]
    return {"domain": domain, "status": "finished", "train_loss": train[-1]["loss"], "val_loss": final + 0.05,
            "test_loss": final + 0.07, "val_ppl": math.exp(final + 0.05), "test_ppl": math.exp(final + 0.07),
            "base_val_loss": base, "base_val_ppl": math.exp(base), "tokens_per_s": 1834.2, "peak_memory_gb": 0.41,
            "wall_time_s": 61.3, "busy_share": 0.62, "steps": 40, "n_examples": {"train": 160, "val": 20, "test": 20},
            "history": {"train": train, "val": val}, "adapter_uri": uri}


def fake_matrix() -> dict:
    ds = ["debate", "medicine", "education"]
    loss = {"base": {"debate": 4.10, "medicine": 4.35, "education": 4.20},
            "debate": {"debate": 3.02, "medicine": 4.01, "education": 3.88},
            "medicine": {"debate": 3.95, "medicine": 2.91, "education": 3.79}}
    return {"models": ["base", "debate", "medicine"], "datasets": ds, "loss": loss,
            "ppl": {m: {d: math.exp(v) for d, v in r.items()} for m, r in loss.items()}}


def write_tree(store: Store, run_name: str = "demo", with_matrix: bool = True) -> None:
    store.write_json("data/manifest.json", fake_manifest())
    store.write_json("data/download_manifest.json", {"sources": {"debatesum": {"parts": [{"revision": "main", "commit": "abc123"}]}}})
    for d, b, f in (("debate", 4.1, 3.0), ("medicine", 4.35, 2.9)):
        store.write_json(f"adapters/{d}/training_report.json", fake_report(d, b, f, store.uri_of(f"adapters/{d}")))
        store.write_json(f"runs/{run_name}/domains/{d}.json", {"domain": d, "state": "finished", "error": None,
                                                                "updated": "2026-11-24T15:00:00+00:00", "val_loss": f})
    store.write_json(f"runs/{run_name}/domains/education.json", {
        "domain": "education", "state": "failed", "updated": "2026-11-24T15:01:00+00:00", "val_loss": None,
        "error": "OutOfMemoryError: CUDA out of memory (simulated) after 3 attempts (FailureConfig max_failures=2)"})
    # ecology: nothing but an empty domain in the manifest -> skipped with the manifest's reason
    if with_matrix:
        store.write_json("eval/matrix.json", fake_matrix())


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREPORTTEST0001")
    monkeypatch.setenv("DDO_DEBATES_URL", f"https://drive.example.com/uc?id=1&token={TOKEN}")
    return load_config(ROOT / "configs" / "demo.yaml", output=str(tmp_path / "out"),
                       sets=[f"storage.endpoint_url=http://admin:{URL_PASSWORD}@127.0.0.1:9000"])


def all_report_text(store: Store) -> dict[str, str]:
    return {r: store.read_bytes(r).decode("utf-8", errors="replace") for r in store.list_files("report")}


def test_full_report(cfg):
    store = Store(cfg.output)
    write_tree(store)
    out = run_report(cfg)
    assert set(out) == {"json", "md", "html", "loss_curves.png", "perplexity.png", "eval_matrix.png"}
    assert store.list_files("report") == ["report/eval_matrix.png", "report/loss_curves.png", "report/perplexity.png",
                                          "report/summary.html", "report/summary.json", "report/summary.md"]
    s = store.read_json("report/summary.json")
    d = s["domains"]
    assert [d[x]["status"] for x in ("debate", "medicine", "education", "ecology")] == ["finished", "finished", "failed", "skipped"]
    assert "CUDA out of memory" in d["education"]["cause"]
    assert "no records" in d["ecology"]["cause"]
    deb = d["debate"]
    assert deb["examples"] == {"train": 160, "val": 20, "test": 20}
    for k in ("train_loss", "val_loss", "test_loss", "val_ppl", "test_ppl", "base_val_loss", "base_test_loss",
              "base_val_ppl", "base_test_ppl", "tokens_per_s", "peak_memory_gb", "wall_time_s", "busy_share"):
        assert isinstance(deb[k], float), k
    assert deb["adapter_uri"] == store.uri_of("adapters/debate")
    assert deb["test_ppl_change_pct"] < 0
    assert d["education"]["examples"] == {"train": 64, "val": 8, "test": 8}  # from the manifest
    assert d["education"]["val_loss"] is None and d["education"]["adapter_uri"] is None
    assert s["status_counts"] == {"finished": 2, "failed": 1, "skipped": 1}
    assert s["eval_matrix"]["models"] == ["base", "debate", "medicine"]
    card = s["data"]
    assert card["sources"]["medquad"]["quarantined_by_reason"] == {"empty_answer": 9, "truncated_xml": 1}
    assert card["sources"]["debatesum"]["license"] == "MIT" and card["sources"]["debatesum"]["version"] == "abc123"
    assert card["totals"]["read"] == 550
    rep = s["reproducibility"]
    assert rep["config"]["run_name"] == "demo" and rep["seeds"]["seed"] == 42
    assert rep["data_hashes"]["iam"]["IAM/stance/train.txt"] == "01" * 32
    assert rep["packages"]["pyarrow"] and rep["packages"]["python"]
    assert re.fullmatch(r"[0-9a-f]{40}", rep["git"]["commit"] or "")
    assert re.fullmatch(r"[0-9a-f]{64}", rep["manifest_sha256"])
    assert not any(k.startswith("_") for dd in d.values() for k in dd)

    md = store.read_text("report/summary.md")
    assert "| domain | status | train / val / test examples |" in md
    assert re.search(r"\| debate \| finished \| 160 / 20 / 20 \|", md)
    assert "| tokens/s | peak mem GB | wall time s | busy % | adapter |" in md
    assert re.search(r"\| 1,834 \| 0\.41 \| 61\.3 \| 62 \| ", md)
    assert "busy % is the share of the domain's wall time" in md   # the column says what it measures
    assert "| education | failed: OutOfMemoryError" in md
    assert "| model \\ test set | debate | medicine | education |" in md
    assert "| adapter: medicine | 3.950 | 2.910 | 3.790 |" in md
    assert "![Loss curves](loss_curves.png)" in md and "![Evaluation matrix](eval_matrix.png)" in md
    assert "| medquad | medicine | ok | 40 | 30 | 10 | 0 | 0 | CC BY 4.0 |" in md
    assert "| medquad | empty_answer | 9 |" in md

    page = store.read_text("report/summary.html")
    imgs = re.findall(r'<img class="plot" id="plot-([a-z_]+)" alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert sorted(n for n, _ in imgs) == ["eval_matrix", "loss_curves", "perplexity"]
    for name, b64 in imgs:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == store.read_bytes(f"report/{name}.png")
    assert 'id="matrix-loss"' in page and 'id="matrix-ppl"' in page and 'class="num diag"' in page
    assert '<span class="badge failed">failed</span>' in page
    assert "busy % is the share of the domain&#x27;s wall time" in page
    assert "<link" not in page and "<script" not in page and "http://" not in page.split("<h2>Reproducibility")[0]


def test_no_secrets_in_any_report_file(cfg):
    store = Store(cfg.output)
    write_tree(store)
    # a training report that (wrongly) carries secrets must not leak them either
    rep = store.read_json("adapters/debate/training_report.json")
    rep["note"] = f"endpoint http://u:{URL_PASSWORD}@h/?X-Amz-Signature=abc {SECRET}"
    store.write_json("adapters/debate/training_report.json", rep)
    run_report(cfg)
    texts = all_report_text(store)
    assert len(texts) == 6
    for rel, text in texts.items():
        for secret in (SECRET, TOKEN, URL_PASSWORD, "AKIAREPORTTEST0001"):
            assert secret not in text, (rel, secret)
    cfg_json = json.loads(texts["report/summary.json"])["reproducibility"]["config"]
    assert cfg_json["data"]["download"]["ddo_debates_url"].endswith("token=***")
    assert cfg_json["storage"]["endpoint_url"] == "http://***@127.0.0.1:9000"


def test_partial_inputs_do_not_crash(cfg):
    """Nothing but a config: every domain not started, no matrix, no data card; still a full report."""
    store = Store(cfg.output)
    out = run_report(cfg)
    s = store.read_json("report/summary.json")
    assert {d["status"] for d in s["domains"].values()} == {"not started"}
    assert all("not trained" in d["cause"] for d in s["domains"].values())
    assert s["eval_matrix"] is None and "no eval/matrix.json" in s["eval_matrix_note"]
    assert s["data"]["available"] is False and "prepare not run" in s["data_note"]
    assert "eval_matrix.png" not in out and {"json", "md", "html", "loss_curves.png", "perplexity.png"} <= set(out)
    page = store.read_text("report/summary.html")
    assert "Not available: no eval/matrix.json" in page


def test_damaged_and_running_inputs(cfg):
    store = Store(cfg.output)
    write_tree(store, with_matrix=False)
    store.write_text("adapters/medicine/training_report.json", "{truncated")  # crashed while writing
    store.write_json("runs/demo/domains/medicine.json", {"domain": "medicine", "state": "running", "updated": "x"})
    rep = store.read_json("adapters/debate/training_report.json")
    del rep["val_ppl"], rep["history"]["val"], rep["base_val_ppl"]  # an older report with fewer keys
    store.write_json("adapters/debate/training_report.json", rep)
    store.write_text("eval/matrix.json", "[]")
    run_report(cfg)
    s = store.read_json("report/summary.json")
    assert s["domains"]["medicine"]["status"] == "stale"  # "running" with no heartbeat and no driver to check
    assert "did not finish" in s["domains"]["medicine"]["cause"]
    assert s["domains"]["debate"]["val_ppl"] == pytest.approx(math.exp(rep["val_loss"]))
    assert s["eval_matrix"] is None


def test_report_on_a_subset_of_domains(cfg):
    cfg.domains = ["debate"]
    store = Store(cfg.output)
    write_tree(store)
    run_report(cfg)
    s = store.read_json("report/summary.json")
    assert list(s["domains"]) == ["debate"]


def test_scrub():
    env = {"AWS_SECRET_ACCESS_KEY": "abcdef123456", "HF_TOKEN": "hf_xyzxyzxyz"}
    t = scrub('k=abcdef123456 "hf_xyzxyzxyz" https://u:p@h/x?a=1&token=zzz&X-Amz-Credential=AK/2026', env)
    assert t == 'k=*** "***" https://***@h/x?a=1&token=***&X-Amz-Credential=***'


def _decided_matrix() -> dict:
    m = fake_matrix()
    cellv = (lambda v, n: {"value": v, "low": v - 0.1, "high": min(1.0, v + 0.1), "n": n})
    m["metrics"] = {"acc": {"base": {"debate": cellv(0.5, 40), "medicine": cellv(0.6, 19)},
                            "debate": {"debate": cellv(0.7, 40)}, "medicine": {"medicine": cellv(0.5, 19)}}}
    loss = (lambda d, v: {"n": 20, "difference": d, "low": d - 0.1, "high": d + 0.1, "p": 0.01, "test": "paired permutation", "verdict": v})
    m["comparisons"] = {"debate": {"debate": {"loss": loss(-1.08, "better")}, "medicine": {"loss": loss(-0.34, "better")},
                                   "education": {"loss": loss(0.12, "worse")}},
                        "medicine": {"medicine": {"loss": loss(-1.44, "better")}, "debate": {"loss": loss(-0.15, "better")}}}
    m["verdicts"] = {"debate": {"metric": "acc", "n": 40, "difference": 0.2, "low": 0.05, "high": 0.35, "p": 0.004,
                                "test": "McNemar exact", "verdict": "better"},
                     "medicine": {"metric": "acc", "n": 19, "difference": -0.1, "low": -0.3, "high": 0.1, "p": 0.5,
                                  "test": "McNemar exact", "verdict": "no significant difference"}}
    return m


def test_report_answers_which_adapter_to_keep_first(cfg):
    """The first table: one row per domain, keep / drop / too few rows, with the evidence."""
    store = Store(cfg.output)
    write_tree(store)
    store.write_json("eval/matrix.json", _decided_matrix())
    run_report(cfg)
    md = store.read_text("report/summary.md")
    assert md.index("## Which adapters to keep") < md.index("## Results per domain")
    # table cells are escaped Markdown text (brackets, '<'): see test_summary_md_shows_data_strings_as_text_not_html
    assert ("| debate | keep | accuracy: base 0.500 \\[0.400, 0.600\\] (n=40), adapter 0.700 \\[0.600, 0.800\\] (n=40) | "
            "+0.200 \\[0.050, 0.350\\]; p 0.004; better | -1.080 (better) | education: +0.120 (worse) |") in md
    assert "| medicine | too few rows to decide (n=19 &lt; 30) |" in md
    assert "| debate: -0.150 (better) |" in md
    page = store.read_text("report/summary.html")
    assert page.index('<table id="keep">') < page.index('<table id="results">')


def test_data_card_has_the_contamination_table(cfg):
    store = Store(cfg.output)
    write_tree(store)
    m = fake_manifest()
    m["domains"]["medicine"]["near_duplicates"] = {"enabled": True, "merged_groups": 75, "moved_to_train": {"units": 60, "rows": 76}}
    m["contamination"] = {"ngram": 13, "threshold": 0.5, "domains": {"medicine": {
        "test_rows": 250, "in_own_train": 1, "in_own_train_without_templates": 0, "in_other_train": 0,
        "in_other_train_without_templates": 0}}}
    store.write_json("data/manifest.json", m)
    run_report(cfg)
    md = store.read_text("report/summary.md")
    assert "| medicine | 250 | 1 (0.4%) | 0 (0.0%) | 0 (0.0%) | 75 | 76 |" in md
    assert md.index("### Contamination") > md.index("## Data card")
    assert '<table id="contamination">' in store.read_text("report/summary.html")
    assert store.read_json("report/summary.json")["data"]["contamination"] == m["contamination"]


# ---- data-provided strings in summary.md; one damaged training report (issue 23, point 10) ----------

def test_summary_md_shows_data_strings_as_text_not_html(cfg):
    """A licence and a file name from the data, and a cause with backticks, rendered by a CommonMark
    renderer (markdown-it, as previews use with HTML on): shown as written, no element, no link."""
    from markdown_it import MarkdownIt
    store = Store(cfg.output)
    write_tree(store)
    man = store.read_json("data/manifest.json")
    lic = '<img src=x onerror="alert(1)"> & [click](javascript:alert(2)) *bold*'
    man["sources"]["medquad"]["license"] = lic
    man["sources"]["medquad"]["files"][0]["path"] = "MedQuAD/<script>alert(3)</script>|x.xml"
    man["sources"]["iam"]["quarantined_by_reason"] = {"![pixel](http://tracker.example/p.png)": 5}
    store.write_json("data/manifest.json", man)
    store.write_json("runs/demo/domains/education.json", {
        "domain": "education", "state": "failed", "updated": "2026-11-24T15:01:00+00:00",
        "error": "ValueError: `</code><iframe src=//evil>` in a row"})
    run_report(cfg)
    md = store.read_text("report/summary.md")
    page = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    for tag in ("<script", "<iframe", 'href="javascript', "<a "):
        assert tag not in page, tag
    imgs = re.findall(r'<img src="([^"]*)"', page)    # the report's own plots only
    assert imgs and set(imgs) <= {"loss_curves.png", "perplexity.png", "eval_matrix.png"} and page.count("<img") == len(imgs)
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt; &amp; [click](javascript:alert(2)) *bold*" in page
    assert "MedQuAD/&lt;script&gt;alert(3)&lt;/script&gt;|x.xml" in page
    assert "![pixel](http://tracker.example/p.png)" in page
    assert "ValueError: `&lt;/code&gt;&lt;iframe src=//evil&gt;` in a row" in page


@pytest.mark.parametrize("damage", [{"n_examples": "x"}, {"history": {"train": 5}}, {"history": "x"},
                                    {"val_loss": "abc", "history": {"val": [{"step": "a"}]}}])
def test_one_malformed_training_report_costs_only_its_domain(cfg, damage):
    store = Store(cfg.output)
    write_tree(store)
    rep = store.read_json("adapters/debate/training_report.json")
    store.write_json("adapters/debate/training_report.json", {**rep, **damage})
    run_report(cfg)
    s = store.read_json("report/summary.json")["domains"]
    assert s["medicine"]["status"] == "finished" and s["medicine"]["val_loss"] is not None
    if "n_examples" in damage or "train" in str(damage.get("history")) or damage.get("history") == "x":
        assert s["debate"]["status"] == "unknown"
        assert "adapters/debate/training_report.json is unreadable" in s["debate"]["cause"]
        assert "unreadable" in store.read_text("report/summary.md")
    else:   # a value of the wrong type is shown as missing ('–'), the rest of the row stays
        assert s["debate"]["status"] == "finished" and s["debate"]["val_loss"] is None


def test_a_training_report_that_is_not_json_is_named_unreadable(cfg):
    from pipeline.status import collect_status
    store = Store(cfg.output)
    write_tree(store)
    store.write_text("adapters/debate/training_report.json", "{truncated")   # its state file says finished
    run_report(cfg)
    s = store.read_json("report/summary.json")["domains"]["debate"]
    assert s["status"] == "unknown" and "training_report.json is unreadable" in s["cause"]
    st = collect_status(store, "demo", ["debate"])["domains"]["debate"]
    assert st.state == "unknown" and "unreadable" in st.cause


def _md_tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table of the page: its lines' cells (split on pipes that are not escaped)."""
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def _html_tables(page: str) -> list[list[int]]:
    """Every HTML table of the page: the number of cells (th or td) of each of its rows."""
    return [[len(re.findall(r"<t[hd][ >]", row)) for row in re.findall(r"<tr[ >].*?</tr>", t, re.S)]
            for t in re.findall(r"<table[ >].*?</table>", page, re.S)]


def test_one_test_loss_per_model_and_split_the_evaluations(cfg):
    """The training reports carry the recipe's adapter test loss (debate 3.07) and the evaluation its own
    (3.02, base 4.10): the report shows the evaluation's, and only it."""
    store = Store(cfg.output)
    write_tree(store)
    run_report(cfg)
    s = store.read_json("report/summary.json")
    deb, med = s["domains"]["debate"], s["domains"]["medicine"]
    assert (deb["test_loss"], deb["base_test_loss"]) == (3.02, 4.10)
    assert (med["test_loss"], med["base_test_loss"]) == (2.91, 4.35)
    assert deb["test_ppl"] == pytest.approx(math.exp(3.02)) and deb["base_test_ppl"] == pytest.approx(math.exp(4.10))
    assert deb["test_ppl_change_pct"] == pytest.approx(100 * (math.exp(3.02 - 4.10) - 1))
    assert deb["test_source"] == {"adapter": "eval/matrix.json", "base": "eval/matrix.json"}
    md, page = store.read_text("report/summary.md"), store.read_text("report/summary.html")
    recipe = fake_report("debate", 4.1, 3.0, "")
    for text in (md, page, json.dumps(s)):
        v = recipe["test_loss"]
        assert f"{v:.4f}" not in text and f"{v:.3f}" not in text, v
    assert re.search(r"\| debate \| finished \|[^\n]*\| 3\.020 \(4\.100\) \|", md)
    assert "Test figures are the evaluation's" in md


def test_without_an_evaluation_the_recipes_adapter_test_loss_is_shown_and_no_base_test_loss(cfg):
    """The base model's test loss is only the evaluation's: a training report made before the recipe stopped
    measuring it (base_test_loss 4.11) does not bring it back."""
    store = Store(cfg.output)
    write_tree(store, with_matrix=False)
    recipe = fake_report("debate", 4.1, 3.0, store.uri_of("adapters/debate"))
    store.write_json("adapters/debate/training_report.json",
                     {**recipe, "base_test_loss": 4.11, "base_test_ppl": math.exp(4.11)})
    run_report(cfg)
    deb = store.read_json("report/summary.json")["domains"]["debate"]
    assert deb["test_loss"] == recipe["test_loss"]
    assert (deb["base_test_loss"], deb["base_test_ppl"], deb["test_ppl_change_pct"]) == (None, None, None)
    assert deb["base_val_loss"] == recipe["base_val_loss"]
    assert deb["test_source"] == {"adapter": "training_report.json"}
    assert "4.110" not in store.read_text("report/summary.md")


def test_every_table_has_as_many_header_cells_as_each_row(cfg):
    store = Store(cfg.output)
    write_tree(store)
    store.write_json("eval/matrix.json", _decided_matrix())
    run_report(cfg)
    md_tables = _md_tables(store.read_text("report/summary.md"))
    assert len(md_tables) >= 6
    for t in md_tables:
        assert len(t) >= 2 and all(len(r) == len(t[0]) for r in t), t
    html_tables = _html_tables(store.read_text("report/summary.html"))
    assert len(html_tables) >= 6
    for t in html_tables:
        assert t and all(n == t[0] for n in t), t


def test_an_out_of_date_evaluation_is_said_so_and_not_used_for_test_figures(cfg):
    """debate retrained after the evaluation (whose fingerprint is of the adapters then): the report says the
    evaluation is out of date and takes no test figure from it; once it is up to date, it takes them."""
    from pipeline.eval import finished_adapters, fingerprint
    store = Store(cfg.output)
    write_tree(store)
    m = fake_matrix()
    m["fingerprint"] = fingerprint(cfg, store, finished_adapters(cfg, store))
    store.write_json("eval/matrix.json", m)
    run_report(cfg)
    s = store.read_json("report/summary.json")
    assert s["eval_matrix_stale"] is None and s["domains"]["debate"]["test_loss"] == 3.02
    assert "out of date" not in store.read_text("report/summary.md")
    store.write_json("adapters/debate/training_report.json", fake_report("debate", 4.1, 2.5, store.uri_of("adapters/debate")))
    run_report(cfg)
    s = store.read_json("report/summary.json")
    assert "made from other adapters, data or eval settings" in s["eval_matrix_stale"]
    deb = s["domains"]["debate"]
    assert deb["test_loss"] == fake_report("debate", 4.1, 2.5, "")["test_loss"]
    assert deb["test_source"] == {"adapter": "training_report.json"} and deb["base_test_loss"] is None
    md = store.read_text("report/summary.md")
    assert md.index("**The evaluation is out of date**") < md.index("## Results per domain")
    assert "**Out of date:** eval/matrix.json was made from other adapters" in md
    assert "The evaluation is out of date" in store.read_text("report/summary.html")
