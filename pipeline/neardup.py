"""Near-duplicates across splits: word n-gram hashes, near-duplicate pairs, templates, a contamination count.

    rows_hashes(rows) / row_hashes(row) / ngram_hashes(text) -> distinct word 13-gram hashes (uint64, sorted)
    near_duplicate_links(hashes, max_df)      -> pairs (i, j) of rows sharing >= PAIR_SHARE of the smaller
                                                 one's n-grams (n-grams in more than max_df rows not counted)
    templates(hashes, tasks)                  -> the n-grams in more than TEMPLATE_SHARE of one task's rows
    covered(hashes, pool) / contamination(test, train) -> share of each row's n-grams in a pool; how many
                                                 test rows reach THRESHOLD

Words are the evaluation's (pipeline/words.py: lowercased Unicode words, CJK per character)
of prompt + response. What prepare does with them (``data.near_duplicates``, on by default; the
guarantee in full: docs/ARCHITECTURE.md, "What the split guarantees"): near-duplicate pairs join one
split unit, then any val/test row with >= THRESHOLD of its non-template n-grams in train moves to
train with its unit. The second step is what catches a Climate-FEVER claim whose evidence sentences
are spread over several train claims; the first keeps a short row and the long one that contains it
together whichever split they land in. Paraphrases that share no 13 consecutive words are not caught,
and nothing is enforced across domains; ``contamination`` measures what is left (the data card's table).

Hand-written on numpy rather than MinHash LSH (datasketch): MinHash estimates Jaccard similarity of
whole rows, and the leak that matters here is containment (a test row half made of one or several
train rows' sentences), which a Jaccard threshold misses when the rows differ in length; exact shared
n-grams find it, deterministically, with one sort over (hash, row) pairs, in memory linear in the
domain's words (the domain is capped by ``max_sft_per_domain``).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from pipeline.words import words   # the evaluation's Unicode words (CJK per character)

NGRAM = 13            # words per shingle (GPT-3's contamination check used 13-grams)
PAIR_SHARE = 0.5      # two rows sharing this much of the smaller one's (non-template) n-grams are near-duplicates
THRESHOLD = 0.5       # a test row with at least this share of its n-grams in train counts as contaminated
_P = np.uint64(0x9E3779B97F4A7C15)   # odd multiplier of the polynomial rolling hash


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads small word ids over 64 bits (vectorised, wraps mod 2**64)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _text(row: dict) -> str:
    """Every turn of the conversation, in order (prompt and answers: what a model sees of it)."""
    return "\n".join(m["content"] for m in row["messages"])


def column_texts(messages) -> list[str]:
    """_text of every row of a Parquet ``messages`` column (a pyarrow list<struct<role, content>> array),
    without building a dict per message (pyarrow's to_pylist of structs was most of the time of reading)."""
    arr = messages.combine_chunks() if hasattr(messages, "combine_chunks") else messages
    contents = arr.flatten().field("content").to_pylist()
    offsets = arr.offsets.to_numpy()
    offsets = (offsets - offsets[0]).tolist()
    return ["\n".join(contents[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def row_hashes(row: dict, n: int = NGRAM) -> np.ndarray:
    """An SFT row's n-gram hashes: all its turns together (what a model sees of it)."""
    return ngram_hashes(_text(row), n)


def rows_hashes(rows: Sequence[dict], n: int = NGRAM) -> list[np.ndarray]:
    """row_hashes of many rows at once (the same values): see texts_hashes."""
    return texts_hashes([_text(r) for r in rows], n)


def texts_hashes(texts: Sequence[str], n: int = NGRAM) -> list[np.ndarray]:
    """ngram_hashes of many texts at once (the same values): one rolling hash over all their words and one
    sort, so the per-text cost is the tokenizer's, not a dozen numpy calls."""
    toks = [words(t) for t in texts]
    lens = np.fromiter(map(len, toks), np.int64, len(toks))
    flat = _ids(list(itertools.chain.from_iterable(toks)))
    out: list[np.ndarray] = [np.empty(0, np.uint64)] * len(texts)
    for k in np.flatnonzero((lens > 0) & (lens < n)):      # shorter than n words: one hash of all of them
        out[k] = ngram_hashes(" ".join(toks[k]), n)
    full = np.flatnonzero(lens >= n)
    if not len(full):
        return out
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    win = _windows(flat, n)
    counts = lens[full] - n + 1
    before = np.r_[0, np.cumsum(counts)[:-1]]
    idx = np.arange(counts.sum()) - np.repeat(before, counts) + np.repeat(starts[full], counts)
    row = np.repeat(full, counts)
    h = _mix(win[idx])
    order = _order_by_row_then_hash(row, h, len(texts))
    h, row = h[order], row[order]
    keep = np.r_[True, (h[1:] != h[:-1]) | (row[1:] != row[:-1])]
    h, row = h[keep], row[keep]
    bounds = np.searchsorted(row, full, side="left"), np.searchsorted(row, full, side="right")
    for k, a, b in zip(full.tolist(), *bounds):
        out[k] = h[a:b]
    return out


def _order_by_row_then_hash(row: np.ndarray, h: np.ndarray, n_rows: int) -> np.ndarray:
    """The permutation that sorts (row, h) pairs by row, then hash: one argsort of a 64-bit key holding the row
    in its top bits and the hash's top bits below (~10x faster than np.lexsort here). Two hashes of one row
    that agree in those top bits could come out of order: that is checked, and then np.lexsort sorts exactly."""
    bits = max(1, int(n_rows - 1).bit_length())
    if bits > 32:
        return np.lexsort((h, row))
    key = (row.astype(np.uint64) << np.uint64(64 - bits)) | (h >> np.uint64(bits))
    order = np.argsort(key)
    r, hs = row[order], h[order]
    if np.any((r[1:] == r[:-1]) & (hs[1:] < hs[:-1])):
        return np.lexsort((h, row))
    return order


def _ids(ws: list[str]) -> np.ndarray:
    """Stable 64-bit ids of words: each distinct word hashed once (_word_ids), then looked up. The same in
    every process and on every machine (Python's own str hash is salted per process, PYTHONHASHSEED), so
    hashes made in different processes or runs can be compared."""
    table = dict.fromkeys(ws)
    uniq = list(table)
    table = dict(zip(uniq, _word_ids(uniq).tolist()))
    return np.fromiter(map(table.__getitem__, ws), np.uint64, len(ws))


def _word_ids(uniq: list[str]) -> np.ndarray:
    """A polynomial hash of each word's UTF-8 bytes, mixed with its length, vectorised over all the words."""
    if not uniq:
        return np.empty(0, np.uint64)
    blens = np.fromiter((len(w.encode("utf-8")) for w in uniq), np.int64, len(uniq))
    b = np.frombuffer("".join(uniq).encode("utf-8"), np.uint8).astype(np.uint64) + np.uint64(1)
    starts = np.r_[0, np.cumsum(blens)[:-1]]
    h = np.zeros(len(uniq), np.uint64)
    if len(b):
        powers = np.full(int(blens.max()), _P, np.uint64)
        powers[0] = 1
        powers = np.cumprod(powers, dtype=np.uint64)             # _P ** i, wrapping mod 2**64
        pos = np.arange(len(b)) - np.repeat(starts, blens)      # each byte's position in its word
        nonempty = blens > 0
        h[nonempty] = np.add.reduceat(b * powers[pos], starts[nonempty])
    return _mix(h ^ _mix(blens.astype(np.uint64)))


def _windows(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every run of n consecutive ids (wraps mod 2**64)."""
    h = np.zeros(len(ids) - n + 1, np.uint64)
    p = np.uint64(1)
    with np.errstate(over="ignore"):
        for k in range(n - 1, -1, -1):
            h += ids[k:len(ids) - n + 1 + k] * p
            p = p * _P
    return h


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """Distinct hashes of the text's word n-grams (a text shorter than n words: one hash of all its words)."""
    ws = words(text)
    if not ws:
        return np.empty(0, np.uint64)
    ids = _ids(ws)
    return _sorted_unique(_mix(_windows(ids, min(n, len(ids)))))


def _pairs(hashes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All (hash, row) pairs, sorted by hash (rows ascending within a hash)."""
    sizes = np.fromiter((len(h) for h in hashes), np.int64, len(hashes))
    H = np.concatenate(list(hashes)) if len(hashes) else np.empty(0, np.uint64)
    R = np.repeat(np.arange(len(hashes), dtype=np.int64), sizes)
    order = np.argsort(H, kind="stable")   # stable: rows stay ascending within a hash (R is built ascending)
    return H[order], R[order]


def near_duplicate_links(hashes: Sequence[np.ndarray], max_df: int, share: float = PAIR_SHARE) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of rows that are near-duplicates: the n-grams they share, counting only those
    found in at most max_df rows, are at least `share` of the smaller row's n-grams (one row is mostly
    contained in the other: a repeated answer, a claim citing the same evidence)."""
    H, R = _pairs(hashes)
    if len(H) < 2:
        return []
    starts = np.flatnonzero(np.r_[True, H[1:] != H[:-1]])
    lengths = np.diff(np.r_[starts, len(H)])
    keep = (lengths >= 2) & (lengths <= max_df)
    part_codes, part_counts = [], []
    kept = np.flatnonzero(keep)
    if not len(kept):   # no n-gram shared by two rows (one row, or all distinct)
        return []
    kept = kept[np.argsort(lengths[kept], kind="stable")]
    bounds = np.flatnonzero(np.r_[True, np.diff(lengths[kept]) != 0, True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):   # every pair of rows within each posting list, vectorised per length
        L = int(lengths[kept[lo]])
        a, b = np.triu_indices(L, 1)
        all_s = starts[kept[lo:hi]]
        step = max(1, 4_000_000 // len(a))   # posting lists per chunk: at most ~4M pairs in memory at once
        for c in range(0, len(all_s), step):
            rows = R[all_s[c:c + step, None] + np.arange(L)]
            codes, counts = np.unique(rows[:, a].ravel() * len(hashes) + rows[:, b].ravel(), return_counts=True)
            part_codes.append(codes)
            part_counts.append(counts)
    if not part_codes:
        return []
    codes, inverse = np.unique(np.concatenate(part_codes), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(part_counts)).astype(np.int64)
    i, j = codes // len(hashes), codes % len(hashes)
    sizes = np.fromiter((len(h) for h in hashes), np.int64, len(hashes))
    ok = counts >= share * np.minimum(sizes[i], sizes[j])
    return list(zip(i[ok].tolist(), j[ok].tolist()))


def _member(h: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    """h's elements found in sorted_pool (binary search: np.isin would sort the pool again per row)."""
    if not len(sorted_pool):
        return np.zeros(len(h), bool)
    i = np.minimum(np.searchsorted(sorted_pool, h), len(sorted_pool) - 1)
    return sorted_pool[i] == h


def covered(hashes: Sequence[np.ndarray], pool: np.ndarray) -> np.ndarray:
    """Per row, the share of its n-grams found in `pool` (a sorted unique array); 0 for a row without any."""
    if not len(hashes):
        return np.zeros(0)
    sizes = np.fromiter((len(h) for h in hashes), np.int64, len(hashes))
    if not sizes.sum():
        return np.zeros(len(hashes))
    found = np.r_[0, np.cumsum(_member(np.concatenate(list(hashes)), pool))]
    ends = np.cumsum(sizes)
    hits = found[ends] - found[ends - sizes]
    return np.where(sizes > 0, hits / np.maximum(sizes, 1), 0.0)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy 2's default hash-based unique was 10x slower on these uint64 arrays)."""
    a = np.sort(a)
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


def pool_of(hashes: Sequence[np.ndarray]) -> np.ndarray:
    """All n-grams of the rows, sorted unique."""
    return _sorted_unique(np.concatenate(list(hashes))) if len(hashes) else np.empty(0, np.uint64)


def max_df_for(n_rows: int) -> int:
    """The most rows an n-gram may be in and still link two rows as near-duplicates: 2% of the domain,
    between 20 and 100 (a posting list of k rows costs k**2 / 2 pairs; a phrase that common is no
    evidence that two rows are copies)."""
    return max(20, min(100, n_rows // 50))


# above this many rows in a domain, prepare skips the near-duplicate step and the contamination table
# (logged, and said in the manifest): both hold every row's n-grams in the driver's memory (~1.2 GB per
# million rows of Climate-FEVER size) and tokenize in one process (~0.1 ms a row)
MAX_ROWS = 200_000


TEMPLATE_SHARE = 0.1  # an n-gram in more than this share of one task's rows (and in 3 or more) is that task's template


def templates(hashes: Sequence[np.ndarray], tasks: Sequence[str]) -> np.ndarray:
    """The n-grams that are templates, sorted unique: found in more than TEMPLATE_SHARE of the rows of one
    task (source/task: every row of a task carries its prompt's and its answer format's n-grams), and in
    at least 3 of them. A sentence many rows quote (a Climate-FEVER evidence sentence in 3% of claims, a
    MedQuAD paragraph in a few answers) stays content."""
    by_task: dict[str, list[int]] = {}
    for k, t in enumerate(tasks):
        by_task.setdefault(t, []).append(k)
    out = []
    for rows in by_task.values():
        H = np.sort(np.concatenate([hashes[k] for k in rows]))   # each row's hashes are distinct: a count is a row count
        if not len(H):
            continue
        starts = np.flatnonzero(np.r_[True, H[1:] != H[:-1]])
        counts = np.diff(np.r_[starts, len(H)])
        out.append(H[starts][counts > max(2, TEMPLATE_SHARE * len(rows))])
    return _sorted_unique(np.concatenate(out)) if out else np.empty(0, np.uint64)


def without(hashes: Sequence[np.ndarray], drop: np.ndarray) -> list[np.ndarray]:
    """Each row's n-grams minus `drop` (sorted unique)."""
    if not len(hashes) or not len(drop):
        return list(hashes)
    sizes = np.fromiter((len(h) for h in hashes), np.int64, len(hashes))
    flat = np.concatenate(list(hashes))
    keep = ~_member(flat, drop)   # one binary search for all rows, then cut back into rows
    kc, ends = np.r_[0, np.cumsum(keep)], np.cumsum(sizes)
    return np.split(flat[keep], np.cumsum(kc[ends] - kc[ends - sizes])[:-1])


def contamination(test: Sequence[np.ndarray], train: Sequence[np.ndarray] | np.ndarray, threshold: float = THRESHOLD) -> int:
    """How many test rows have at least `threshold` of their distinct n-grams somewhere in `train` (rows, or
    their pool_of already); templates included: the measure as published contamination checks count it."""
    pool = train if isinstance(train, np.ndarray) else pool_of(train)
    return int((covered(test, pool) >= threshold).sum()) if len(test) else 0
