"""Fleet report: report.json (machine-readable) and report.html (inline SVG charts, no external assets)."""
from __future__ import annotations

import html
import json
from pathlib import Path

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"]


def svg_lines(title: str, series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str,
              width: int = 560, height: int = 260) -> str:
    """A small line chart as inline SVG (pure: data in, markup out)."""
    pts = [p for s in series.values() for p in s if p[1] is not None]
    if not pts:
        return f"<h3>{html.escape(title)}</h3><p>(no data)</p>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    L, R, T, B = 56, 130, 24, 36
    sx = lambda x: L + (x - x0) / (x1 - x0) * (width - L - R)  # noqa: E731
    sy = lambda y: height - B - (y - y0) / (y1 - y0) * (height - T - B)  # noqa: E731
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">',
             f'<text x="{L}" y="14" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="#999"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="#999"/>',
             f'<text x="{(L + width - R) / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="12" y="{(T + height - B) / 2}" transform="rotate(-90 12 {(T + height - B) / 2})" text-anchor="middle">{html.escape(ylabel)}</text>']
    for v in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{L - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for v in sorted({p[0] for p in pts}):
        parts.append(f'<text x="{sx(v):.1f}" y="{height - B + 14}" text-anchor="middle">{v:g}</text>')
    for i, (name, s) in enumerate(series.items()):
        c = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in s if y is not None]
        if len(good) > 1:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' +
                         " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good) + '"/>')
        for x, y in good:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>')
        parts.append(f'<text x="{width - R + 8}" y="{T + 14 * i + 8}" fill="{c}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """Write report.json and report.html into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    rounds = report.get("rounds", [])
    metric = report.get("metric", "held-out loss")
    per_domain: dict[str, list] = {}
    for r in rounds:
        for d, v in (r.get("heldout_by_domain") or {}).items():
            per_domain.setdefault(d, []).append((r["version"], v))
    per_device: dict[str, list] = {}
    for r in rounds:
        for d, v in (r.get("heldout_by_device") or {}).items():
            per_device.setdefault(d, []).append((r["version"], v))
    charts = [
        svg_lines(f"{metric} of the global adapter per domain", per_domain, xlabel="global version", ylabel=metric),
        svg_lines(f"{metric} per device (its own data mix)", per_device, xlabel="global version", ylabel=metric),
        svg_lines("bytes uploaded per round", {"all devices": [(r["version"], r.get("bytes", 0)) for r in rounds if r.get("round") is not None]},
                  xlabel="global version", ylabel="bytes"),
        svg_lines("participants per round", {"updates": [(r["version"], r.get("num_updates", 0)) for r in rounds if r.get("round") is not None]},
                  xlabel="global version", ylabel="updates"),
        svg_lines("inference latency through an agent's API", {"p50 ms": [(i, x.get("latency_ms")) for i, x in enumerate(report.get("probes", []))]},
                  xlabel="probe", ylabel="ms"),
    ]
    rows = "".join(f"<tr><td>{html.escape(str(d))}</td>" + "".join(f"<td>{html.escape(str(v.get(k, '')))}</td>" for k in
                   ("global_version", "adapter", "updates_sent", "updates_acknowledged", "updates_counted", "restarts")) + "</tr>"
                   for d, v in sorted(report.get("devices", {}).items()))
    summary = {k: report.get(k) for k in ("rounds_completed", "final_version", "mode", "strategy", "model", "duration_s", "chaos", "nothing_lost")}
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edgefm fleet report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px}}
.charts{{display:flex;flex-wrap:wrap;gap:16px}}</style></head><body>
<h1>edgefm fleet report</h1><pre>{html.escape(json.dumps(summary, indent=2))}</pre>
<h2>Devices</h2><table><tr><th>device</th><th>global version</th><th>serving adapter</th><th>updates sent</th><th>acknowledged</th><th>counted by coordinator</th><th>restarts</th></tr>{rows}</table>
<h2>Charts</h2><div class="charts">{''.join(f'<div>{c}</div>' for c in charts)}</div>
<h2>Events</h2><pre>{html.escape(chr(10).join(report.get('events', [])))}</pre></body></html>"""
    (out / "report.html").write_text(page)
    return out / "report.json", out / "report.html"
