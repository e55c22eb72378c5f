"""Free-text scores of a generation against its reference: ROUGE-L (F) and bag-of-words token F1.

    words(text)                   -> lowercase Unicode word tokens (what both scores compare)
    rouge_l(prediction, reference) -> ROUGE-L F-measure: LCS of the two token sequences, F with beta 1
    token_f1(prediction, reference) -> bag-of-words F1 (multiset overlap of `words`). Not SQuAD's F1:
                                       SQuAD's script also drops punctuation inside words and the
                                       articles a/an/the; here punctuation separates words and
                                       articles count, so the figures are not comparable with SQuAD's.

Tokenization (pipeline.words, shared with prepare's near-duplicate check), written out because every script must be scored: lowercase (str.lower), then a token
is a run of letters or digits of any script (``[^\\W_]``: Unicode word characters without the
underscore), except that each CJK ideograph, kana or Hangul syllable is a token of its own (those
scripts do not separate words with spaces; per-character tokens are how sacrebleu's ``zh`` tokenizer
and multilingual ROUGE variants score them). On ASCII text this is exactly rouge_score's default
tokenizer (lowercase, every run of non-[a-z0-9] a separator, no stemming), so ``rouge_l`` equals
rouge_score's ``rougeL`` F-measure there; rouge_score itself drops every non-ASCII character, which
gives two Cyrillic or Japanese texts 1.0 whatever they say.

Hand-written (a few lines each) instead of a dependency: rouge_score pulls nltk and absl for a
dynamic-programming loop, and the package itself needs only numpy. Two empty texts score 1.0 (they
agree); one empty text scores 0.0.
"""
from __future__ import annotations

from collections import Counter

from pipeline.words import words


def _f(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    p, r = words(prediction), words(reference)
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    return _f(lcs / len(p), lcs / len(r)) if p and r else 0.0


def token_f1(prediction: str, reference: str) -> float:
    p, r = words(prediction), words(reference)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    return _f(common / len(p), common / len(r)) if p and r else 0.0
