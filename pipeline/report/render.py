"""The report's two formats from the gathered summary, its tables and plots: render_md (summary.md, plots
linked) and render_html (one self-contained file, CSS inline, plots embedded; every text escaped)."""
from __future__ import annotations

import base64
import html
import json
import re
from typing import Any, Optional

from pipeline.eval.tasks import MAX_MAJORITY_RATE
from pipeline.report.gather import as_number
from pipeline.report.plots import STATUS_COLORS
from pipeline.report.tables import (
    BUSY_NOTE, EVAL_METRICS, TASK_METRICS, TEST_NOTE, contamination_rows, diff_text, domain_data_rows, eval_has,
    file_rows, fmt, fmt_int, harness_note, harness_rows, interference_rows, keep_rows, matrix_rows,
    metric_matrix_rows, p_text, reason_rows, results_rows, source_rows, task_rows, verdict_rows)
from pipeline.status import STATES

def _fence(text: Optional[str], lang: str = "text") -> list[str]:
    """A fenced Markdown block that no run of backticks inside the text can close."""
    text = "(none)" if text is None else str(text)
    longest = max((len(r) for r in re.findall(r"`+", text)), default=0)
    f = "`" * max(3, longest + 1)
    return [f + lang, text, f]


def _eval_md(matrix: dict) -> list[str]:
    """The evaluation's Markdown sections after the loss and perplexity matrices."""
    L: list[str] = []
    if not matrix.get("metrics"):
        return L
    L += ["### Adapter vs base model on its own domain", "",
          "Same test examples for both; 95% intervals: exact Clopper-Pearson for accuracy and Newcombe's paired interval "
          "(Clopper-Pearson margins) for an accuracy difference; a BCa bootstrap over examples for loss, ROUGE-L, F1 and "
          "their differences (approximate on few rows: read each with its n); "
          "accuracy is compared with McNemar's exact test, the other metrics with a paired permutation test; a verdict is "
          f"'better' or 'worse' when p < {(matrix.get('settings') or {}).get('alpha', 0.05)}: Holm-adjusted over the "
          "domains for each domain's verdict (the list below), uncorrected in the other tables. The headline metric is accuracy where a domain has multiple-choice rows that are not trivial "
          f"(more than one gold class, majority-class accuracy at most {MAX_MAJORITY_RATE}), else ROUGE-L.", ""]
    for d, v in (matrix.get("verdicts") or {}).items():
        L.append(f"- **{d}**: {v['verdict']} ({EVAL_METRICS.get(v['metric'], v['metric'])} "
                 f"{diff_text(v, v['metric'])}, p {p_text(v) if v.get('p') is not None else 'n/a'}, n={v.get('n')})")
    L += ["", _md_table(*verdict_rows(matrix)), "", "### Interference: adapters on the other domains", "",
          _md_table(*interference_rows(matrix)), ""]
    for m in TASK_METRICS:
        if eval_has(matrix, m):
            L += [f"### {EVAL_METRICS[m][0].upper() + EVAL_METRICS[m][1:]}", "", _md_table(*metric_matrix_rows(matrix, m)), ""]
    c = matrix.get("counts") or {}
    L += ["### Tasks per domain", ""]
    for d in matrix["datasets"]:
        n = c.get(d) or {}
        L += [f"#### {d}", "", f"{fmt_int(n.get('items'))} test rows scored for loss; {fmt_int(n.get('multiple_choice_scored'))} "
              f"multiple-choice rows scored ({fmt_int(n.get('multiple_choice_unscored'))} without a readable gold answer, not "
              f"scored); {fmt_int(n.get('generated'))} free-text rows generated.", "", _md_table(*task_rows(matrix, d)), ""]
    L += ["### Side-by-side generations", ""]
    for d, items in (matrix.get("side_by_side") or {}).items():
        for k, it in enumerate(items, 1):
            L += [f"#### {d}, example {k} ({it.get('source')}/{it.get('task')})", "", "Prompt:", *_fence(it.get("prompt")), "",
                  "Reference:", *_fence(it.get("reference")), "", "Base model:", *_fence(it.get("base")), "",
                  f"{d} adapter:", *_fence(it.get("adapter")), ""]
    return L


