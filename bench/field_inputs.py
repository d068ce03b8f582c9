"""Inputs for the pretrained networks of bench/realworld.py, made here (nothing is downloaded):
text lines rendered with the DejaVu fonts, pages of them, synthetic scenes and face-like crops.

Every maker takes a NumPy generator and a count and returns float32 inputs preprocessed as the
network's own package does (PaddleOCR: RGB, (x/255 - 0.5)/0.5 for text lines, ImageNet mean/std
for pages; YOLOv8: x/255; MTCNN: NHWC, (x - 127.5)/128).
"""

from __future__ import annotations

import glob
import inspect
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/*.ttf", "/usr/share/fonts/**/*.ttf")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def fonts() -> list[str]:
    for pattern in FONT_GLOBS:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return found
    raise SystemExit("no TrueType fonts found: apt-get install -y fonts-dejavu-core")


def english_words() -> list[str]:
    """Words from the Python standard library's own docstrings: English text that every Python
    install carries, so the bench needs no corpus download."""
    import collections
    import json
    import os
    import textwrap
    import urllib.parse

    text = " ".join(inspect.getdoc(m) or "" for m in (os, json, textwrap, collections, urllib.parse, inspect))
    text += " ".join(inspect.getdoc(getattr(os, n)) or "" for n in dir(os) if not n.startswith("_"))
    return [w for w in re.findall(r"[A-Za-z0-9][A-Za-z0-9'.,:-]*", text) if len(w) < 16]


def _line_text(rng, words) -> str:
    text = " ".join(words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(2, 6))))
    if rng.random() < 0.3:
        text += f" {int(rng.integers(0, 100000))}"
    return text


