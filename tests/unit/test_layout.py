"""pipeline/layout.py: the output tree's paths, the docs' table of them, and the contract other work relies on."""
from pipeline import layout

from ._prepare_helpers import ROOT


def test_docs_tree_table_is_the_layout():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = doc.split("<!-- output-tree:start -->\n", 1)[1].split("\n<!-- output-tree:end -->", 1)[0]
    assert block == layout.tree_table(), "docs/ARCHITECTURE.md's output tree is stale: regenerate it (see the text above it)"


def test_the_output_tree_contract_holds():
    # the output tree other work relies on (DESIGN.md, "Contracts"; README "What comes out"): changing one of
    # these paths breaks existing outputs, resumed runs and users' scripts
    assert layout.MANIFEST == "data/manifest.json"
    assert layout.corpus("medicine") == "data/corpus/medicine"
    assert layout.sft("medicine", "val") == "data/sft/medicine/val"
    assert layout.sft_shard("medicine", "test") == "data/sft/medicine/test/part-00000.parquet"
    assert layout.quarantine("medquad") == "data/quarantine/medquad"
    assert layout.adapter("medicine") == "adapters/medicine"
    assert layout.training_report("medicine") == "adapters/medicine/training_report.json"
    assert layout.run("r1") == "runs/r1"
    assert layout.domain_state("r1", "medicine") == "runs/r1/domains/medicine.json"
    assert layout.checkpoints("r1", "medicine") == "runs/r1/train/medicine"
    assert layout.eval_scores("base", "medicine") == "eval/scores/base/medicine.parquet"
    assert layout.EVAL_MATRIX == "eval/matrix.json"
    assert (layout.REPORT_JSON, layout.REPORT_MD, layout.REPORT_HTML) == (
        "report/summary.json", "report/summary.md", "report/summary.html")
    rows = [p for p, _, _ in layout.TREE]
    for p in ("data/manifest.json", "data/corpus/<domain>/*.parquet", "data/sft/<domain>/<split>/*.parquet",
              "data/quarantine/<source>/*.parquet", "adapters/<domain>/", "report/summary.json .md .html *.png"):
        assert p in rows, p


def test_listed_paths_parse_back():
    assert layout.parse_record(layout.fatal("r1", "law")) == ("r1", "fatal", "law")
    assert layout.parse_record("runs/r1/train/law/x.json") is None
    assert layout.adapter_domain(layout.training_report("law")) == "law"
    assert layout.adapter_domain("adapters/law/merged/training_report.json") is None
