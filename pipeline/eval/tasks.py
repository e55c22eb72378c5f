"""How the evaluation scores each kind of task: one ``TaskScorer`` per ``EvalTask`` kind, registered in
``SCORERS`` (kind -> scorer). The plan, the model side and the matrix ask the item's scorer and never
name a kind; a new kind is an ``EvalTask`` subclass in pipeline/sources/base.py (its name, its metrics:
``TASK_KINDS``) and a ``TaskScorer`` subclass here, registered with ``register``.

The declaration (choices, metric names) stays in sources, which is a lower layer than the evaluation and
imports no model code; the behaviour is here. A scorer answers, for one item of its kind:

    item_fields(task, reference) -> dict       what the plan stores on the item (choices, gold ...)
    sampled_for_generation                     its rows may be drawn for eval.generation_samples
    scored(item) -> bool                       False: not scored on its metrics, and counted (unscored)
    sequences(tok, item, max_len) -> [Example] what the model scores by log-likelihood besides the loss
    score_likelihoods(item, logprobs) -> dict  the result's fields from those sequences' log-likelihoods
    score_generation(item, text) -> dict       the result's fields from a generation of the sample
    likelihood_row / generation_row(item, result) -> dict   its columns of the Parquet example row
    metrics                                    (name, Metric): the column each metric is computed from,
                                               its direction, whether it is a 0/1 proportion
    counts(items) / task_summary(items)        what the matrix's counts and task tables say of it
    headline(counts) -> metric or None         the metric that decides a domain's verdict (the first
                                               registered kind that names one decides; else loss)
    progress(items, results) -> [str]          its part of the progress log line (its items and their results)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from pipeline.eval.metrics import rouge_l, token_f1
from pipeline.lm.data import CHARS_PER_TOKEN_BOUND, IGNORE, Example, cut_prompt_response, cut_texts
from pipeline.lm.model import encode_conversation
from pipeline.sources.base import TASK_KINDS, EvalTask, FreeText, MultipleChoice


@dataclass(frozen=True)
class Metric:
    """How the matrix computes one task metric from the example rows."""
    column: str                    # the Parquet example row's column holding each row's value
    higher_is_better: bool = True
    proportion: bool = False       # 0/1 per row: exact Clopper-Pearson interval and McNemar's test


class TaskScorer:
    """The behaviour of one EvalTask kind (see the module's docstring); the defaults are "nothing"."""
    task: ClassVar[type[EvalTask]]
    metric_specs: ClassVar[dict[str, Metric]] = {}          # one per name in task.metrics
    likelihood_columns: ClassVar[tuple[str, ...]] = ()
    generation_columns: ClassVar[tuple[str, ...]] = ()
    sampled_for_generation: ClassVar[bool] = False

    @property
    def kind(self) -> str:
        return self.task.kind

    @property
    def metrics(self) -> tuple[tuple[str, Metric], ...]:
        return tuple((m, self.metric_specs[m]) for m in self.task.metrics)

    def item_fields(self, task: EvalTask, reference: str) -> dict:
        return {}

    def scored(self, item) -> bool:
        return True

    def sequences(self, tok, item, max_len: int) -> list[Example]:
        return []

    def score_likelihoods(self, item, logprobs: list[float]) -> dict:
        return {}

    def score_generation(self, item, text: str) -> dict:
        return {}

    def likelihood_row(self, item, result: dict) -> dict:
        return {c: result.get(c) for c in self.likelihood_columns}

    def generation_row(self, item, result: dict) -> dict:
        return {c: result.get(c) for c in self.generation_columns}

    def counts(self, items: list) -> dict:
        return {self.kind: len(items)}

    def task_summary(self, items: list) -> dict:
        return {"unscored": sum(1 for it in items if not self.scored(it))}

    def headline(self, counts: dict) -> Optional[str]:
        return None

    def progress(self, items: list, results: list[dict]) -> list[str]:
        return []


# ---- multiple choice ------------------------------------------------------------------------------------

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


def choice_ids(tok, messages: list[dict], choice: str) -> tuple[list[int], list[int]]:
    """(prompt ids, choice ids): the choice's tokens as they open a trained answer to these turns (its
    end-of-turn tokens cut: the shortest prefix of the answer tokens that decodes to text holding the choice)."""
    ids, trained = encode_conversation(tok, cut_texts(list(messages) + [{"role": "assistant", "content": choice}],
                                                       CHARS_PER_TOKEN_BOUND * 4096))[-1]
    start = next(k for k in range(len(trained) - 1, -1, -1) if trained[k] and (k == 0 or not trained[k - 1]))
    p, r = ids[:start], [t for t, on in zip(ids[start:], trained[start:]) if on]  # the last answer: the choice
    for k in range(1, len(r) + 1):
        if choice.strip() in tok.decode(r[:k], skip_special_tokens=True):
            return p, r[:k]
    return p, r


class MultipleChoiceScorer(TaskScorer):
    """One sequence per choice (the server prompt, then the choice's tokens as they open a trained answer,
    only those scored); acc takes the likeliest choice, acc_norm the likeliest per character. A row whose
    gold cannot be read is not scored, and counted."""
    task = MultipleChoice
    metric_specs = {"acc": Metric("correct", proportion=True), "acc_norm": Metric("correct_norm", proportion=True)}
    likelihood_columns = ("choice_ll", "pred", "pred_norm", "correct", "correct_norm")

    def item_fields(self, task: MultipleChoice, reference: str) -> dict:
        return {"choices": task.choices, "gold": task.gold(reference)}

    def scored(self, item) -> bool:
        return item.gold is not None

    def sequences(self, tok, item, max_len: int) -> list[Example]:
        if not self.scored(item):
            return []
        out = []
        for c in item.choices:
            p, r = cut_prompt_response(*choice_ids(tok, item.prompt_messages, c), max_len)
            out.append(Example(p + r, [IGNORE] * len(p) + r))
        return out

    def score_likelihoods(self, item, logprobs: list[float]) -> dict:
        norm = [x / max(1, len(c)) for x, c in zip(logprobs, item.choices)]
        return {"choice_ll": logprobs, "pred": int(np.argmax(logprobs)), "pred_norm": int(np.argmax(norm))}

    def likelihood_row(self, item, result: dict) -> dict:
        mc = "pred" in result
        return {**super().likelihood_row(item, result), "correct": (result["pred"] == item.gold) if mc else None,
                "correct_norm": (result["pred_norm"] == item.gold) if mc else None}

    def counts(self, items: list) -> dict:
        k = self.kind
        return {k: len(items), f"{k}_scored": sum(1 for it in items if self.scored(it)),
                f"{k}_unscored": sum(1 for it in items if not self.scored(it)),
                **{f"{k}_{n}": v for n, v in majority([(it.task_name, it.gold) for it in items]).items()}}

    def task_summary(self, items: list) -> dict:
        return {**majority([(it.task_name, it.gold) for it in items]), **super().task_summary(items)}

    def headline(self, counts: dict) -> Optional[str]:
        # accuracy decides unless the majority answer alone would score as well (trivial)
        return "acc" if counts[f"{self.kind}_scored"] and not counts.get(f"{self.kind}_trivial") else None

    def progress(self, items: list, results: list[dict]) -> list[str]:
        mc = [(r["pred"], it.gold) for it, r in zip(items, results) if "pred" in r]
        return [f"acc {sum(p == g for p, g in mc) / len(mc):.3f} ({len(mc)} scored)"] if mc else []


# ---- free text ---------------------------------------------------------------------------------------

class FreeTextScorer(TaskScorer):
    """Rows of the generation sample are generated greedily and scored against their reference."""
    task = FreeText
    metric_specs = {"rouge_l": Metric("rouge_l"), "f1": Metric("f1")}
    generation_columns = ("rouge_l", "f1")
    sampled_for_generation = True

    def score_generation(self, item, text: str) -> dict:
        return {"rouge_l": rouge_l(text, item.response), "f1": token_f1(text, item.response)}

    def headline(self, counts: dict) -> Optional[str]:
        # free text is the only kind sampled for generation today; its own rows must be there (a kind
        # registered later may be sampled too)
        return "rouge_l" if counts.get(self.kind) and counts["generated"] else None

    def progress(self, items: list, results: list[dict]) -> list[str]:
        rl = [r["rouge_l"] for r in results if "rouge_l" in r]
        return [f"ROUGE-L {sum(rl) / len(rl):.3f} ({len(rl)} generated)"] if rl else []


# ---- the registry ----------------------------------------------------------------------------------------

SCORERS: dict[str, TaskScorer] = {}


def register(scorer: TaskScorer) -> TaskScorer:
    """Add a kind's scorer; its task must be the kind sources declare (TASK_KINDS) and it must say how
    each of the task's metrics is computed."""
    if TASK_KINDS.get(scorer.kind) is not scorer.task:
        raise ValueError(f"scorer {type(scorer).__name__}: its task {scorer.task.__name__} is not TASK_KINDS[{scorer.kind!r}]")
    if set(scorer.metric_specs) != set(scorer.task.metrics):
        raise ValueError(f"scorer {type(scorer).__name__}: metric_specs {sorted(scorer.metric_specs)} are not "
                         f"the metrics {scorer.task.__name__} declares {list(scorer.task.metrics)}")
    SCORERS[scorer.kind] = scorer
    return scorer


for _s in (MultipleChoiceScorer(), FreeTextScorer()):
    register(_s)


def scorer_of(kind: str) -> TaskScorer:
    try:
        return SCORERS[kind]
    except KeyError:
        raise KeyError(f"no scorer for eval task kind {kind!r} (registered: {', '.join(SCORERS)}): "
                       "pipeline/eval/tasks.py registers one per pipeline.sources.base.TASK_KINDS entry") from None


def task_metrics() -> dict[str, Metric]:
    """Every registered kind's metrics, in registration order (a name two kinds share is listed once)."""
    out: dict[str, Metric] = {}
    for s in SCORERS.values():
        for name, spec in s.metrics:
            out.setdefault(name, spec)
    return out
