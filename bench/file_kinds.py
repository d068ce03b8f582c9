"""Files of many kinds, made here from a seed, as Magika (Google's file-type detector) sees them:
the first and last 1,024 bytes of each, whitespace stripped, padded with token 256 (its feature
extraction v2, as magika 1.0.3 documents it). Text comes from the Python documentation's sources
(python3.11-doc) and the standard library's own modules; images, archives, audio, databases and
serialized arrays are written with the standard library, NumPy and Pillow."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import pickle
import sqlite3
import sys
import tarfile
import tempfile
import wave
import zipfile
from collections.abc import Callable

import numpy as np

from bench import field_inputs
from bench.text import SOURCES

BEG, END, PAD, BLOCK = 1024, 1024, 256, 4096


def features(content: bytes) -> np.ndarray:
    """Magika's model input for a file's bytes: (2048,) int32."""
    head, tail = content[:BLOCK], content[-BLOCK:]
    if len(content) <= BLOCK:
        head, tail = head.strip(), tail.strip()
    else:
        head, tail = head.lstrip(), tail.rstrip()
    beg = list(head[:BEG]) + [PAD] * max(0, BEG - len(head))
    end = [PAD] * max(0, END - len(tail)) + list(tail[-END:])
    return np.array(beg + end, np.int32)


def _words(rng, n: int) -> str:
    words = field_inputs.english_words()
    return " ".join(words[int(i)] for i in rng.integers(0, len(words), n))


def _doc_source(rng) -> bytes:
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(SOURCES) for f in fs if f.endswith(".txt"))
    with open(files[int(rng.integers(len(files)))], "rb") as handle:
        return handle.read()


def _stdlib_module(rng) -> bytes:
    folder = os.path.dirname(os.__file__)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    with open(os.path.join(folder, files[int(rng.integers(len(files)))]), "rb") as handle:
        return handle.read()


def _record(rng) -> dict:
    return {"id": int(rng.integers(1e6)), "name": _words(rng, 2), "score": float(rng.random()),
            "tags": _words(rng, int(rng.integers(1, 5))).split(), "active": bool(rng.random() < 0.5)}


def _json(rng) -> bytes:
    return json.dumps([_record(rng) for _ in range(int(rng.integers(1, 60)))], indent=int(rng.integers(0, 4))
                      ).encode()


def _csv(rng) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "name", "score", "count"])
    for _ in range(int(rng.integers(5, 200))):
        writer.writerow([int(rng.integers(1e6)), _words(rng, 2), f"{rng.random():.4f}", int(rng.integers(100))])
    return out.getvalue().encode()


def _html(rng) -> bytes:
    body = "".join(f"<p>{_words(rng, int(rng.integers(5, 40)))}</p>\n" for _ in range(int(rng.integers(1, 30))))
    return (f"<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>{_words(rng, 3)}</title></head>\n"
            f"<body>\n<h1>{_words(rng, 4)}</h1>\n{body}</body>\n</html>\n").encode()


def _xml(rng) -> bytes:
    items = "".join(f'  <item id="{int(rng.integers(1e4))}">{_words(rng, 3)}</item>\n'
                    for _ in range(int(rng.integers(1, 80))))
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<catalog>\n{items}</catalog>\n'.encode()


def _markdown(rng) -> bytes:
    parts = [f"# {_words(rng, 3)}\n"]
    for _ in range(int(rng.integers(1, 12))):
        parts.append(f"## {_words(rng, 2)}\n\n{_words(rng, int(rng.integers(10, 60)))}\n\n- {_words(rng, 4)}\n"
                     f"- {_words(rng, 5)}\n")
    return "\n".join(parts).encode()


def _shell(rng) -> bytes:
    lines = ["#!/bin/sh", "set -eu"]
    for _ in range(int(rng.integers(3, 40))):
        word = _words(rng, 1)
        lines.append(rng.choice([f'echo "{_words(rng, 4)}"', f"mkdir -p /tmp/{word}", f"cd /tmp/{word}",
                                 f'if [ -f "{word}.txt" ]; then rm "{word}.txt"; fi', f"export {word.upper()}=1"]))
    return ("\n".join(lines) + "\n").encode()


def _ini(rng) -> bytes:
    sections = [f"[{_words(rng, 1)}]\n" + "".join(f"{_words(rng, 1)} = {int(rng.integers(1000))}\n"
                                                  for _ in range(int(rng.integers(1, 8))))
                for _ in range(int(rng.integers(1, 6)))]
    return "\n".join(sections).encode()


def _yaml(rng) -> bytes:
    lines = [f"{_words(rng, 1)}:\n" + "".join(f"  - name: {_words(rng, 2)}\n    value: {int(rng.integers(100))}\n"
                                              for _ in range(int(rng.integers(1, 6))))
             for _ in range(int(rng.integers(1, 8)))]
    return "".join(lines).encode()


def _image(kind: str) -> Callable:
    def make(rng) -> bytes:
        size = int(rng.integers(64, 256))
        out = io.BytesIO()
        field_inputs._scene(rng, size).save(out, format=kind)
        return out.getvalue()
    return make


def _compressed(opener: Callable[[bytes], bytes]) -> Callable:
    return lambda rng: opener(_doc_source(rng))


def _zip(rng) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(int(rng.integers(1, 5))):
            archive.writestr(f"doc{i}.txt", _doc_source(rng))
    return out.getvalue()


def _tar(rng) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for i in range(int(rng.integers(1, 4))):
            data = _doc_source(rng)
            info = tarfile.TarInfo(f"doc{i}.txt")
            info.size, info.mtime = len(data), 0
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _wav(rng) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as sound:
        sound.setnchannels(1)
        sound.setsampwidth(2)
        sound.setframerate(16000)
        samples = field_inputs.audio_chunks(rng, 1, length=int(rng.integers(4000, 32000)))[0]
        sound.writeframes((np.clip(samples, -1, 1) * 32000).astype("<i2").tobytes())
    return out.getvalue()


def _npy(rng) -> bytes:
    out = io.BytesIO()
    np.save(out, rng.standard_normal(tuple(int(d) for d in rng.integers(2, 40, int(rng.integers(1, 4))))))
    return out.getvalue()


def _pickle(rng) -> bytes:
    return pickle.dumps([_record(rng) for _ in range(int(rng.integers(1, 40)))])


def _sqlite(rng) -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "db.sqlite")
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE items (id INTEGER, name TEXT, score REAL)")
            db.executemany("INSERT INTO items VALUES (?, ?, ?)",
                           [(int(rng.integers(1e6)), _words(rng, 2), float(rng.random()))
                            for _ in range(int(rng.integers(5, 300)))])
        with open(path, "rb") as handle:
            return handle.read()


def _executable(rng) -> bytes:
    with open(sys.executable, "rb") as handle:  # the Python interpreter: ELF on Linux
        return handle.read()


KINDS: dict[str, Callable[[np.random.Generator], bytes]] = {
    "rst": _doc_source, "python": _stdlib_module, "json": _json, "csv": _csv, "html": _html, "xml": _xml,
    "markdown": _markdown, "shell": _shell, "ini": _ini, "yaml": _yaml,
    "png": _image("PNG"), "jpeg": _image("JPEG"), "gif": _image("GIF"), "bmp": _image("BMP"),
    "tiff": _image("TIFF"), "webp": _image("WEBP"), "pdf": _image("PDF"),
    "gzip": _compressed(gzip.compress), "bzip": _compressed(bz2.compress), "xz": _compressed(lzma.compress),
    "zip": _zip, "tar": _tar, "wav": _wav, "npy": _npy, "pickle": _pickle, "sqlite": _sqlite, "elf": _executable,
}


def file_features(rng, n: int) -> np.ndarray:
    """Magika's inputs for `n` files of kinds drawn evenly from KINDS: (n, 2048) int32."""
    names = sorted(KINDS)
    return np.stack([features(KINDS[names[int(rng.integers(len(names)))]](rng)) for _ in range(n)])
