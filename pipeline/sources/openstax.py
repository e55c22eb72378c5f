"""OpenStax textbooks in three forms, all under <raw_dir>/openstax/:

- TXT books (*.txt): cut into chunks of about txt_chunk_chars on paragraph boundaries; record = chunk.
- Hugging Face Parquet (crumb/openstax-text: a 'text' column, optional title/book/chapter); record = row.
- CNXML repos (openstax/osbooks-*): modules/<id>/index.cnxml, with collections/*.collection.xml giving
  the book title; record = module. Text keeps section titles (as their own lines) and drops markup,
  figures, captions and footnotes.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from .base import (FREE_TEXT, DownloadPart, Opts, Quarantine, Raw, Reject, SourceSpec, clean, corpus_row, iter_lines, iter_parquet, local, meta,
                   inside, parse_xml, read_xml_root, stable_id, EMPTY_TEXT, TOO_DEEP)

NAME, DOMAIN = "openstax", "education"
SKIP = {"figure", "media", "image", "caption", "footnote", "metadata", "note-title"}
_CHAPTER = re.compile(r"^(chapter|unit|part)\s+\d+", re.I)


# ---- CNXML ----
def _text(el) -> str:
    """Text of an element without markup, skipping figures, captions and footnotes."""
    parts = [el.text or ""]
    for ch in el:
        if local(ch.tag) not in SKIP:
            parts.append(_text(ch))
        parts.append(ch.tail or "")
    return "".join(parts)


def _blocks(el, out: list[tuple[str, str]], depth: int = 0) -> None:
    """Flatten content into (kind, text) blocks: ('title', ...), ('para', ...)."""
    for ch in el:
        tag = local(ch.tag)
        if tag in SKIP:
            continue
        if tag == "section":
            t = ch.find("{*}title")
            if t is not None and clean(_text(t)):
                out.append(("title", clean(_text(t))))
            _blocks(ch, out, depth + 1)
        elif tag == "title":
            continue  # handled by the section
        elif tag == "list":
            items = [clean(_text(i)) for i in ch if local(i.tag) == "item"]
            out.append(("para", "\n".join(f"- {i}" for i in items if i)))
        elif tag in ("para", "equation", "quote", "preformat", "code", "definition", "example", "exercise", "note"):
            if tag in ("example", "exercise", "note") and len(ch):
                _blocks(ch, out, depth + 1)
            else:
                txt = clean(_text(ch))
                if txt:
                    out.append(("para", txt))
        else:
            _blocks(ch, out, depth + 1)


@functools.lru_cache(maxsize=64)
def _book_titles(repo: str) -> dict[str, str]:
    """module id -> book title, from the repo's collections/*.collection.xml."""
    out: dict[str, str] = {}
    for coll in sorted(Path(repo).glob("collections/*.collection.xml")):
        if not inside(coll, repo) or coll.stat().st_size > 64 << 20:  # a link out of the repo, or not a collection
            continue
        root, q = parse_xml(coll.read_bytes(), coll.name, NAME)
        if q:
            continue
        title = ""
        for el in root.iter():
            if local(el.tag) == "title":
                title = clean(el.text)
                break
        for el in root.iter():
            if local(el.tag) == "module" and el.get("document"):
                out[el.get("document")] = title
    return out


def _read_cnxml(path: Path, rel: str, opts: Opts):
    root, q = read_xml_root(path, rel, NAME, opts, ("document",))
    if q:
        yield q
        return
    content = root.find("{*}content")
    title_el = root.find("{*}title")
    module = path.parent.name
    blocks: list[tuple[str, str]] = []
    terms = []
    try:  # _blocks and _text recurse into the markup: a module nested thousands deep is quarantined
        if content is not None:
            _blocks(content, blocks)
            for para in content.iter():
                if local(para.tag) == "para":
                    for t in para.iter():
                        if local(t.tag) == "term" and clean(_text(t)):
                            terms.append((clean(_text(t)), clean(_text(para))))
    except RecursionError:
        yield Quarantine(NAME, rel, f"module {path.parent.name}", TOO_DEEP, "markup nested too deep to read")
        return
    repo = path.parents[2]
    yield Raw(NAME, rel, f"module {module}", {
        "kind": "cnxml", "module": module, "title": clean(_text(title_el)) if title_el is not None else module,
        "book": _book_titles(str(repo)).get(module) or repo.name.replace("osbooks-", "").replace("-", " ").title(),
        "blocks": blocks, "terms": terms})


# ---- TXT ----
def _read_txt(path: Path, rel: str, opts: Opts):
    book = ""
    chapter = ""
    paras: list[str] = []
    cur: list[str] = []
    size = 0
    start_line = 1
    n_chunk = 0

    def flush_para():
        nonlocal cur, size
        if cur:
            p = " ".join(cur)
            paras.append(p)
            size += len(p)
            cur = []

    def chunk(end_line):
        nonlocal paras, size, n_chunk, start_line
        r = Raw(NAME, rel, f"lines {start_line}-{end_line}", {"kind": "txt", "book": book, "chapter": chapter,
                                                              "text": "\n\n".join(paras), "chunk": n_chunk})
        paras, size = [], 0
        n_chunk += 1
        start_line = end_line + 1
        return r

    last = 0
    for n, line, q in iter_lines(path, rel, NAME, opts):
        if q is not None:
            yield q
            continue
        last = n
        s = line.strip()
        if not book:
            book = s
            start_line = n + 1
            continue
        if _CHAPTER.match(s) and len(s) < 120:
            flush_para()
            if paras:
                yield chunk(n - 1)
            chapter = s
            start_line = n + 1
            continue
        cur.append(s)
        # iter_lines skips blank lines, so a paragraph ends where a line ends a sentence
        if s.endswith((".", "?", "!", ":", '"', "\u201d")):
            flush_para()
            if size >= opts.txt_chunk_chars:
                yield chunk(n)
    flush_para()
    if paras:
        yield chunk(last)


