"""The report's tables as (header, rows) of plain strings, shared by the Markdown and the HTML renderers, and
the notes printed under them; number formatting."""
from __future__ import annotations

from typing import Any, Optional

from pipeline.report.gather import SPLITS, as_number

def wrap(text: str, width: int) -> str:
    """text broken into lines of at most width characters (six lines at most, then "...")."""
    words, lines, cur = str(text).split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:6]) + ("..." if len(lines) > 6 else "")


def fmt(x: Any, nd: int = 3) -> str:
    """A number with nd decimals (thousands without decimals); "–" when there is none."""
    v = as_number(x)
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def fmt_int(x: Any) -> str:
    """A count with thousands separators; "–" when there is none."""
    v = as_number(x)
    return "–" if v is None else f"{int(v):,}"


TEST_NOTE = ("Test figures are the evaluation's (the same numbers as the evaluation matrix below); the base "
             "model's are only the evaluation's, an adapter's where it has none (evaluation off, or that adapter "
             "not scored) the training recipe's.")


BUSY_NOTE = ("busy % is the share of the domain's wall time (from its trial's start to the export) spent in "
             "optimizer steps; the rest is start-up (worker, model load, tokenization), evaluations and "
             "checkpoints.")


def results_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    head = ["domain", "status", "train / val / test examples", "train loss", "val loss (base)", "test loss (base)",
            "val ppl (base)", "test ppl (base)", "test ppl change", "tokens/s", "peak mem GB", "wall time s", "busy %", "adapter"]
    rows = []
    for d in summary["domains"].values():
        ex = d["examples"]
        chg = d.get("test_ppl_change_pct")
        rows.append([d["domain"], d["status"] + (f": {d['cause']}" if d.get("cause") else ""),
                     " / ".join(fmt_int(ex.get(s)) for s in SPLITS), fmt(d["train_loss"]),
                     f"{fmt(d['val_loss'])} ({fmt(d['base_val_loss'])})", f"{fmt(d['test_loss'])} ({fmt(d['base_test_loss'])})",
                     f"{fmt(d['val_ppl'], 2)} ({fmt(d['base_val_ppl'], 2)})", f"{fmt(d['test_ppl'], 2)} ({fmt(d['base_test_ppl'], 2)})",
                     "–" if chg is None else f"{chg:+.1f}%", fmt(d["tokens_per_s"], 0), fmt(d["peak_memory_gb"], 2),
                     fmt(d["wall_time_s"], 1), "–" if d.get("busy_share") is None else f"{100 * d['busy_share']:.0f}",
                     d.get("adapter_uri") or "–"])
    return head, rows


def matrix_rows(matrix: dict, key: str) -> tuple[list[str], list[list[str]]]:
    ds = list(matrix["datasets"])
    rows = []
    for m in matrix["models"]:
        vals = (matrix.get(key) or {}).get(m, {})
        rows.append([m if m == "base" else f"adapter: {m}"] + [fmt(vals.get(d), 3 if key == "loss" else 2) for d in ds])
    return ["model \\ test set"] + ds, rows


EVAL_METRICS = {"loss": "test loss", "ppl": "test perplexity", "acc": "accuracy", "acc_norm": "accuracy (length-normalised)",
                "rouge_l": "ROUGE-L (F)", "f1": "bag-of-words F1 (not SQuAD's)"}


TASK_METRICS = ("acc", "acc_norm", "rouge_l", "f1")


def _nd(metric: str) -> int:
    return 2 if metric == "ppl" else 3


def _cell_text(c: Optional[dict], metric: str) -> str:
    """value [low, high] (n=...) of one matrix cell."""
    if not c or c.get("value") is None:
        return "–"
    nd = _nd(metric)
    ci = f" [{fmt(c.get('low'), nd)}, {fmt(c.get('high'), nd)}]" if c.get("low") is not None else ""
    return f"{fmt(c['value'], nd)}{ci} (n={c.get('n')})"


def diff_text(c: dict, metric: str) -> str:
    if c.get("difference") is None:
        return "–"
    nd = _nd(metric)
    return f"{c['difference']:+.{nd}f} [{fmt(c.get('low'), nd)}, {fmt(c.get('high'), nd)}]"


def p_text(c: dict) -> str:
    if c.get("p") is None:
        return "–"
    return f"{c['p']:.3g} ({c.get('test')})" + ("" if c.get("p_adjusted") is None else f"; Holm-adjusted {c['p_adjusted']:.3g}")


def eval_has(matrix: dict, metric: str) -> bool:
    return any((c or {}).get("value") is not None for per in ((matrix.get("metrics") or {}).get(metric) or {}).values()
               for c in per.values())


