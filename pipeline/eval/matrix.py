"""From per-example scores to eval/matrix.json: cells with intervals, paired tests, verdicts.

    example_rows(plan, results) -> list[dict]        one row per test item: the Parquet table
                                                     eval/scores/<model>/<dataset>.parquet
    build_matrix(plans, scores, ev) -> dict           the content of eval/matrix.json

Metrics (``metrics()``: loss and ppl, then each task kind's, from pipeline/eval/tasks.py), each cell
{"value", "low", "high", "n", "interval"}: the 0/1 ones (acc and acc_norm: ``Metric.proportion``) get the exact Clopper-Pearson 95% interval (coverage >= 95% at any n; a perfect 10/10 gets [0.69, 1]),
the continuous ones a BCa bootstrap (bias-corrected and accelerated; still approximate on few rows, which
is why each cell names its method and n):
    loss      token-weighted mean cross-entropy over the test rows (as training's test_loss); ppl = exp(loss)
    acc       multiple-choice rows with a readable gold: the most likely choice is the gold one
    acc_norm  the same with log-likelihoods divided by the choice's length in characters
    rouge_l, f1   the free-text sample's generations against their references

Every adapter is compared with the base model on every dataset over the same examples (McNemar's
exact test for acc / acc_norm, a paired sign-flip permutation test for the others) with an interval of
the difference (Newcombe's paired interval for acc / acc_norm, a paired BCa bootstrap for the others); its own domain is the diagonal, the others show interference.
The per-domain verdicts (``verdicts``: each adapter on its own domain, headline metric) are decided on
Holm-adjusted p-values over the domains (``p_adjusted``; ``p`` is the raw one); the other cells'
verdicts are uncorrected and say so in the report.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from pipeline.eval import stats
from pipeline.eval.tasks import SCORERS, scorer_of, task_metrics

CLOPPER_PEARSON = "Clopper-Pearson exact 95%"
NEWCOMBE = "Newcombe paired 95% (Clopper-Pearson margins)"
TEXT_LIMIT = 4000                                           # characters of a text shown side by side


# The metrics of every cell: the test loss (and its perplexity) of every row, then each registered task
# kind's (pipeline/eval/tasks.py); read from the registry when a matrix is built.

def metrics() -> tuple[str, ...]:
    return ("loss", "ppl") + tuple(task_metrics())


def tested() -> tuple[str, ...]:
    """The metrics compared with the base model (ppl is a function of loss: the same test)."""
    return tuple(m for m in metrics() if m != "ppl")


def higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "ppl") and task_metrics()[metric].higher_is_better


def _proportion(metric: str) -> bool:
    """Per-example 0/1 (accuracy): exact binomial intervals and McNemar's test."""
    return metric in task_metrics() and task_metrics()[metric].proportion


def example_rows(plan, results: list[dict]) -> list[dict]:
    """The Parquet rows of one model on one dataset: every row has every registered kind's columns (None
    where the row is of another kind), those from log-likelihoods before the generation, its scores after."""
    out = []
    for it, r in zip(plan.items, results):
        own = scorer_of(it.kind)
        row = {"key": it.key, "doc_id": it.doc_id, "source": it.source, "task": it.task, "kind": it.kind,
               "gold": it.gold, "loss_sum": r.get("loss_sum"), "n_tokens": r.get("n_tokens"),
               "loss": r["loss_sum"] / r["n_tokens"] if r.get("n_tokens") else None}
        for s in SCORERS.values():
            row.update(own.likelihood_row(it, r) if s is own else dict.fromkeys(s.likelihood_columns))
        row.update(generated=it.generate, generation=r.get("generation"))
        for s in SCORERS.values():
            row.update(own.generation_row(it, r) if s is own else dict.fromkeys(s.generation_columns))
        row["side_by_side"] = it.side_by_side
        out.append(row)
    return out


# ---- per-metric arrays --------------------------------------------------------------------------

def _values(rows: list[dict], metric: str) -> dict[str, tuple]:
    """key -> the per-example values a metric is computed from (loss: (sum, tokens); others: (x,))."""
    if metric == "loss":
        return {r["key"]: (r["loss_sum"], r["n_tokens"]) for r in rows if r.get("n_tokens")}
    col = task_metrics()[metric].column
    return {r["key"]: (float(r[col]),) for r in rows if r.get(col) is not None}


