"""Words as the evaluation's scores and prepare's near-duplicate check see them: lowercase (str.lower),
then a run of letters or digits of any script (``[^\\W_]``), except that each CJK ideograph, kana or Hangul
syllable is a word of its own (pipeline/eval/metrics.py says why).

    words(text) -> list[str]
"""
from __future__ import annotations

import re

# Han (CJK unified ideographs, extension A, compatibility), Hiragana, Katakana, Hangul syllables
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())
