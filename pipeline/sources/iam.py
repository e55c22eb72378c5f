"""IAM (github.com/LiyingCheng95/IAM): tab-separated .txt files without a header. claims/ and
stance/ lines have 5 columns: claim_label (C claim / O other), topic sentence, candidate sentence,
article_id, stance_label (1 support, -1 contest, 0 none). One record = one line. Other IAM files
(evidence/, CEPE/) have other layouts: they are reported as unknown_format, not guessed at."""
from __future__ import annotations

from .base import (FREE_TEXT, DownloadPart, MultipleChoice, Opts, Quarantine, Raw, Reject, SourceSpec, clean, corpus_row, iter_lines, meta, stable_id,
                   EMPTY_TEXT, MISSING_FIELD, WRONG_COLUMNS)

NAME, DOMAIN = "iam", "debate"
NCOL = 5
STANCE_ANSWERS = ("Support", "Contest", "None")   # claim_detection's answers, as its responses start


def read(path, rel, opts: Opts):
    for n, line, q in iter_lines(path, rel, NAME, opts):
        if q is not None:
            yield q
            continue
        cells = line.split("\t")
        if len(cells) != NCOL:
            yield Quarantine(NAME, rel, f"line {n}", WRONG_COLUMNS, f"expected {NCOL} tab-separated columns, got {len(cells)}: {line[:200]}")
            continue
        yield Raw(NAME, rel, f"line {n}", dict(zip(("claim_label", "topic", "sentence", "article_id", "stance_label"), cells)))


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    sent, topic = clean(d["sentence"]), clean(d["topic"])
    if not sent:
        raise Reject(EMPTY_TEXT, topic)
    try:
        stance = int(d["stance_label"].strip())
    except ValueError:
        raise Reject(MISSING_FIELD, f"stance_label {d['stance_label']!r}")
    label = d["claim_label"].strip()
    return corpus_row(
        NAME, DOMAIN, stable_id(NAME, raw.file, raw.location), topic, sent,
        {"topic": topic, "claim": label == "C", "stance": {1: "support", -1: "contest", 0: "none"}.get(stance, str(stance)),
         "article_id": clean(d["article_id"]), "split_file": raw.file},
        SOURCE.license, SOURCE.url, group="topic:" + topic.lower(), opts=opts)


def build_sft(row: dict) -> list[dict]:
    """Every sentence is a claim_detection row with its own gold stance (claims/ files: mostly "None";
    stance/ files: "Support" or "Contest"); a claim with a stance is also a debate_turn row. Until
    2026-12 claims with a stance went to debate_turn only, so every claim_detection gold was "None"
    and always answering "None" scored 100% (issue 24)."""
    m = meta(row)
    stance = m.get("stance") if m.get("claim") else "none"
    # The fixed words (question, then answer) are kept under 13 in a row: a word 13-gram made of template
    # alone is in train by construction, and made most of a short row's 13-grams, so the contamination
    # check counted 85 of 1,342 debate test rows as leaked (issue 24). The old answers' reasons were one
    # fixed sentence per label ("None: the sentence gives background but takes no stance on the motion."),
    # no more information than the label itself.
    out = [{"task": "claim_detection",
            "prompt": f"Debate topic: {m.get('topic')}?\nSentence: {row['text']}\n"
                      "Stance of this sentence on the topic: support, contest or none?",
            "response": {"support": "Support.", "contest": "Contest."}.get(stance, "None.")}]
    if stance in ("support", "contest"):
        side = "in favour of" if stance == "support" else "against"
        out.append({"task": "debate_turn",
                    "prompt": f"Debate topic: {m['topic']}?\nGive one argument {side} the motion.",
                    "response": row["text"]})
    return out


SOURCE = SourceSpec(NAME, DOMAIN, "IAM", ("claims/*.txt", "stance/*.txt"), read, normalize, build_sft,
                license="research use; cite Cheng et al., ACL 2022", url="https://github.com/LiyingCheng95/IAM",
                parts=(DownloadPart("IAM", "git", "https://github.com/LiyingCheng95/IAM.git"),),
                how_to_get="adapters download (git clone of LiyingCheng95/IAM), or copy its claims/ and stance/ folders to <raw_dir>/IAM/",
                report_unmatched=("**/*.txt",),
                # claim_detection's response starts with "Support:", "Contest:" or "None:"
                tasks={"claim_detection": MultipleChoice(STANCE_ANSWERS), "debate_turn": FREE_TEXT})
