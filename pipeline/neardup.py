"""Near-duplicates across splits: word n-gram hashes, near-duplicate pairs, templates, a contamination count.

    rows_hashes(rows) / row_hashes(row) / ngram_hashes(text) -> distinct word 13-gram hashes (uint64, sorted)
    texts_pairs(texts) -> Index.from_pairs(h, row, n) -> a domain's (hash, row) pairs sorted by hash, read by
                                                 the steps below (what prepare uses: one sort per domain)
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
domain's words (the domain is capped by ``max_sft_per_domain``). Everything is vectorised (tokenizing
included: _word_ids), so the step and the contamination table add about 17% to an in-process prepare of the real data
(bench/NOTES.md).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from pipeline.words import char_class   # the evaluation's Unicode words (CJK per character)

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
    """ngram_hashes of many texts at once (the same values): the texts' words tokenized and hashed together
    in numpy (_word_ids), one rolling hash over all their words and one sort, so nothing is done per word
    in Python and per text only the lowercasing and the final cut into rows."""
    h, row = texts_pairs(texts, n)
    order = _order_by_row_then_hash(row, h, len(texts))
    h, row = h[order], row[order]
    keep = np.r_[True, (h[1:] != h[:-1]) | (row[1:] != row[:-1])] if len(h) else np.zeros(0, bool)
    return _cut(h[keep], np.bincount(row[keep], minlength=len(texts)))


def texts_pairs(texts: Sequence[str], n: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """Every n-gram hash of every text (repeats included, in no set order within a text) and its text's
    index: what texts_hashes sorts and cuts into rows, and Index.from_pairs sorts by hash instead."""
    flat, lens = _word_ids(texts)
    starts = np.r_[0, np.cumsum(lens)[:-1]].astype(np.int64)
    hs, rows = [], []
    # a text of 1 to n-1 words: one hash of all of them (the rolling hash of a window that long)
    short = np.flatnonzero((lens > 0) & (lens < n))
    if len(short):
        m = lens[short]
        at = np.repeat(starts[short], m) + (np.arange(m.sum()) - np.repeat(np.r_[0, np.cumsum(m)[:-1]], m))
        left = np.repeat(m, m) - 1 - (at - np.repeat(starts[short], m))      # words after this one in its text
        hs.append(_mix(np.add.reduceat(flat[at] * _powers(int(m.max()))[left], np.r_[0, np.cumsum(m)[:-1]])))
        rows.append(short)
    full = np.flatnonzero(lens >= n)
    if len(full):
        win = _windows(flat, n)
        counts = lens[full] - n + 1
        before = np.r_[0, np.cumsum(counts)[:-1]]
        idx = np.arange(counts.sum()) - np.repeat(before, counts) + np.repeat(starts[full], counts)
        hs.append(_mix(win[idx]))
        rows.append(np.repeat(full, counts))
    if not hs:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    return np.concatenate(hs), np.concatenate(rows).astype(np.int64)


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


def _order_by_hash_then_row(h: np.ndarray, row: np.ndarray, n_rows: int) -> np.ndarray:
    """The permutation that sorts (h, row) pairs by hash, then row: one argsort of a 64-bit key holding the
    hash's top bits and the row in the bits below; two hashes that agree in those top bits could come out
    of order: that is checked, and then np.lexsort sorts exactly."""
    bits = max(1, int(n_rows - 1).bit_length())
    if bits > 32:
        return np.lexsort((row, h))
    low = np.uint64((1 << bits) - 1)
    order = np.argsort((h & ~low) | row.astype(np.uint64))
    hs = h[order]
    if not np.any(hs[1:] < hs[:-1]):
        return order
    # exact in two argsorts (np.lexsort was ~10x slower): by hash, then by (rank of the hash, row)
    order = np.argsort(h)
    hs = h[order]
    rank = np.cumsum(np.r_[False, hs[1:] != hs[:-1]]).astype(np.uint64)
    if int(rank[-1]).bit_length() + bits > 64:
        return np.lexsort((row, h))
    return order[np.argsort((rank << np.uint64(bits)) | row[order].astype(np.uint64))]


# Each character's class for words() (pipeline/words.char_class), by code point: 255 until first met, then
# classified once per process by words.py's own patterns, so these words are words()'s by construction
_CLASS = np.full(0x110000, 255, np.uint8)
_CHUNK_CHARS = 250_000     # characters tokenized at once (bounds the temporary arrays, ~40 bytes a character: in cache)


def _classes(cp: np.ndarray) -> np.ndarray:
    k = _CLASS[cp]
    new = k == 255
    if new.any():
        u = np.unique(cp[new])
        _CLASS[u] = [char_class(chr(c)) for c in u.tolist()]
        k = _CLASS[cp]
    return k


def _powers(m: int, base: np.uint64 = _P) -> np.ndarray:
    """base ** i for i < m, wrapping mod 2**64."""
    p = np.full(max(m, 1), base, np.uint64)
    p[0] = 1
    return np.cumprod(p, dtype=np.uint64)


def _word_ids(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The words (pipeline/words.words) of every text as stable 64-bit ids, all texts' words in one array,
    and each text's number of words. Tokenized on code points in numpy, up to _CHUNK_CHARS at a time: the
    lowercased texts joined by a line break (no word character: no word spans two texts), each character's
    class (_classes); a word is a CJK character or a run of letters and digits. A
    word's id is a polynomial hash of its code points mixed with its length: the same in every process
    and on every machine (Python's own str hash is salted per process, PYTHONHASHSEED), so hashes made in
    different processes or runs can be compared."""
    low = [t.lower() for t in texts]
    sizes = np.fromiter(map(len, low), np.int64, len(low))
    chunk = (np.cumsum(sizes + 1) - 1) // _CHUNK_CHARS          # a text longer than that is a chunk of its own
    cuts = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), len(low)]
    parts = [_chunk_word_ids(low[a:b], sizes[a:b]) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    if not parts:
        return np.empty(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _chunk_word_ids(low: list[str], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cp = np.frombuffer("\n".join(low).encode("utf-32-le", "surrogatepass"), np.uint32)
    n = len(cp)
    if not n:
        return np.empty(0, np.uint64), np.zeros(len(low), np.int64)
    k = _classes(cp)
    run = k == 1
    single = k == 2
    start = single.copy()
    start[0] |= run[0]
    start[1:] |= run[1:] & ~run[:-1]
    end = single                               # a word's last character
    end[-1] |= run[-1]
    end[:-1] |= run[:-1] & ~run[1:]
    first, last = np.flatnonzero(start), np.flatnonzero(end)
    if not len(first):
        return np.empty(0, np.uint64), np.zeros(len(low), np.int64)
    # a word's hash sum((cp + 1) * _P ** j) over its characters j, from prefix sums of (cp + 1) * _P ** i over
    # the whole chunk (i: place in the chunk), cut at the word's ends and shifted back by _P ** -first
    pw, inv = _power_tables(n)
    s = np.cumsum((cp.astype(np.uint64) + np.uint64(1)) * pw[:n], dtype=np.uint64)
    before = np.where(first > 0, s[np.maximum(first - 1, 0)], np.uint64(0))
    h = (s[last] - before) * inv[first]
    ids = _mix(h ^ _mix((last - first + 1).astype(np.uint64)))
    text_start = np.r_[0, np.cumsum(sizes + 1)]  # each text's first character in the joined string, and the end
    per_text = np.diff(np.searchsorted(first, text_start))
    return ids, per_text


_POW: list[np.ndarray] = []   # [_P ** i, _P ** -i] for i below their length (mod 2**64), grown on demand


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    if not _POW or len(_POW[0]) < n:
        m = max(n, _CHUNK_CHARS + 1)
        _POW[:] = [_powers(m), _powers(m, np.uint64(pow(int(_P), -1, 2**64)))]
    return _POW[0], _POW[1]


def _word_id(word: str) -> int:
    """One word's id as _word_ids makes it (the reference the tests compare the vectorised one with)."""
    h = 0
    for i, c in enumerate(word):
        h = (h + (ord(c) + 1) * pow(int(_P), i, 2**64)) % 2**64
    return int(_mix(np.array([h ^ int(_mix(np.array([len(word)], np.uint64))[0])], np.uint64))[0])


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
    return texts_hashes([text], n)[0]


class Index:
    """One domain's rows' distinct n-grams as (hash, row) pairs sorted by hash, so that every step reads
    posting lists (the rows of each distinct n-gram) in a few vectorised passes: near-duplicate pairs,
    templates, and the share of each row's n-grams found in the rows of a split (coverage), where sorting
    a split's pool and searching it would sort again per step. Rows within a hash are in no set order
    (numpy's default sort, several times faster than a stable one on 64-bit keys)."""

    def __init__(self, hashes: Sequence[np.ndarray]):
        """From each row's distinct hashes (texts_hashes)."""
        sizes = np.fromiter(map(len, hashes), np.int64, len(hashes))
        H = np.concatenate(list(hashes)) if len(hashes) else np.empty(0, np.uint64)
        order = np.argsort(H)
        self._build(H[order], np.repeat(np.arange(len(hashes), dtype=np.int64), sizes)[order], len(hashes))

    @classmethod
    def from_pairs(cls, h: np.ndarray, row: np.ndarray, n_rows: int) -> "Index":
        """From texts_pairs's (hash, row) pairs, repeats included: sorted by hash then row, repeats dropped
        (the same as Index(texts_hashes(...)) without sorting each row first)."""
        order = _order_by_hash_then_row(h, row, n_rows)
        h, row = h[order], row[order]
        keep = np.r_[True, (h[1:] != h[:-1]) | (row[1:] != row[:-1])] if len(h) else np.zeros(0, bool)
        ix = cls.__new__(cls)
        ix._build(h[keep], row[keep], n_rows)
        return ix

    def _build(self, H: np.ndarray, R: np.ndarray, n_rows: int) -> None:
        self.n, self.H, self.R = n_rows, H, R
        self.sizes = np.bincount(R, minlength=n_rows)
        first = np.r_[True, self.H[1:] != self.H[:-1]] if len(H) else np.zeros(0, bool)
        self.starts = np.flatnonzero(first)                    # each distinct hash's first pair
        self.lengths = np.diff(np.r_[self.starts, len(H)])     # its number of rows
        self.group = np.cumsum(first) - 1                      # each pair's distinct hash

    def template_groups(self, tasks: Sequence[str]) -> np.ndarray:
        """Per distinct hash, whether it is a template (see templates)."""
        out = np.zeros(len(self.starts), bool)
        if not len(self.H):
            return out
        names, task_of_row = np.unique(np.asarray(list(tasks), dtype=object).astype(str), return_inverse=True)
        rows_in = np.bincount(task_of_row, minlength=len(names))
        big = self.lengths[self.group] > 2       # a template is in 3 or more rows: the rest need no count
        nt = len(names)
        # each row's hashes are distinct: pairs of one (hash, task) counted are rows counted
        key, counts = _unique_counts(self.group[big] * nt + task_of_row[self.R[big]])
        ok = counts > np.maximum(2, TEMPLATE_SHARE * rows_in[key % nt])
        out[key[ok] // nt] = True
        return out

    def covered(self, in_pool: np.ndarray, drop: Optional[np.ndarray] = None) -> np.ndarray:
        """Per row, the share of its n-grams (those whose group is not in `drop`) that some row of the
        pool (in_pool: a bool per row) has too: covered(rows' hashes, pool_of(pool rows' hashes)) for a row
        outside the pool. 0 for a row without n-grams."""
        t = in_pool[self.R]
        ok = None if drop is None else ~drop[self.group]
        if ok is not None:
            t &= ok
        has = np.logical_or.reduceat(t, self.starts) if len(t) else np.zeros(0, bool)
        hit = has[self.group]
        if ok is not None:
            hit &= ok
        return self._share(self.R, hit, ok)

    def covered_by(self, rows: np.ndarray, pools: Sequence[np.ndarray], drop: Optional[np.ndarray] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Per row (0 where rows is False), the share of its n-grams found in any of the sorted unique pools
        (other domains' train n-grams): over all of them, and over those whose group is not in `drop`."""
        sel = rows[self.R]
        H, R = self.H[sel], self.R[sel]
        hit = np.zeros(len(H), bool)
        for p in pools:
            hit |= _member(H, p)
        ok = np.ones(len(H), bool) if drop is None else ~drop[self.group[sel]]
        return self._share(R, hit, None), self._share(R, hit & ok, ok)

    def _share(self, R: np.ndarray, hit: np.ndarray, ok: Optional[np.ndarray]) -> np.ndarray:
        hits = np.bincount(R, weights=hit, minlength=self.n)
        sizes = np.bincount(R, minlength=self.n) if ok is None else np.bincount(R, weights=ok, minlength=self.n)
        return np.where(sizes > 0, hits / np.maximum(sizes, 1), 0.0)

    def pool(self, rows: np.ndarray) -> np.ndarray:
        """The distinct n-grams of these rows (a bool per row), sorted: pool_of their hashes."""
        t = rows[self.R]
        return self.H[self.starts][np.logical_or.reduceat(t, self.starts)] if len(t) else np.empty(0, np.uint64)


def near_duplicate_links(hashes: "Sequence[np.ndarray] | Index", max_df: int, share: float = PAIR_SHARE) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of rows that are near-duplicates: the n-grams they share, counting only those
    found in at most max_df rows, are at least `share` of the smaller row's n-grams (one row is mostly
    contained in the other: a repeated answer, a claim citing the same evidence)."""
    ix = hashes if isinstance(hashes, Index) else Index(hashes)
    H, R, starts, sizes = ix.H, ix.R, ix.starts, ix.sizes
    if len(H) < 2:
        return []
    lengths = ix.lengths
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
            ra, rb = rows[:, a].ravel(), rows[:, b].ravel()
            codes, counts = _unique_counts(np.minimum(ra, rb) * ix.n + np.maximum(ra, rb))
            part_codes.append(codes)
            part_counts.append(counts)
    if not part_codes:
        return []
    codes = np.concatenate(part_codes)
    order = np.argsort(codes)
    codes, w = codes[order], np.concatenate(part_counts)[order]
    firsts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    codes, counts = codes[firsts], np.add.reduceat(w, firsts)
    i, j = codes // ix.n, codes % ix.n
    ok = counts >= share * np.minimum(sizes[i], sizes[j])
    return list(zip(i[ok].tolist(), j[ok].tolist()))


def _unique_counts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(a, return_counts=True) by one sort (numpy's default sort is the fast one on 64-bit keys)."""
    if not len(a):
        return a, np.zeros(0, np.int64)
    a = np.sort(a)
    firsts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    return a[firsts], np.diff(np.r_[firsts, len(a)])


def _member(h: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    """h's elements found in sorted_pool (binary search: np.isin would sort the pool again per row)."""
    if not len(sorted_pool):
        return np.zeros(len(h), bool)
    i = np.minimum(np.searchsorted(sorted_pool, h), len(sorted_pool) - 1)
    return sorted_pool[i] == h


def covered(hashes: Sequence[np.ndarray], pool: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Per row, the share of its n-grams found in `pool` (a sorted unique array, or several: found in any of
    them, as in their union, without sorting the union); 0 for a row without any."""
    if not len(hashes):
        return np.zeros(0)
    sizes = np.fromiter(map(len, hashes), np.int64, len(hashes))
    if not sizes.sum():
        return np.zeros(len(hashes))
    flat = np.concatenate(list(hashes))
    hit = np.zeros(len(flat), bool)
    for p in ([pool] if isinstance(pool, np.ndarray) else pool):
        hit |= _member(flat, p)
    found = np.r_[0, np.cumsum(hit)]
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
# million rows of Climate-FEVER size) and tokenize in one process (~5 us a row)
MAX_ROWS = 200_000


TEMPLATE_SHARE = 0.1  # an n-gram in more than this share of one task's rows (and in 3 or more) is that task's template


def templates(hashes: Sequence[np.ndarray], tasks: Sequence[str]) -> np.ndarray:
    """The n-grams that are templates, sorted unique: found in more than TEMPLATE_SHARE of the rows of one
    task (source/task: every row of a task carries its prompt's and its answer format's n-grams), and in
    at least 3 of them. A sentence many rows quote (a Climate-FEVER evidence sentence in 3% of claims, a
    MedQuAD paragraph in a few answers) stays content."""
    ix = Index(hashes)
    return ix.H[ix.starts][ix.template_groups(tasks)]


def without(hashes: Sequence[np.ndarray], drop: np.ndarray) -> list[np.ndarray]:
    """Each row's n-grams minus `drop` (sorted unique)."""
    if not len(hashes) or not len(drop):
        return list(hashes)
    sizes = np.fromiter(map(len, hashes), np.int64, len(hashes))
    flat = np.concatenate(list(hashes))
    keep = ~_member(flat, drop)   # one binary search for all rows, then cut back into rows
    kc, ends = np.r_[0, np.cumsum(keep)], np.cumsum(sizes)
    return _cut(flat[keep], kc[ends] - kc[ends - sizes])


def _cut(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """flat cut into consecutive rows of these sizes (views; np.split was ~10 us a row)."""
    ends = np.cumsum(sizes).tolist()
    return [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]


def contamination(test: Sequence[np.ndarray], train: Sequence[np.ndarray] | np.ndarray, threshold: float = THRESHOLD) -> int:
    """How many test rows have at least `threshold` of their distinct n-grams somewhere in `train` (rows, or
    their pool_of already); templates included: the measure as published contamination checks count it.
    (prepare's table counts the same with Index.covered / covered_by.)"""
    pool = train if isinstance(train, np.ndarray) else pool_of(train)
    return int((covered(test, pool) >= threshold).sum()) if len(test) else 0