def _statistic(metric: str):
    return stats.ratio_of if metric == "loss" else stats.mean_of


def cell(rows: list[dict], metric: str, ev) -> dict:
    vals = _values(rows, metric)
    if not vals:
        return {"value": None, "low": None, "high": None, "n": 0}
    cols = [np.array(c, dtype=np.float64) for c in zip(*vals.values())]
    value = float(_statistic(metric)(*cols))
    if _proportion(metric):
        lo, hi = stats.clopper_pearson(int(cols[0].sum()), len(vals))
        return {"value": value, "low": lo, "high": hi, "n": len(vals), "interval": CLOPPER_PEARSON}
    lo, hi = stats.bootstrap_interval(_statistic(metric), cols, ev.bootstrap_resamples, ev.seed)
    return {"value": value, "low": lo, "high": hi, "n": len(vals), "interval": _bootstrap_name(ev)}


def _ppl_cell(loss: dict) -> dict:
    f = (lambda x: None if x is None else math.exp(min(x, 50.0)))
    return {"value": f(loss["value"]), "low": f(loss["low"]), "high": f(loss["high"]), "n": loss["n"],
            **({"interval": loss["interval"]} if "interval" in loss else {})}


def _bootstrap_name(ev) -> str:
    return f"BCa bootstrap 95% ({ev.bootstrap_resamples} resamples)"


def cells(rows: list[dict], ev) -> dict[str, dict]:
    out = {m: cell(rows, m, ev) for m in metrics() if m != "ppl"}
    out["ppl"] = _ppl_cell(out["loss"])
    return out


def compare(base_rows: list[dict], rows: list[dict], metric: str, ev) -> dict:
    """The model against the base on the examples both have: difference, its interval, p, verdict."""
    b, a = _values(base_rows, metric), _values(rows, metric)
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"n": 0, "difference": None, "low": None, "high": None, "p": None, "test": None,
                "verdict": "not measured"}
    A = [np.array([a[k][j] for k in keys], dtype=np.float64) for j in range(len(a[keys[0]]))]
    B = [np.array([b[k][j] for k in keys], dtype=np.float64) for j in range(len(b[keys[0]]))]
    f = _statistic(metric)
    diff = float(f(*A) - f(*B))
    k = len(A)
    if _proportion(metric):
        lo, hi = stats.newcombe_paired(B[0] > 0.5, A[0] > 0.5)
        interval = NEWCOMBE
        p, test = stats.mcnemar_exact(B[0] > 0.5, A[0] > 0.5), "McNemar exact"
    else:
        lo, hi = stats.bootstrap_interval(lambda *c: f(*c[:k]) - f(*c[k:]), A + B, ev.bootstrap_resamples, ev.seed)
        interval = _bootstrap_name(ev) + ", paired"
        p, test = stats.paired_permutation(B[0], A[0], ev.permutation_resamples, ev.seed), "paired permutation"
    return {"n": len(keys), "difference": diff, "low": lo, "high": hi, "interval": interval,
            "p": p, "test": test,
            "verdict": stats.verdict(p, diff, higher_is_better(metric), ev.alpha)}


def headline_metric(counts: dict) -> str:
    """What decides a domain's verdict: the first registered task kind's headline that applies (multiple
    choice: accuracy when it has scored rows that are not trivial, see tasks.majority; free text: ROUGE-L
    when it has generations), else loss."""
    return next((h for h in (s.headline(counts) for s in SCORERS.values()) if h), "loss")


def _counts(plan, rows: list[dict]) -> dict:
    out = {"test_rows": plan.test_rows, "items": len(plan.items),
           "scored_for_loss": sum(1 for r in rows if r.get("n_tokens"))}
    for kind, s in SCORERS.items():
        out.update(s.counts([it for it in plan.items if it.kind == kind]))
    out["generated"] = sum(1 for it in plan.items if it.generate)
    return out


