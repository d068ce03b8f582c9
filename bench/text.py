"""English sentences from the Python documentation's reST sources (Debian package python3.11-doc),
with a fixed split: files whose sorted position is a multiple of 10 are held back ("held"), the
others calibrate ("calib"). Prose only: directives, code, tables and headings are dropped."""

from __future__ import annotations

import glob
import os
import re

SOURCES = "/usr/share/doc/python3.11/html/_sources"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MARKUP = re.compile(r":[a-z:]+:`([^`<]*)(?:<[^>]*>)?`|``([^`]*)``|\*\*?([^*]+)\*\*?|`([^`]*)`_*")


def _prose_paragraphs(text: str):
    paragraph: list[str] = []
    for line in text.splitlines() + [""]:
        plain = line.strip()
        if not plain or line.startswith((" ", "\t")) or plain.startswith(("..", ":", "=", "-", "*", "+", "|", ">>>")):
            if paragraph:
                yield " ".join(paragraph)
            paragraph = []
            continue
        paragraph.append(plain)


def sentences(split: str, *, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Every prose sentence of the split ("calib" or "held"), in a fixed order."""
    if split not in ("calib", "held"):
        raise ValueError(f"split must be calib or held, got {split!r}")
    files = sorted(glob.glob(os.path.join(SOURCES, "**", "*.txt"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no text under {SOURCES}: apt-get install python3.11-doc")
    out = []
    for index, path in enumerate(files):
        if (index % 10 == 0) != (split == "held"):
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            for paragraph in _prose_paragraphs(handle.read()):
                clean = _MARKUP.sub(lambda m: next(g for g in m.groups() if g is not None), paragraph)
                for sentence in _SENTENCE_END.split(clean):
                    if min_words <= len(sentence.split()) <= max_words and sentence[-1:] in ".!?":
                        out.append(sentence)
    return out