def metric_matrix_rows(matrix: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    ds = list(matrix["datasets"])
    vals = (matrix.get("metrics") or {}).get(metric) or {}
    rows = [[m if m == "base" else f"adapter: {m}"] + [_cell_text(vals.get(m, {}).get(d), metric) for d in ds]
            for m in matrix["models"]]
    return ["model \\ test set"] + ds, rows


def verdict_rows(matrix: dict) -> tuple[list[str], list[list[str]]]:
    """Each adapter against the base model on its own domain, every measured metric; the headline first."""
    metrics, comps = matrix.get("metrics") or {}, matrix.get("comparisons") or {}
    rows = []
    for d in matrix["datasets"]:
        head = (matrix.get("verdicts") or {}).get(d, {}).get("metric")
        order = [head] + [m for m in ("loss", "acc", "acc_norm", "rouge_l", "f1") if m != head] if head else []
        for m in order:
            c = (comps.get(d) or {}).get(d, {}).get(m) or {}
            if not c.get("n"):
                continue
            if m == head:   # the domain's verdict: decided on the Holm-adjusted p
                c = matrix["verdicts"][d]
            rows.append([d if m == head else "", EVAL_METRICS[m] + (" (headline)" if m == head else ""), fmt_int(c["n"]),
                         _cell_text(metrics.get(m, {}).get("base", {}).get(d), m),
                         _cell_text(metrics.get(m, {}).get(d, {}).get(d), m), diff_text(c, m), p_text(c), c["verdict"]])
    return ["domain", "metric", "paired examples", "base [95% CI]", "adapter [95% CI]", "difference [95% CI]",
            "p (test)", "verdict"], rows


# fewer paired rows than this and the top table says "too few rows" instead of keep / drop
MIN_DECISION_N = 30


def keep_rows(matrix: dict) -> tuple[list[str], list[list[str]]]:
    """The report's first table, one row per domain: keep the adapter or not, on what evidence (its own
    domain's headline metric vs the base model, the loss change there, the worst loss change it causes
    on another domain)."""
    comps, metrics = matrix.get("comparisons") or {}, matrix.get("metrics") or {}
    rows = []
    for d, v in (matrix.get("verdicts") or {}).items():
        m, n = v["metric"], v.get("n") or 0
        if n < MIN_DECISION_N:
            decision = f"too few rows to decide (n={n} < {MIN_DECISION_N})"
        else:
            decision = {"better": "keep", "worse": "drop"}.get(v["verdict"], "no evidence either way (not significant)")
        own_loss = (comps.get(d) or {}).get(d, {}).get("loss") or {}
        others = [(o, c.get("loss") or {}) for o, c in (comps.get(d) or {}).items() if o != d]
        others = [(o, c) for o, c in others if c.get("difference") is not None]
        worst = max(others, key=lambda oc: oc[1]["difference"], default=None)
        rows.append([d, decision,
                     f"{EVAL_METRICS.get(m, m)}: base {_cell_text(metrics.get(m, {}).get('base', {}).get(d), m)}, "
                     f"adapter {_cell_text(metrics.get(m, {}).get(d, {}).get(d), m)}",
                     f"{diff_text(v, m)}; p {'–' if v.get('p') is None else format(v['p'], '.3g')}"
                     + ("" if v.get("p_adjusted") is None else f", Holm {v['p_adjusted']:.3g}") + f"; {v['verdict']}",
                     "–" if own_loss.get("difference") is None else f"{own_loss['difference']:+.3f} ({own_loss['verdict']})",
                     "–" if worst is None else f"{worst[0]}: {worst[1]['difference']:+.3f} ({worst[1]['verdict']})"])
    return ["domain", "keep this adapter?", "evidence: own-domain headline metric [95% CI]", "difference vs base [95% CI]",
            "own test loss change", "worst loss change on another domain"], rows


def interference_rows(matrix: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for part, label in (("diagonal", "own domain"), ("off_diagonal", "other domains")):
        for m, c in ((matrix.get("summary") or {}).get(part) or {}).items():
            if c.get("cells"):
                rows.append([label, EVAL_METRICS.get(m, m), fmt_int(c["cells"]),
                             "–" if c.get("mean_difference") is None else f"{c['mean_difference']:+.{_nd(m)}f}",
                             fmt_int(c.get("better")), fmt_int(c.get("worse")), fmt_int(c.get("no significant difference"))])
    return ["adapters on", "metric", "cells", "mean difference vs base", "better", "worse", "no significant difference"], rows


def task_rows(matrix: dict, domain: str) -> tuple[list[str], list[list[str]]]:
    """One domain's tasks (source/SFT task): kind, rows, rows not scored, base vs the domain's adapter."""
    rows = []
    for name, t in ((matrix.get("tasks") or {}).get(domain) or {}).items():
        shown = [k for k in ("acc", "acc_norm", "rouge_l", "f1", "loss") if k in t.get("metrics", {})]
        for k, m in enumerate(shown):
            per = t["metrics"][m]
            first = [name, t["kind"].replace("_", " "), fmt_int(t["rows"]), fmt_int(t.get("unscored")), _majority_text(t)] if k == 0 else [""] * 5
            rows.append(first + [EVAL_METRICS[m], _cell_text(per.get("base"), m), _cell_text(per.get(domain), m)])
    return ["task", "kind", "test rows", "not scored", "majority-class accuracy", "metric", "base [95% CI]",
            f"{domain} adapter [95% CI]"], rows


def _majority_text(t: dict) -> str:
    """What always answering the most common gold choice would score, beside acc; 'trivial' when one class
    or a majority above the bound (pipeline/eval/tasks.MAX_MAJORITY_RATE): such a task decides no verdict."""
    r = t.get("majority_rate")
    if r is None:
        return "–"
    if t.get("gold_classes", 2) < 2:
        return f"{r:.3f} (trivial: one gold class)"
    return f"{r:.3f}" + (" (trivial)" if t.get("trivial") else "")


HARNESS_NOTE = ("lm-evaluation-harness's own tasks (prompts, few-shot counts, splits, metrics), run by lm-eval on the base "
                "model and with each adapter (its `peft=` model argument): comparable with published lm-eval numbers for the "
                "same task, base model and precision{limit}. ± is lm-eval's standard error; n is rows scored.")


def harness_rows(h: dict) -> tuple[list[str], list[list[str]]]:
    """One row per task, metric (and filter, when not lm-eval's plain 'none'); one column per model."""
    models = list(h.get("models") or [])
    cells: dict[tuple, dict] = {}
    for r in h["rows"]:
        metric = r["metric"] if r.get("filter") in (None, "none") else f"{r['metric']} ({r['filter']})"
        cells.setdefault((r["task"], metric), {})[r["model"]] = r
    def fig(x: Any) -> str:   # a perplexity of a summed log-likelihood can be 1e17: not 18 digits
        v = as_number(x)
        return f"{v:.4g}" if v is not None and abs(v) >= 1e5 else fmt(x)

    rows = []
    for (task, metric), per in cells.items():
        n = {x.get("n") for x in per.values()}
        rows.append([task, metric, fmt_int(n.pop()) if len(n) == 1 else "–"]
                    + [("–" if m not in per else fig(per[m]["value"]) + (f" ± {fig(per[m]['stderr'])}" if per[m].get("stderr") is not None else ""))
                       for m in models])
    return ["task", "metric", "n"] + models, rows


def harness_note(h: dict) -> str:
    return (HARNESS_NOTE.format(limit=f"; here cut to {h['limit']} rows per task, so not comparable" if h.get("limit") else "")
            + (f" lm-eval {h['lm_eval_version']}." if h.get("lm_eval_version") else ""))


def source_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    head = ["source", "domain", "status", "read", "kept", "quarantined", "deduplicated", "capped", "license", "version"]
    rows = [[n, s.get("domain") or "–", s.get("status") or "–", fmt_int(s["read"]), fmt_int(s["kept"]), fmt_int(s["quarantined"]),
             fmt_int(s["deduplicated"]), fmt_int(s["capped"]) + (f" (cap {s['cap']})" if s.get("cap") else ""),
             s.get("license") or "–", s.get("version") or "–"] for n, s in card["sources"].items()]
    return head, rows


def reason_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[n, r, fmt_int(c)] for n, s in card["sources"].items() for r, c in sorted(s["quarantined_by_reason"].items())]
    return ["source", "quarantine reason", "records"], rows


def file_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[n, f.get("path") or "–", fmt_int(f.get("size")), f.get("sha256") or "–", f.get("status") or "–"]
            for n, s in card["sources"].items() for f in s["files"]]
    return ["source", "file", "bytes", "sha256", "status"], rows


