"""Documents from datasets whose rows are lines, not documents.

WikiText on the Hub has one row per line of the original articles, headings and blank lines
included: taken row by row, every heading is a "document" of its own and no document holds two
paragraphs, so BERT's next-sentence pairs never cross a paragraph. ``data.sample_by`` groups rows:

* ``paragraph``: consecutive non-blank rows, up to a blank row;
* ``article``: from one top-level WikiText heading (`` = Title = ``, not `` = = Section = = ``) to
  the next.

(``document`` and ``line`` keep the rows as they are. Local ``.txt`` files are split by
``datasets``' own text loader, which reads whole files, paragraphs or lines.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

GROUPINGS = ("paragraph", "article")
TOP_HEADING = re.compile(r"^ ?= [^=].* = ?$")  # " = Valkyria Chronicles III = "


def is_top_heading(line: str) -> bool:
    return bool(TOP_HEADING.match(line.strip("\n")))


def iter_groups(lines: Any, how: str) -> Iterator[str]:
    """Join ``lines`` (an iterable of strings) into documents, ``how`` = paragraph | article."""
    if how not in GROUPINGS:
        raise ValueError(f"unknown grouping {how!r}: use one of {GROUPINGS}")
    doc: list[str] = []

    def flush() -> Iterator[str]:
        text = "".join(line if line.endswith("\n") else line + "\n" for line in doc).strip("\n")
        if text.strip():
            yield text
        doc.clear()

    for line in lines:
        line = line or ""
        if how == "paragraph":
            if line.strip():
                doc.append(line)
            else:
                yield from flush()
        else:
            if is_top_heading(line):
                yield from flush()
            doc.append(line)
    yield from flush()


def group_rows(ds: datasets.Dataset, how: str, fingerprint: str) -> datasets.Dataset:
    """``ds`` (a ``text`` column, rows in order) with its rows joined into documents."""
    import datasets

    def lines() -> Iterator[str]:
        for batch in ds.iter(batch_size=10_000):
            yield from batch["text"]

    def gen() -> Iterator[dict[str, str]]:
        for text in iter_groups(lines(), how):
            yield {"text": text}

    features = datasets.Features({"text": datasets.Value("string")})
    return datasets.Dataset.from_generator(gen, features=features, fingerprint=f"{fingerprint}-{how}")