def _tasks(plan, scores: dict[str, dict[str, list[dict]]], ev) -> dict:
    """Per source/task of one dataset: kind, counts and every model's cells (for the task tables)."""
    out: dict[str, dict] = {}
    for name in sorted({it.task_name for it in plan.items}):
        its = [it for it in plan.items if it.task_name == name]
        keys = {it.key for it in its}
        s = scorer_of(its[0].kind)
        out[name] = {"kind": s.kind, "rows": len(its), **s.task_summary(its),
                     "generated": sum(1 for it in its if it.generate),
                     "choices": list(its[0].choices),
                     "metrics": {m: {model: cell([r for r in per[plan.domain] if r["key"] in keys], m, ev)
                                     for model, per in scores.items() if plan.domain in per}
                                 for m in ("loss",) + s.task.metrics}}
    return out


def _side_by_side(plan, scores: dict) -> list[dict]:
    base = {r["key"]: r for r in scores.get("base", {}).get(plan.domain, [])}
    own = {r["key"]: r for r in scores.get(plan.domain, {}).get(plan.domain, [])}
    cut = (lambda s: None if s is None else (s if len(s) <= TEXT_LIMIT else s[:TEXT_LIMIT] + " [...]"))
    return [{"source": it.source, "task": it.task, "prompt": cut(it.prompt), "reference": cut(it.response),
             "base": cut(base.get(it.key, {}).get("generation")), "adapter": cut(own.get(it.key, {}).get("generation"))}
            for it in plan.items if it.side_by_side]


def _mean(xs: list[Optional[float]]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _summary(models: list[str], datasets: list[str], comparisons: dict) -> dict:
    """Diagonal (each adapter on its own domain) and off-diagonal (on the others: interference)."""
    out = {}
    for part, pick in (("diagonal", lambda m, d: m == d), ("off_diagonal", lambda m, d: m != d)):
        out[part] = {}
        for metric in tested():
            cs = [comparisons[m][d][metric] for m in models if m != "base" for d in datasets
                  if pick(m, d) and d in comparisons.get(m, {})]
            cs = [c for c in cs if c["n"]]
            out[part][metric] = {"cells": len(cs), "mean_difference": _mean([c["difference"] for c in cs]),
                                 **{v: sum(1 for c in cs if c["verdict"] == v)
                                    for v in (stats.BETTER, stats.WORSE, stats.NO_DIFFERENCE)}}
    return out


def build_matrix(plans: list, scores: dict[str, dict[str, list[dict]]], ev) -> dict:
    """scores: model -> dataset -> example_rows."""
    models = ["base"] + [m for m in scores if m != "base"]
    datasets = [p.domain for p in plans]
    table = {m: {model: {} for model in models} for m in metrics()}
    for model in models:
        for d in datasets:
            for m, c in cells(scores[model][d], ev).items():
                table[m][model][d] = c
    comparisons = {model: {d: {m: compare(scores["base"][d], scores[model][d], m, ev) for m in tested()}
                           for d in datasets} for model in models if model != "base"}
    counts = {p.domain: _counts(p, scores["base"][p.domain]) for p in plans}
    verdicts = {}
    for d in datasets:
        if d in comparisons:
            h = headline_metric(counts[d])
            verdicts[d] = {"metric": h, **comparisons[d][d][h]}
    # the per-domain verdicts are a family of tests: Holm's correction over them ("p" stays the raw p-value)
    adjusted = stats.holm({d: v["p"] for d, v in verdicts.items() if v.get("p") is not None})
    for d, v in verdicts.items():
        v["p_adjusted"] = adjusted.get(d)
        v["correction"] = f"Holm over {len(adjusted)} domain verdicts"
        if v.get("n"):
            v["verdict"] = stats.verdict(v["p_adjusted"], v["difference"], higher_is_better(v["metric"]), ev.alpha)
    return {
        "models": models, "datasets": datasets,
        # the loss matrix as before (model -> dataset -> value), kept for readers of the old layout
        "loss": {m: {d: table["loss"][m][d]["value"] for d in datasets} for m in models},
        "ppl": {m: {d: table["ppl"][m][d]["value"] for d in datasets} for m in models},
        "n_examples": {d: table["loss"]["base"][d]["n"] for d in datasets},
        "metrics": table, "counts": counts, "comparisons": comparisons, "verdicts": verdicts,
        "summary": _summary(models, datasets, comparisons),
        "tasks": {p.domain: _tasks(p, scores, ev) for p in plans},
        "side_by_side": {p.domain: _side_by_side(p, scores) for p in plans},
        "settings": ev.model_dump(mode="json"),
    }