def _eval_html(matrix: dict) -> list[str]:
    """The evaluation's HTML sections after the loss and perplexity matrices (every text escaped)."""
    if not matrix.get("metrics"):
        return []
    esc = _esc_rows_head
    parts = ["<h3>Adapter vs base model on its own domain</h3>",
             '<p class="note">Same test examples for both; 95% intervals: exact Clopper-Pearson for accuracy, percentile '
             "bootstrap over examples for the other metrics and the differences (covers less than 95% on few rows); accuracy: "
             "McNemar's exact test, other metrics: paired permutation test; per-domain verdicts Holm-adjusted over the domains, other cells uncorrected. Headline: "
             "accuracy where a domain has multiple-choice rows that are not trivial (two or more gold classes, majority-class "
             f"accuracy at most {MAX_MAJORITY_RATE}), else ROUGE-L.</p><ul>"]
    for d, v in (matrix.get("verdicts") or {}).items():
        cls = {"better": "finished", "worse": "failed"}.get(v["verdict"], "missing")
        parts.append(f'<li><b>{_h(d)}</b>: <span class="badge {cls}">{_h(v["verdict"])}</span> '
                     f"{_h(EVAL_METRICS.get(v['metric'], v['metric']))} {_h(diff_text(v, v['metric']))}, "
                     f"p {_h(p_text(v) if v.get('p') is not None else 'n/a')}</li>")
    parts += ["</ul>", _html_table(*esc(verdict_rows(matrix)), None, "eval-verdicts"),
              "<h3>Interference: adapters on the other domains</h3>",
              _html_table(*esc(interference_rows(matrix)), [None, None, "num", "num", "num", "num", "num"], "eval-interference")]
    for m in TASK_METRICS:
        if eval_has(matrix, m):
            parts += [f"<h3>{_h(EVAL_METRICS[m][0].upper() + EVAL_METRICS[m][1:])}</h3>",
                      _html_table(*esc(metric_matrix_rows(matrix, m)), None, f"matrix-{m}")]
    parts.append("<h3>Tasks per domain</h3>")
    for d in matrix["datasets"]:
        parts += [f"<h4>{_h(d)}</h4>", _html_table(*esc(task_rows(matrix, d)), None, f"tasks-{_h(d)}")]
    parts.append("<h3>Side-by-side generations</h3>")
    for d, items in (matrix.get("side_by_side") or {}).items():
        rows = [[_h(f"{it.get('source')}/{it.get('task')}")] +
                [f'<pre class="gen">{_h(it.get(k) if it.get(k) is not None else "(none)")}</pre>'
                 for k in ("prompt", "reference", "base", "adapter")] for it in items]
        parts += [f"<h4>{_h(d)}</h4>", _html_table(["task", "prompt", "reference", "base model", f"{d} adapter"], rows, None,
                                                    f"side-by-side-{_h(d)}")]
    return parts


# A backslash escapes only ASCII punctuation (CommonMark), so one before other characters stays as it is.
# '_' is left alone: intraword underscores (empty_answer, ori_pqal.json) do not emphasize in GFM.
_MD_BACKSLASH = re.compile(r"\\(?=[!-/:-@\[-`{-~])")


_MD_SPECIAL = re.compile(r"([`*\[\]|])")


def _md(text: Any) -> str:
    """Text from the data or the run (a licence, a file name, an error) as literal Markdown text: no raw
    HTML (a licence '<img onerror=...>' ran in previews that render HTML), no links, images or code spans;
    one line."""
    t = html.escape(" ".join(str(text).split()), quote=False)  # & < > as entities: shown, never parsed as HTML
    return _MD_SPECIAL.sub(r"\\\1", _MD_BACKSLASH.sub(r"\\\\", t))


