"""From per-example scores to eval/matrix.json: cells with intervals, paired tests, verdicts.

    example_rows(plan, results) -> list[dict]        one row per test item: the Parquet table
                                                     eval/scores/<model>/<dataset>.parquet
    build_matrix(plans, scores, ev) -> dict           the content of eval/matrix.json

Metrics (METRICS), each cell {"value", "low", "high", "n", "interval"}: acc and acc_norm (0/1 per example)
get the exact Clopper-Pearson 95% interval (coverage >= 95% at any n; a perfect 10/10 gets [0.69, 1]),
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
from collections import Counter
from typing import Optional

import numpy as np

from pipeline.eval import stats
from pipeline.sources.base import TASK_KINDS

METRICS = ("loss", "ppl", "acc", "acc_norm", "rouge_l", "f1")
HIGHER_IS_BETTER = {"loss": False, "ppl": False, "acc": True, "acc_norm": True, "rouge_l": True, "f1": True}
TESTED = ("loss", "acc", "acc_norm", "rouge_l", "f1")     # ppl is a function of loss: same test
PROPORTIONS = ("acc", "acc_norm")                          # per-example 0/1: exact binomial intervals
CLOPPER_PEARSON = "Clopper-Pearson exact 95%"
NEWCOMBE = "Newcombe paired 95% (Clopper-Pearson margins)"
TEXT_LIMIT = 4000                                           # characters of a text shown side by side


def example_rows(plan, results: list[dict]) -> list[dict]:
    """The Parquet rows of one model on one dataset (nullable columns per kind)."""
    out = []
    for it, r in zip(plan.items, results):
        mc = "pred" in r
        out.append({
            "key": it.key, "doc_id": it.doc_id, "source": it.source, "task": it.task, "kind": it.kind,
            "gold": it.gold, "loss_sum": r.get("loss_sum"), "n_tokens": r.get("n_tokens"),
            "loss": r["loss_sum"] / r["n_tokens"] if r.get("n_tokens") else None,
            "choice_ll": r.get("choice_ll"), "pred": r.get("pred"), "pred_norm": r.get("pred_norm"),
            "correct": (r["pred"] == it.gold) if mc else None, "correct_norm": (r["pred_norm"] == it.gold) if mc else None,
            "generated": it.generate, "generation": r.get("generation"),
            "rouge_l": r.get("rouge_l"), "f1": r.get("f1"), "side_by_side": it.side_by_side,
        })
    return out


# ---- per-metric arrays --------------------------------------------------------------------------

def _values(rows: list[dict], metric: str) -> dict[str, tuple]:
    """key -> the per-example values a metric is computed from (loss: (sum, tokens); others: (x,))."""
    if metric == "loss":
        return {r["key"]: (r["loss_sum"], r["n_tokens"]) for r in rows if r.get("n_tokens")}
    col = {"acc": "correct", "acc_norm": "correct_norm", "rouge_l": "rouge_l", "f1": "f1"}[metric]
    return {r["key"]: (float(r[col]),) for r in rows if r.get(col) is not None}


def _statistic(metric: str):
    return stats.ratio_of if metric == "loss" else stats.mean_of


def cell(rows: list[dict], metric: str, ev) -> dict:
    vals = _values(rows, metric)
    if not vals:
        return {"value": None, "low": None, "high": None, "n": 0}
    cols = [np.array(c, dtype=np.float64) for c in zip(*vals.values())]
    value = float(_statistic(metric)(*cols))
    if metric in PROPORTIONS:
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
    out = {m: cell(rows, m, ev) for m in METRICS if m != "ppl"}
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
    if metric in PROPORTIONS:
        lo, hi = stats.newcombe_paired(B[0] > 0.5, A[0] > 0.5)
        interval = NEWCOMBE
        p, test = stats.mcnemar_exact(B[0] > 0.5, A[0] > 0.5), "McNemar exact"
    else:
        lo, hi = stats.bootstrap_interval(lambda *c: f(*c[:k]) - f(*c[k:]), A + B, ev.bootstrap_resamples, ev.seed)
        interval = _bootstrap_name(ev) + ", paired"
        p, test = stats.paired_permutation(B[0], A[0], ev.permutation_resamples, ev.seed), "paired permutation"
    return {"n": len(keys), "difference": diff, "low": lo, "high": hi, "interval": interval,
            "p": p, "test": test,
            "verdict": stats.verdict(p, diff, HIGHER_IS_BETTER[metric], ev.alpha)}


# a multiple-choice test set whose most common gold answer is more than this share of its rows is
# flagged trivial: its accuracy says little beyond "answer the majority" and decides no verdict
MAX_MAJORITY_RATE = 0.9


def majority(golds: list) -> dict:
    """The majority-class baseline of scored multiple-choice rows, `golds` as (task, gold index) pairs:
    the accuracy of always answering each task's most common gold (its rate), the fewest gold classes
    any task has, and whether that is trivial (a task with one class, or a rate above MAX_MAJORITY_RATE)."""
    per_task: dict[str, Counter] = {}
    for task, g in golds:
        if g is not None:
            per_task.setdefault(task, Counter())[g] += 1
    if not per_task:
        return {"majority_rate": None, "gold_classes": 0, "trivial": False}
    rate = sum(max(c.values()) for c in per_task.values()) / sum(sum(c.values()) for c in per_task.values())
    n_cls = min(len(c) for c in per_task.values())
    return {"majority_rate": rate, "gold_classes": n_cls, "trivial": n_cls < 2 or rate > MAX_MAJORITY_RATE}


def headline_metric(counts: dict) -> str:
    """What decides a domain's verdict: accuracy when it has scored multiple-choice rows that are not
    trivial (see majority), else ROUGE-L when it has generations, else loss."""
    if counts["multiple_choice_scored"] and not counts.get("multiple_choice_trivial"):
        return "acc"
    return "rouge_l" if counts["generated"] else "loss"


def _counts(plan, rows: list[dict]) -> dict:
    mc = [it for it in plan.items if it.kind == "multiple_choice"]
    return {"test_rows": plan.test_rows, "items": len(plan.items),
            "scored_for_loss": sum(1 for r in rows if r.get("n_tokens")),
            "multiple_choice": len(mc), "multiple_choice_scored": sum(1 for it in mc if it.gold is not None),
            "multiple_choice_unscored": sum(1 for it in mc if it.gold is None),
            **{f"multiple_choice_{k}": v for k, v in majority([(it.task_name, it.gold) for it in mc]).items()},
            "free_text": sum(1 for it in plan.items if it.kind == "free_text"),
            "generated": sum(1 for it in plan.items if it.generate)}


def _tasks(plan, scores: dict[str, dict[str, list[dict]]], ev) -> dict:
    """Per source/task of one dataset: kind, counts and every model's cells (for the task tables)."""
    out: dict[str, dict] = {}
    for name in sorted({it.task_name for it in plan.items}):
        its = [it for it in plan.items if it.task_name == name]
        keys = {it.key for it in its}
        kind = its[0].kind
        metrics = ("loss",) + TASK_KINDS[kind].metrics
        out[name] = {"kind": kind, "rows": len(its), **(majority([(name, it.gold) for it in its]) if kind == "multiple_choice" else {}),
                     "unscored": sum(1 for it in its if kind == "multiple_choice" and it.gold is None),
                     "generated": sum(1 for it in its if it.generate),
                     "choices": list(its[0].choices),
                     "metrics": {m: {model: cell([r for r in per[plan.domain] if r["key"] in keys], m, ev)
                                     for model, per in scores.items() if plan.domain in per} for m in metrics}}
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
        for metric in TESTED:
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
    metrics = {m: {model: {} for model in models} for m in METRICS}
    for model in models:
        for d in datasets:
            for m, c in cells(scores[model][d], ev).items():
                metrics[m][model][d] = c
    comparisons = {model: {d: {m: compare(scores["base"][d], scores[model][d], m, ev) for m in TESTED}
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
            v["verdict"] = stats.verdict(v["p_adjusted"], v["difference"], HIGHER_IS_BETTER[v["metric"]], ev.alpha)
    return {
        "models": models, "datasets": datasets,
        # the loss matrix as before (model -> dataset -> value), kept for readers of the old layout
        "loss": {m: {d: metrics["loss"][m][d]["value"] for d in datasets} for m in models},
        "ppl": {m: {d: metrics["ppl"][m][d]["value"] for d in datasets} for m in models},
        "n_examples": {d: metrics["loss"]["base"][d]["n"] for d in datasets},
        "metrics": metrics, "counts": counts, "comparisons": comparisons, "verdicts": verdicts,
        "summary": _summary(models, datasets, comparisons),
        "tasks": {p.domain: _tasks(p, scores, ev) for p in plans},
        "side_by_side": {p.domain: _side_by_side(p, scores) for p in plans},
        "settings": ev.model_dump(mode="json"),
    }