def read(path, rel, opts: Opts):
    if path.name == "index.cnxml":
        yield from _read_cnxml(path, rel, opts)
    elif path.suffix == ".txt":
        yield from _read_txt(path, rel, opts)
    elif path.suffix == ".parquet":
        for r in iter_parquet(path, rel, NAME):
            if isinstance(r, Raw):
                r.data = {"kind": "parquet", **r.data}
            yield r
    # collections/*.collection.xml: read through _book_titles; checksummed, no records


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    if d["kind"] == "cnxml":
        lines = [(f"## {t}" if k == "title" else t) for k, t in d["blocks"]]
        text = "\n".join(lines)
        if not any(k == "para" for k, _ in d["blocks"]):
            raise Reject(EMPTY_TEXT, d["title"])
        sections = []
        cur = None
        for k, t in d["blocks"]:
            if k == "title":
                cur = {"title": t, "text": []}
                sections.append(cur)
            elif cur is not None:
                cur["text"].append(t)
        md = {"book": d["book"], "module": d["module"],
              "sections": [{"title": s["title"], "text": "\n".join(s["text"])} for s in sections],
              "terms": d["terms"][:8],
              "intro": "\n".join(t for k, t in d["blocks"] if k == "para")[:4000]}
        return corpus_row(NAME, DOMAIN, stable_id(NAME, raw.file), d["title"], f"# {d['title']}\n{text}", md,
                          SOURCE.license, "https://openstax.org", group="module:" + raw.file, opts=opts)
    if d["kind"] == "txt":
        text = d["text"]
        title = d["chapter"] or d["book"]
        return corpus_row(NAME, DOMAIN, stable_id(NAME, raw.file, d["chunk"]), title, text,
                          {"book": d["book"], "chapter": d["chapter"]}, SOURCE.license, "https://openstax.org",
                          group=f"book:{raw.file}:{d['chapter']}", opts=opts)
    text = clean(d.get("text"))
    if not text:
        raise Reject(EMPTY_TEXT, raw.location)
    title = clean(d.get("title") or d.get("chapter") or d.get("book"))
    return corpus_row(NAME, DOMAIN, stable_id(NAME, raw.file, raw.location), title or text[:80], d.get("text").strip(),
                      {"book": clean(d.get("book")), "chapter": clean(d.get("chapter"))}, SOURCE.license,
                      "https://huggingface.co/datasets/crumb/openstax-text", group=f"row:{raw.file}:{title or raw.location}", opts=opts)


_SENT = re.compile(r"(?<=[.!?])\s+")


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    book = m.get("book") or "an introductory"
    out = []
    seen = set()
    for term, para in m.get("terms") or []:
        if term.lower() in seen or len(para) < 60:
            continue
        seen.add(term.lower())
        out.append({"task": "explain_concept",
                    "prompt": f"Explain the concept of \"{term}\" the way the textbook {book} does, for a first-year student.",
                    "response": para})
        if len(seen) >= 2:
            break
    for s in (m.get("sections") or [])[:3]:
        if s["title"].lower() == "learning objectives" or len(s["text"]) < 60:
            continue
        out.append({"task": "write_section",
                    "prompt": f"Write the textbook section \"{s['title']}\" for the chapter \"{row['title']}\" of {book}.",
                    "response": s["text"]})
    if not out:  # TXT chunks and Parquet rows: continue the passage from its opening
        sents = _SENT.split(row["text"])
        k = max(1, min(2, len(sents) // 4))
        head, rest = " ".join(sents[:k]), " ".join(sents[k:])
        if rest:
            out.append({"task": "continue_textbook",
                        "prompt": f"Continue this passage from the textbook {book}"
                                  + (f" ({row['title']})" if row.get("title") and row["title"] != book else "") + f":\n\n{head}",
                        "response": rest})
    return out


SOURCE = SourceSpec(NAME, DOMAIN, "openstax", ("**/*.txt", "**/*.parquet", "**/modules/*/index.cnxml", "**/collections/*.collection.xml"),
                read, normalize, build_sft,
                license="CC BY 4.0 / CC BY-NC-SA 4.0 (per book; see each LICENSE)", url="https://openstax.org",
                parts=(DownloadPart("openstax/crumb__openstax-text", "hf", "crumb/openstax-text"),
                       DownloadPart("openstax/osbooks-introduction-philosophy", "git",
                                    "https://github.com/openstax/osbooks-introduction-philosophy.git")),
                how_to_get="adapters download (Hugging Face crumb/openstax-text or git clone openstax/osbooks-*), or put TXT books, "
                           "Parquet or osbooks repos under <raw_dir>/openstax/",
                tasks={"explain_concept": FREE_TEXT, "write_section": FREE_TEXT, "continue_textbook": FREE_TEXT})