def _code(text: Any) -> str:
    """An inline code span no backtick inside the text can close (CommonMark: a longer fence)."""
    t = " ".join(str(text).split())
    longest = max((len(r) for r in re.findall(r"`+", t)), default=0)
    fence, pad = "`" * (longest + 1), " " if longest else ""
    return f"{fence}{pad}{t}{pad}{fence}"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_md(summary: dict, plots: dict[str, bytes]) -> str:
    s, card, rep = summary, summary["data"], summary["reproducibility"]
    L = [f"# Domain adapters: run {_code(s['run_name'])}", "",
         f"Output {_code(s['output'])}, generated {_md(s['generated_at'])}. Domains: "
         + ", ".join(f"{_md(k)} {v}" for k, v in sorted(s["status_counts"].items())) + ".", ""]
    if s.get("eval_matrix_stale"):
        L += ["**The evaluation is out of date** (see the evaluation matrix below): run `adapters eval`.", ""]
    if s["eval_matrix"] and (s["eval_matrix"].get("verdicts") or {}):
        L += ["## Which adapters to keep", "", _md_table(*keep_rows(s["eval_matrix"])), "",
              "Keep: the adapter beats the base model on its own domain's headline metric (Holm-adjusted p over the domains "
              "< alpha, paired test); "
              "drop: it is worse; loss changes are test loss, lower is better. Details in the evaluation matrix below.", ""]
    L += ["## Results per domain", "", _md_table(*results_rows(s)), "",
         "Losses are mean token cross-entropy on assistant-turn tokens (each answer and its end-of-turn token); perplexity = exp(loss). "
         "Figures in parentheses are the base model's. " + TEST_NOTE + " " + BUSY_NOTE, ""]
    for name, title in (("loss_curves.png", "Loss curves"), ("perplexity.png", "Base vs adapter perplexity")):
        if name in plots:
            L += [f"![{title}]({name})", ""]
    L += ["## Evaluation matrix", ""]
    if s.get("eval_matrix_stale"):
        L += [f"**Out of date:** {_md(s['eval_matrix_stale'])}.", ""]
    if s["eval_matrix"]:
        L += ["Test loss:", "", _md_table(*matrix_rows(s["eval_matrix"], "loss")), "",
              "Test perplexity:", "", _md_table(*matrix_rows(s["eval_matrix"], "ppl")), ""]
        if "eval_matrix.png" in plots:
            L += ["![Evaluation matrix](eval_matrix.png)", ""]
        L += _eval_md(s["eval_matrix"])
    else:
        L += [f"Not available: {_md(s['eval_matrix_note'])}.", ""]
    if s.get("standard_benchmarks"):
        h = s["standard_benchmarks"]
        L += ["## Standard benchmarks (lm-evaluation-harness)", "", _md_table(*harness_rows(h)), "", _md(harness_note(h)),
              "", "Each model's numbers again: " + "; ".join(f"{_md(m)}: {_code(c)}" for m, c in (h.get("commands") or {}).items()), ""]
    L += ["## Data card", ""]
    if card["available"]:
        t = card["totals"]
        L += ["Totals: " + ", ".join(f"{k} {fmt_int(v)}" for k, v in t.items()) + ".", "",
              "### Sources", "", _md_table(*source_rows(card)), "",
              "### Quarantine reasons", "", _md_table(*reason_rows(card)) if reason_rows(card)[1] else "None.", "",
              "### Domains", "", _md_table(*domain_data_rows(card)), "",
              *(["### Contamination", "", "Test rows with 50% or more of their word 13-grams in a train split "
                 "(templates: 13-grams in more than 10% of one task's rows).", "", _md_table(*contamination_rows(card)), ""]
                if card.get("contamination") else []),
              "### Files and checksums", "", _md_table(*file_rows(card)), ""]
    else:
        L += [f"Not available: {_md(s['data_note'])}.", ""]
    g = rep["git"]
    L += ["## Reproducibility", "",
          f"- git commit: {_code(g.get('commit') or 'unknown')}" + (" (modified files)" if g.get("dirty") else ""),
          f"- seeds: " + _md(", ".join(f"{k}={v}" for k, v in rep["seeds"].items())),
          f"- data fingerprint: {_code(rep['data_fingerprint'] or '–')}; manifest sha256: {_code(rep['manifest_sha256'] or '–')}",
          f"- command: {_code(rep['command'])}",
          "- packages: " + _md(", ".join(f"{k} {v}" for k, v in rep["packages"].items() if v)), "",
          "<details><summary>config</summary>", "", *_fence(json.dumps(rep["config"], indent=2), "json"), "", "</details>", ""]
    return "\n".join(L)


CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1200px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.3em}h2{margin-top:1.6em;border-bottom:1px solid #eaeef2;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px;width:100%}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fbfcfd}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;font-weight:600}
{badges}
.cause{color:#57606a;font-size:12px;display:block;margin-top:2px;overflow-wrap:break-word}
td.status{min-width:220px;max-width:320px}td.uri{font-size:11px;word-break:break-all;min-width:160px;max-width:260px}
h1 code{font-size:inherit}th{white-space:normal}
img.plot{max-width:100%;border:1px solid #d0d7de;margin:.5em 0;display:block}
.note{color:#57606a}code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
pre{background:#f6f8fa;padding:10px;overflow:auto;max-height:420px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}td.diag{font-weight:700;outline:2px solid #0969da;outline-offset:-2px}
td.sha{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all}
#repro td:first-child{white-space:nowrap}
pre.gen{margin:0;max-height:260px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:11px}
""".replace("{badges}", "".join(f".{k.replace(' ', '-')}{{background:{v}}}" for k, v in STATUS_COLORS.items()))


def _h(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _html_table(head: list[str], rows: list[list[str]], cls: Optional[list[Optional[str]]] = None, tid: str = "") -> str:
    out = [f'<table id="{tid}">' if tid else "<table>", "<thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        tds = []
        for j, c in enumerate(r):
            k = (cls[j] if cls and j < len(cls) else None) or ""
            tds.append(f'<td class="{k}">{c}</td>' if k else f"<td>{c}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _esc_rows_head(hr: tuple[list[str], list[list[str]]]) -> tuple[list[str], list[list[str]]]:
    return hr[0], _esc_rows(hr[1])


def _esc_rows(rows: list[list[str]]) -> list[list[str]]:
    return [[_h(c) for c in r] for r in rows]


def _matrix_html(matrix: dict, key: str) -> str:
    ds = list(matrix["datasets"])
    vals = {m: (matrix.get(key) or {}).get(m, {}) for m in matrix["models"]}
    flat = [v for m in vals.values() for v in (as_number(x) for x in m.values()) if v is not None]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    head = "<tr><th>model \\ test set</th>" + "".join(f"<th>{_h(d)}</th>" for d in ds) + "</tr>"
    body = []
    for m, row in vals.items():
        cells = [f"<th>{_h(m if m == 'base' else 'adapter: ' + m)}</th>"]
        for d in ds:
            v = as_number(row.get(d))
            if v is None:
                cells.append('<td class="num">–</td>')
                continue
            t = (v - lo) / (hi - lo) if hi > lo else 0.0  # 0 = best (lowest)
            color = f"hsl({int(120 * (1 - t))},60%,{int(82 + 8 * t)}%)"
            diag = " diag" if m == d else ""
            cells.append(f'<td class="num{diag}" style="background:{color}">{fmt(v, 3 if key == "loss" else 2)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="matrix" id="matrix-{key}"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _ordered_counts(counts: dict) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (STATES.index(kv[0]) if kv[0] in STATES else len(STATES), kv[0]))


def render_html(summary: dict, plots: dict[str, bytes]) -> str:
    s, card, rep = summary, summary["data"], summary["reproducibility"]

    def img(name: str, alt: str) -> str:
        if name not in plots:
            return ""
        b64 = base64.b64encode(plots[name]).decode("ascii")
        return f'<img class="plot" id="plot-{name.split(".")[0]}" alt="{_h(alt)}" src="data:image/png;base64,{b64}">'

    cards = "".join(f'<div class="card"><span class="badge {_h(k.replace(" ", "-"))}">{_h(k)}</span><b>{v}</b>domains</div>'
                    for k, v in _ordered_counts(s["status_counts"]))
    head, rows = results_rows(s)
    hrows = []
    for d, r in zip(s["domains"].values(), rows):
        status = f'<span class="badge {_h(d["status"].replace(" ", "-"))}">{_h(d["status"])}</span>'
        if d.get("cause"):
            status += f'<span class="cause">{_h(d["cause"][:600])}</span>'
        hrows.append([_h(r[0]), status] + [_h(c) for c in r[2:]])
    num = [None, "status"] + ["num"] * (len(head) - 3) + ["uri"]   # domain, status, the figures, the adapter URI
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Domain adapters: {_h(s['run_name'])}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Domain adapters: run <code>{_h(s['run_name'])}</code></h1>",
        f'<p class="note">Output <code>{_h(s["output"])}</code> &middot; generated {_h(s["generated_at"])}</p>',
        f'<div class="cards">{cards}</div>',
        *(['<p class="note stale"><b>The evaluation is out of date</b> (see the evaluation matrix below): run '
            "<code>adapters eval</code>.</p>"] if s.get("eval_matrix_stale") else []),
        *((["<h2>Which adapters to keep</h2>", _html_table(*_esc_rows_head(keep_rows(s["eval_matrix"])), None, "keep"),
             '<p class="note">Keep: the adapter beats the base model on its own domain\'s headline metric (Holm-adjusted p over the domains '
             "&lt; alpha, paired test); drop: it is worse; loss changes are test loss, lower is better.</p>"])
          if s["eval_matrix"] and (s["eval_matrix"].get("verdicts") or {}) else []),
        "<h2>Results per domain</h2>", _html_table(head, hrows, num, "results"),
        '<p class="note">Losses are mean token cross-entropy on assistant-turn tokens (each answer and its end-of-turn token); perplexity = exp(loss). '
        f"Figures in parentheses are the base model's. {_h(TEST_NOTE)} {_h(BUSY_NOTE)}</p>",
        img("loss_curves.png", "Loss curves per domain"), img("perplexity.png", "Base vs adapter perplexity"),
        "<h2>Evaluation matrix</h2>",
    ]
    if s.get("eval_matrix_stale"):
        parts.append(f'<p class="note stale"><b>Out of date:</b> {_h(s["eval_matrix_stale"])}.</p>')
    if s["eval_matrix"]:
        parts += ['<p class="note">The base model and every adapter on every domain\'s test set. Outlined: an adapter on its own domain; '
                  "greener is lower (better).</p>",
                  "<h3>Test loss</h3>", _matrix_html(s["eval_matrix"], "loss"),
                  "<h3>Test perplexity</h3>", _matrix_html(s["eval_matrix"], "ppl"),
                  img("eval_matrix.png", "Evaluation matrix heat map")] + _eval_html(s["eval_matrix"])
    else:
        parts.append(f'<p class="note">Not available: {_h(s["eval_matrix_note"])}.</p>')
    if s.get("standard_benchmarks"):
        h = s["standard_benchmarks"]
        head, rows = harness_rows(h)
        parts += ["<h2>Standard benchmarks (lm-evaluation-harness)</h2>",
                  _html_table(head, _esc_rows(rows), [None, None] + ["num"] * (len(head) - 2), "standard-benchmarks"),
                  f'<p class="note">{_h(harness_note(h))}</p>',
                  "<details><summary>lm_eval commands</summary>"
                  + "".join(f"<p>{_h(m)}: <code>{_h(c)}</code></p>" for m, c in (h.get("commands") or {}).items()) + "</details>"]
    parts.append("<h2>Data card</h2>")
    if card["available"]:
        parts += ["<p>Totals: " + ", ".join(f"{_h(k)} <b>{fmt_int(v)}</b>" for k, v in card["totals"].items()) + "</p>",
                  "<h3>Sources</h3>", _html_table(*(lambda h, r: (h, _esc_rows(r)))(*source_rows(card)),
                                                   [None, None, None] + ["num"] * 5, "sources"),
                  "<h3>Quarantine reasons</h3>",
                  _html_table(*(lambda h, r: (h, _esc_rows(r)))(*reason_rows(card)), [None, None, "num"], "quarantine")
                  if reason_rows(card)[1] else "<p>None.</p>",
                  "<h3>Domains</h3>", _html_table(*(lambda h, r: (h, _esc_rows(r)))(*domain_data_rows(card)),
                                                   [None, None, "num", "num", "num"], "domains-data"),
                  *(["<h3>Contamination</h3>", '<p class="note">Test rows with 50% or more of their word 13-grams in a '
                     "train split (templates: 13-grams in more than 10% of one task's rows).</p>",
                     _html_table(*_esc_rows_head(contamination_rows(card)), [None] + ["num"] * 6, "contamination")]
                    if card.get("contamination") else []),
                  "<details><summary>Files and checksums</summary>",
                  _html_table(*(lambda h, r: (h, _esc_rows(r)))(*file_rows(card)), [None, None, "num", "sha", None], "files"),
                  "</details>"]
    else:
        parts.append(f'<p class="note">Not available: {_h(s["data_note"])}.</p>')
    g = rep["git"]
    repro = [["git commit", f"<code>{_h(g.get('commit') or 'unknown')}</code>" + (" (modified files)" if g.get("dirty") else "")],
             ["seeds", _h(", ".join(f"{k}={v}" for k, v in rep["seeds"].items()))],
             ["data fingerprint", f"<code>{_h(rep['data_fingerprint'] or '–')}</code>"],
             ["manifest sha256", f"<code>{_h(rep['manifest_sha256'] or '–')}</code>"],
             ["command", f"<code>{_h(rep['command'])}</code>"],
             ["packages", _h(", ".join(f"{k} {v}" for k, v in rep["packages"].items() if v))]]
    parts += ["<h2>Reproducibility</h2>", _html_table(["what", "value"], repro, None, "repro"),
              "<details><summary>Config (redacted)</summary><pre>" + _h(json.dumps(rep["config"], indent=2)) + "</pre></details>",
              "</main></body></html>"]
    return "\n".join(p for p in parts if p)
