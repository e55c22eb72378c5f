"""Words as the evaluation's scores and prepare's near-duplicate check see them: lowercase (str.lower),
then a run of letters or digits of any script (``[^\\W_]``), except that each CJK ideograph, kana or Hangul
syllable is a word of its own (pipeline/eval/metrics.py says why).

    words(text) -> list[str]
    char_class(c) -> 0, 1 or 2 (what one character of lowercased text is to words())
"""
from __future__ import annotations

import re

# Han (CJK unified ideographs, extension A, compatibility), Hiragana, Katakana, Hangul syllables
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+", re.UNICODE)
_CJK_CHAR = re.compile(f"[{_CJK}]")
_RUN_CHAR = re.compile(f"[^\\W_{_CJK}]", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def char_class(c: str) -> int:
    """What one character of lowercased text is to words(): 2 a word of its own (CJK), 1 part of a run of
    letters or digits, 0 a separator. words(text) is exactly the runs of 1s and each 2 of text.lower():
    prepare's near-duplicate check tokenizes many rows at once on these classes (pipeline/neardup.py)."""
    return 2 if _CJK_CHAR.match(c) else 1 if _RUN_CHAR.match(c) else 0
