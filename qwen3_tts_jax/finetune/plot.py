"""Loss curves of a fine-tuning run (OUTPUT/metrics.jsonl) as a PNG, with no plotting library.

    python -m qwen3_tts_jax.finetune.plot out/metrics.jsonl out/loss.png

Blue: the training loss per optimizer step; red: the eval loss after each epoch (at the step it
was measured). Axes: steps (x) and loss (y, the range of both curves); the title line of the
figure is not drawn (no fonts): the file name says what it is.
"""
from __future__ import annotations

import json
import struct
import sys
import zlib

import numpy as np

W, H, M = 640, 400, 30          # image size and margin (pixels)


def _png(rgb) -> bytes:
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _line(img, x0, y0, x1, y1, color):
    n = int(max(abs(x1 - x0), abs(y1 - y0), 1)) * 2
    xs = np.clip(np.round(np.linspace(x0, x1, n)).astype(int), 0, W - 1)
    ys = np.clip(np.round(np.linspace(y0, y1, n)).astype(int), 0, H - 1)
    for dx in (0, 1):
        img[ys, np.clip(xs + dx, 0, W - 1)] = color


def plot_metrics(jsonl: str, png: str) -> str:
    """Draw the curves of `jsonl` to `png`; returns png."""
    recs = [json.loads(x) for x in open(jsonl, encoding="utf-8") if x.strip()]
    train = [(r["step"], r["loss"]) for r in recs if r.get("event") == "step"]
    evals = [(r["step"], r["eval_loss"]) for r in recs if r.get("event") == "eval"]
    img = np.full((H, W, 3), 255, np.uint8)
    pts = train + evals
    if pts:
        xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        x_lo, x_hi = xs.min(), max(xs.max(), xs.min() + 1)
        y_lo, y_hi = ys.min(), max(ys.max(), ys.min() + 1e-6)

        def at(x, y):
            return (M + (x - x_lo) / (x_hi - x_lo) * (W - 2 * M),
                    H - M - (y - y_lo) / (y_hi - y_lo) * (H - 2 * M))
        _line(img, M, H - M, W - M, H - M, (0, 0, 0))
        _line(img, M, M, M, H - M, (0, 0, 0))
        for curve, color in ((train, (30, 90, 200)), (evals, (210, 40, 40))):
            p = [at(x, y) for x, y in curve]
            for (a, b), (c, d) in zip(p, p[1:]):
                _line(img, a, b, c, d, color)
            for a, b in p:
                img[max(int(b) - 2, 0):int(b) + 3, max(int(a) - 2, 0):int(a) + 3] = color
    with open(png, "wb") as f:
        f.write(_png(img))
    return png


if __name__ == "__main__":
    print(plot_metrics(sys.argv[1], sys.argv[2]))
