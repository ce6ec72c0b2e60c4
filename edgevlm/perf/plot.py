"""A PNG of ``edgevlm bench`` rows, drawn with Pillow (already a dependency; no matplotlib).

One line per configuration: a stacked bar of what its time to first token is made of (image decode,
preprocess, tower, projector, prefill, and the rest: tokenisation, splicing), with a tick at the
compute bound of tower + prefill; then its per-token decode time with a tick at the bandwidth bound;
then its peak memory.
"""

from __future__ import annotations

from pathlib import Path

STAGE_COLOURS = {  # colour-blind-safe (Okabe-Ito)
    "decode_image": ("image decode", (230, 159, 0)),
    "preprocess": ("preprocess", (86, 180, 233)),
    "tower": ("tower", (0, 158, 115)),
    "projector": ("projector", (240, 228, 66)),
    "prefill": ("prefill", (0, 114, 178)),
    "other": ("other", (180, 180, 180)),
}
DECODE_COLOUR = (204, 121, 167)
BOUND_COLOUR = (0, 0, 0)


def _num(row: dict, key: str) -> float:
    try:
        v = float(row.get(key, ""))
    except (TypeError, ValueError):
        return 0.0
    return v if v == v else 0.0  # NaN -> 0


def draw_breakdown(rows: list[dict], path: str | Path, title: str) -> Path:
    """Draw ``rows`` (``edgevlm.perf.latency`` results) to ``path``; rows whose run failed are listed with
    their note instead of bars."""
    from PIL import Image, ImageDraw, ImageFont

    font, small, bold = (ImageFont.load_default(size=s) for s in (14, 12, 16))
    label_w, ttft_w, dec_w, mem_w, row_h, pad = 330, 560, 300, 110, 30, 16
    width = pad + label_w + ttft_w + 20 + dec_w + 20 + mem_w + pad
    height = 90 + row_h * max(len(rows), 1) + 80
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 12), title, fill="black", font=bold)
    x_ttft, x_dec = pad + label_w, pad + label_w + ttft_w + 20
    x_mem = x_dec + dec_w + 20
    d.text((x_ttft, 48), "time to first token (ms)", fill="black", font=font)
    d.text((x_dec, 48), "decode (ms / token)", fill="black", font=font)
    d.text((x_mem, 48), "peak RSS", fill="black", font=font)

    ok = [r for r in rows if not str(r.get("note", "")).startswith("failed")]
    ttft_max = max([max(_num(r, "ttft_ms"), _num(r, "prefill_ms")) for r in ok] + [1e-9]) * 1.15
    dec_max = max([_num(r, "decode_token_ms") for r in ok] + [1e-9]) * 1.3
    y = 76
    for r in rows:
        d.text((pad, y + 7), str(r.get("label", "?"))[:44], fill="black", font=font)
        if r not in ok:
            d.text((x_ttft, y + 7), str(r.get("note", ""))[:110], fill=(200, 0, 0), font=small)
            y += row_h
            continue
        scale, x = (ttft_w - 90) / ttft_max, float(x_ttft)
        parts = {k: _num(r, f"{k}_ms") for k in STAGE_COLOURS if k != "other"}
        ttft = _num(r, "ttft_ms")
        parts["other"] = max(ttft - sum(parts.values()), 0.0) if ttft else 0.0
        for key, ms in parts.items():
            if ms > 0:
                d.rectangle([x, y + 5, x + ms * scale, y + row_h - 5], fill=STAGE_COLOURS[key][1])
                x += ms * scale
        d.text((x + 6, y + 8), f"{ttft or sum(parts.values()):.0f}", fill="black", font=small)
        bound = _num(r, "prefill_bound_ms") + (_num(r, "tower_bound_ms") if ttft else 0.0)
        if bound:
            bx = x_ttft + bound * scale
            d.line([bx, y + 2, bx, y + row_h - 2], fill=BOUND_COLOUR, width=2)
        dec, dbound = _num(r, "decode_token_ms"), _num(r, "decode_bound_ms")
        dscale = (dec_w - 110) / dec_max
        d.rectangle([x_dec, y + 5, x_dec + dec * dscale, y + row_h - 5], fill=DECODE_COLOUR)
        if dbound:
            bx = x_dec + dbound * dscale
            d.line([bx, y + 2, bx, y + row_h - 2], fill=BOUND_COLOUR, width=2)
        d.text((x_dec + dec * dscale + 6, y + 8), f"{dec:.3g} (bound {dbound:.2g})", fill="black", font=small)
        mem = _num(r, "rss_peak_mb")
        cuda = _num(r, "cuda_peak_mb")
        d.text((x_mem, y + 8), f"{mem / 1024:.2f} GB" + (f" | GPU {cuda / 1024:.2f}" if cuda else ""),
               fill="black", font=small)
        y += row_h

    y += 14
    x = pad
    for name, colour in STAGE_COLOURS.values():
        d.rectangle([x, y + 2, x + 14, y + 16], fill=colour)
        d.text((x + 20, y + 2), name, fill="black", font=small)
        x += 40 + int(d.textlength(name, font=small))
    y += 24
    d.line([pad + 7, y + 1, pad + 7, y + 17], fill=BOUND_COLOUR, width=2)
    d.text((pad + 20, y + 2), "bound: tower + prefill FLOPs at the matmul peak; decode bytes at the read bandwidth "
           "(both measured here)", fill="black", font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


__all__ = ["draw_breakdown", "STAGE_COLOURS"]


def draw_grouped_bars(path: str | Path, title: str, subtitle: str,
                      groups: list[tuple[str, list[tuple[float, tuple[int, int, int], str]]]], top: float,
                      limit: float | None = None, limit_label: str = "", width: int = 1180) -> Path:
    """Horizontal grouped bars (``bench/serve.py``, ``bench/streams.py``): one row per group ``(label,
    bars)``, each bar ``(value, colour, text written after it)`` on a scale from 0 to ``top``; a dashed
    line at ``limit`` with ``limit_label`` under it."""
    from PIL import Image, ImageDraw, ImageFont

    font, bold = ImageFont.load_default(size=13), ImageFont.load_default(size=15)
    label_w, bar_w, bar_h, pad = 110, 400, 22, 16
    heights = [6 + bar_h * len(bars) + 6 for _, bars in groups]
    img = Image.new("RGB", (width, 62 + sum(heights) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), title, fill="black", font=bold)
    d.text((pad + label_w, 36), subtitle, fill="black", font=font)
    scale = bar_w / (top or 1.0)
    y = 60
    for (label, bars), h in zip(groups, heights):
        d.text((pad, y + h // 2 - 8), label, fill="black", font=font)
        for k, (v, colour, text) in enumerate(bars):
            yy = y + 4 + k * bar_h
            d.rectangle([pad + label_w, yy, pad + label_w + v * scale, yy + bar_h - 4], fill=colour)
            d.text((pad + label_w + v * scale + 6, yy + 2), text, fill="black", font=font)
        y += h
    if limit:
        x = pad + label_w + limit * scale
        for yy in range(56, y, 6):
            d.line([x, yy, x, yy + 3], fill="black", width=1)
        d.text((x - 60, y + 6), limit_label, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