def _text_line(rng, words, font_files, height: int, max_width: int | None = None,
               resample: int = Image.BILINEAR) -> Image.Image:
    """A line of 2 to 5 words (and a number, sometimes), dark on light, scaled to `height`. With
    `max_width`: words are dropped from its end until it fits (one word stays, squeezed if it must)."""
    text = _line_text(rng, words)
    font = ImageFont.truetype(font_files[int(rng.integers(len(font_files)))], int(rng.integers(22, 34)))
    back = tuple(int(v) for v in rng.integers(170, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    while True:
        left, top, right, bottom = font.getbbox(text)
        size = (right - left + 16, max(bottom - top + 12, 20))
        width = max(int(size[0] * height / size[1]), 8)
        if max_width is None or width <= max_width or " " not in text:
            break
        text = text.rsplit(" ", 1)[0]
    image = Image.new("RGB", size, back)
    ImageDraw.Draw(image).text((8 - left, 6 - top), text, font=font, fill=ink)
    return image.resize((width, height), resample)


def _chw_half(pixels: np.ndarray) -> np.ndarray:
    return ((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _resize_norm(line: Image.Image, width: int) -> np.ndarray:
    """PaddleOCR's (and RapidOCR's) resize-norm for text lines: keep the aspect ratio (squeeze a
    line wider than `width`), (x/255 - 0.5)/0.5, CHW, then pad on the right with zeros: the
    normalized mid-grey, not black."""
    if line.width > width:
        line = line.resize((width, line.height), Image.BILINEAR)
    out = np.zeros((3, line.height, width), np.float32)
    out[:, :, : line.width] = _chw_half(np.asarray(line, np.float32))
    return out


def text_lines(rng, n: int, *, height: int = 48, width: int = 320, rotate_half: bool = False,
               fit: bool = False, resample: int = Image.BILINEAR) -> np.ndarray:
    """PP-OCR orientation-classifier inputs (with rotate_half, half are upside down; a long line is
    squeezed to `width`, as the classifier's package does). With `fit`, recogniser inputs: lines
    that fit `width` unsqueezed, as RapidOCR feeds its recogniser (it widens a batch to its longest
    line; squeezed 1.5x or more, PP-OCRv4's recogniser reads half the lines unlike its own reading
    at full width)."""
    words, font_files = english_words(), fonts()
    out = np.empty((n, 3, height, width), np.float32)
    for i in range(n):
        line = _text_line(rng, words, font_files, height, width if fit else None, resample)
        if rotate_half and rng.random() < 0.5:
            line = line.rotate(180)
        out[i] = _resize_norm(line, width)
    return out


def reading_lines(rng, n: int, *, height: int = 48, width: int = 320, resample: int = Image.BILINEAR) -> np.ndarray:
    """Text-recogniser inputs: text_lines that fit `width` unsqueezed (`resample`: the filter that
    scales a rendered line to `height`)."""
    return text_lines(rng, n, height=height, width=width, fit=True, resample=resample)


def text_pages(rng, n: int, *, height: int = 320, width: int = 480, pixels: bool = False) -> np.ndarray:
    """PP-OCR detector inputs: several text lines at random places on a light background (with
    `pixels`: as 0-255 values, the way ddddocr's detector takes them)."""
    words, font_files = english_words(), fonts()
    out = np.empty((n, 3, height, width), np.float32)
    for i in range(n):
        page = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
        for _ in range(int(rng.integers(3, 8))):
            line = _text_line(rng, words, font_files, int(rng.integers(16, 40)))
            page.paste(line, (int(rng.integers(0, width // 2)), int(rng.integers(0, height - line.height))))
        values = np.asarray(page, np.float32)
        out[i] = (values if pixels else (values / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def turned_pages(rng, n: int, *, size: int = 224) -> np.ndarray:
    """Document-orientation inputs: square text pages turned by 0, 90, 180 or 270 degrees."""
    pages = text_pages(rng, n, height=size, width=size)
    turns = rng.integers(0, 4, n)
    return np.ascontiguousarray(np.stack([np.rot90(page, int(k), axes=(1, 2)) for page, k in zip(pages, turns)]))


def gray_lines(rng, n: int, *, height: int = 64, width: int = 256) -> np.ndarray:
    """ddddocr's recogniser inputs: text lines in grey, (pixel / 255 - 0.5) / 0.5, (n, 1, height, width)."""
    return reading_lines(rng, n, height=height, width=width).mean(1, keepdims=True)


def _scene(rng, size: int) -> Image.Image:
    """Random rectangles, ellipses and skin-toned figures on a gradient: a stand-in photo."""
    base = rng.integers(40, 220, 3)
    ramp = np.linspace(0.7, 1.3, size)[:, None, None]
    pixels = np.clip(np.broadcast_to(base, (size, size, 3)) * ramp, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 20, 2))
        w, h = (int(v) for v in rng.integers(16, size // 2, 2))
        skin = rng.random() < 0.5
        colour = (int(rng.integers(170, 240)), int(rng.integers(120, 180)), int(rng.integers(90, 150))) if skin \
            else tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    return image


def scenes(rng, n: int, *, size: int = 320) -> np.ndarray:
    """YOLOv8 inputs: RGB / 255, NCHW."""
    return np.stack([np.asarray(_scene(rng, size), np.float32).transpose(2, 0, 1) / 255.0 for _ in range(n)])


def _slider_captcha(rng, size: int) -> Image.Image:
    """A slider captcha: a scene at 2:1 with a darkened puzzle-piece gap (a square with a knob,
    outlined), letterboxed to a square with grey (114) as YOLOv8 pre-processing pads."""
    width, height = size, size // 2
    scene = _scene(rng, size).resize((width, height))
    piece = int(rng.integers(height // 4, height // 3))
    x0, y0 = int(rng.integers(width // 3, width - piece - 20)), int(rng.integers(10, height - piece - 10))
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    draw.rectangle((x0, y0, x0 + piece, y0 + piece), fill=255)
    knob = piece // 3
    draw.ellipse((x0 + (piece - knob) // 2, y0 - knob // 2, x0 + (piece + knob) // 2, y0 + knob // 2), fill=255)
    scene = Image.composite(Image.eval(scene, lambda v: int(v * 0.45)), scene, mask)
    ImageDraw.Draw(scene).rectangle((x0, y0, x0 + piece, y0 + piece), outline=(235, 235, 235), width=2)
    canvas = Image.new("RGB", (size, size), (114, 114, 114))
    canvas.paste(scene, (0, (size - height) // 2))
    return canvas


def slider_captchas(rng, n: int, *, size: int = 640) -> np.ndarray:
    """captcha-recognizer's YOLOv8-seg inputs: RGB / 255, NCHW."""
    return np.stack([np.asarray(_slider_captcha(rng, size), np.float32).transpose(2, 0, 1) / 255.0 for _ in range(n)])


CAPTCHA_CHARACTERS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _text_captcha(rng, font_files, width: int, height: int) -> Image.Image:
    """4 to 6 capitals and digits, each in its own font, size and tilt, on a light ground crossed by
    lines and speckled, as image captchas are."""
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        ends = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(ends, fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
    x = int(rng.integers(4, 16))
    for _ in range(int(rng.integers(4, 7))):
        font = ImageFont.truetype(font_files[int(rng.integers(len(font_files)))], int(rng.integers(26, 36)))
        glyph = Image.new("L", (40, 50), 0)
        ImageDraw.Draw(glyph).text((4, 2), str(rng.choice(list(CAPTCHA_CHARACTERS))), font=font, fill=255)
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
        ink = Image.new("RGB", glyph.size, tuple(int(v) for v in rng.integers(0, 140, 3)))
        image.paste(ink, (x, int(rng.integers(0, max(1, height - 48)))), glyph)
        x += int(rng.integers(18, 26))
    for _ in range(200):
        draw.point((int(rng.integers(0, width)), int(rng.integers(0, height))),
                   fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def text_captchas(rng, n: int, *, height: int = 60, width: int = 160) -> np.ndarray:
    """captcha-whisperer's CRNN inputs: BGR pixels 0-255 (as OpenCV reads them), NCHW, no scaling."""
    font_files = [f for f in fonts() if "Bold" in f] or fonts()
    rgb = [np.asarray(_text_captcha(rng, font_files, width, height), np.float32) for _ in range(n)]
    return np.stack([pixels[:, :, ::-1].transpose(2, 0, 1) for pixels in rgb]).copy()


def _face(rng, size: int) -> Image.Image:
    """A face-like crop (skin ellipse, eyes, mouth) half the time, else a piece of a scene."""
    if rng.random() < 0.5:
        return _scene(rng, size * 3).crop((0, 0, size * 3, size * 3)).resize((size, size))
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    m = size * float(rng.uniform(0.05, 0.2))
    skin = (int(rng.integers(150, 240)), int(rng.integers(100, 180)), int(rng.integers(70, 150)))
    draw.ellipse((m, m * 0.6, size - m, size - m * 0.6), fill=skin)
    eye = size * 0.08
    for cx in (0.35, 0.65):
        draw.ellipse((size * cx - eye, size * 0.4 - eye, size * cx + eye, size * 0.4 + eye), fill=(30, 30, 30))
    draw.line((size * 0.38, size * 0.72, size * 0.62, size * 0.72), fill=(120, 40, 40), width=max(1, size // 16))
    return image


def faces(rng, n: int, *, size: int) -> np.ndarray:
    """MTCNN inputs: NHWC, (x - 127.5) / 128."""
    return np.stack([(np.asarray(_face(rng, size), np.float32) - 127.5) / 128.0 for _ in range(n)])


def _vowel(rng, t: np.ndarray) -> np.ndarray:
    """A voiced sound: harmonics of a pitch between 90 and 250 Hz, shaped by three formants."""
    f0 = rng.uniform(90, 250)
    formants = rng.uniform([500, 1000, 2200], [900, 1800, 3000])
    harmonics = f0 * np.arange(1, int(4000 / f0))
    gain = np.exp(-(((harmonics[:, None] - formants[None]) / 120) ** 2)).sum(1) + 0.05
    phases = rng.uniform(0, 2 * np.pi, len(harmonics))
    sound = ((gain / np.sqrt(np.arange(1, len(harmonics) + 1)))[:, None]
             * np.sin(2 * np.pi * harmonics[:, None] * t[None] + phases[:, None])).sum(0)
    return sound * rng.uniform(0.05, 0.3) / np.abs(sound).max()


def audio_chunks(rng, n: int, *, length: int = 576, rate: int = 16000) -> np.ndarray:
    """(n, length) float32 chunks at `rate` Hz: half voiced (vowel-like), half noise of varied level,
    all with a little noise: a voice-activity model's probabilities spread over 0.01 to 0.85."""
    t = np.arange(length) / rate
    chunks = [_vowel(rng, t) if rng.uniform() < 0.5 else rng.normal(0, rng.uniform(0.001, 0.02), length)
              for _ in range(n)]
    return (np.stack(chunks) + rng.normal(0, 0.002, (n, length))).astype(np.float32)


def mel_streams(rng, n: int, *, frames: int = 300, bands: int = 160) -> np.ndarray:
    """An echo-quality model's inputs (AECMOS): three log-mel streams (far end, microphone, enhanced)
    as (db + 40) / 40, (n, 3, frames, bands): a slowly wandering spectral envelope per stream over
    a per-band level, with a little noise."""
    drift = rng.normal(-0.5, 0.3, (n, 1, frames, bands)).cumsum(2) * 0.02
    level = rng.uniform(-1.0, 0.5, (n, 3, 1, bands))
    return np.clip(drift + level + rng.normal(0, 0.05, (n, 3, frames, bands)), -1.5, 1.0).astype(np.float32)