def domain_data_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for d, m in card["domains"].items():
        sft = m.get("sft_rows") or {}
        tok = (m.get("tokens_estimate") or {})
        rows.append([d, (m.get("status") or "–") + (f": {m['reason']}" if m.get("reason") else ""), fmt_int(m.get("corpus_rows")),
                     " / ".join(fmt_int(sft.get(s)) for s in SPLITS), fmt_int(tok.get("corpus"))])
    return ["domain", "status", "corpus rows", "SFT train / val / test", "corpus tokens (est.)"], rows


def contamination_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    """Per domain: test rows with >= 50% of their word 13-grams in a train split (prepare's manifest), and
    what the near-duplicate split did (docs/ARCHITECTURE.md, "What the split guarantees")."""
    c = card.get("contamination") or {}
    pct = (lambda k, n: "–" if k is None else f"{fmt_int(k)} ({100 * k / n:.1f}%)" if n else fmt_int(k))
    rows = [["(all)", c["skipped"]] + ["–"] * 5] if c.get("skipped") else []
    for d, x in (c.get("domains") or {}).items():
        nd = (card["domains"].get(d) or {}).get("near_duplicates") or {}
        n = x.get("test_rows")
        rows.append([d, fmt_int(n), pct(x.get("in_own_train"), n), pct(x.get("in_own_train_without_templates"), n),
                     pct(x.get("in_other_train"), n),
                     "off" if nd and not nd.get("enabled") else fmt_int(nd.get("merged_groups")),
                     fmt_int((nd.get("moved_to_train") or {}).get("rows"))])
    return ["domain", "test rows", "in own train (all 13-grams)", "in own train (without templates)",
            "in other domains' train", "near-duplicate merges", "rows moved to train"], rows
