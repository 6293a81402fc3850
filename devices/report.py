"""Fleet report: report.json (machine-readable) and report.html (a plain-language summary first, then
charts drawn with matplotlib as inline SVG, the gate's decisions, and the event log; no external assets).

Simulator side only: matplotlib is never needed on a device."""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summary_lines(report: dict) -> list[str]:
    """The report's opening, in plain language (pure: report in, sentences out)."""
    rounds = report.get("rounds") or []
    lines: list[str] = []
    if len(rounds) < 2:
        return [
            f"No global adapter was produced beyond the start (rounds completed: {report.get('rounds_completed', 0)} "
            f"of {report.get('rounds_requested', '?')}); see the events below."
        ]
    first, last = rounds[0], rounds[-1]
    by_dev0, by_dev1 = first.get("heldout_by_device") or {}, last.get("heldout_by_device") or {}
    changes = {d: by_dev1[d] / by_dev0[d] - 1 for d in by_dev0 if d in by_dev1 and by_dev0[d]}
    worse = sorted(d for d, c in changes.items() if c > 0)
    m0, m1 = _mean(by_dev0.values()), _mean(by_dev1.values())
    learned = m1 is not None and m0 is not None and m1 < m0
    lines.append(
        f"{'The fleet learned' if learned else 'The fleet did not learn'}: after {report.get('rounds_completed')} "
        f"round(s) the global adapter v{last['version']} has a held-out loss of {m1:.3f} against {m0:.3f} for the start "
        f"(v{first['version']}), {m1 / m0 - 1:+.1%} averaged over devices, each on its own data mix."
    )
    if changes:
        lines.append(
            ("Every device improved" if not worse else f"{len(worse)} of {len(changes)} device(s) got worse ({', '.join(worse)})")
            + ": "
            + ", ".join(f"{d} {c:+.1%}" for d, c in sorted(changes.items()))
            + "."
        )
    g0, g1 = first.get("general_loss"), last.get("general_loss")
    if g0 is not None and g1 is not None:
        ch = math.exp(g1 - g0) - 1
        lines.append(
            f"Forgetting: general-text perplexity {math.exp(g0):.1f} -> {math.exp(g1):.1f} ({ch:+.1%}; "
            f"{'within' if ch <= 0.05 else 'over'} the +5% the agents' gate allows for what they serve)."
        )
    devices = report.get("devices") or {}
    refused = {d: [g for g in v.get("gate_decisions", []) if not g.get("adopted")] for d, v in devices.items()}
    refused = {d: g for d, g in refused.items() if g}
    if refused:
        lines.append(
            "Refused by a device's gate (kept on the device for inspection): "
            + "; ".join(
                f"{d}: " + ", ".join(f"{g['candidate']} ({g['reason'].replace('_', ' ')})" for g in gs)
                for d, gs in sorted(refused.items())
            )
            + "."
        )
    else:
        lines.append("No device's gate refused a candidate: every device serves its newest adapter.")
    counts = report.get("coordinator_updates") or {}
    rejected = {k: v for k, v in counts.items() if k != "accepted" and v}
    lost = (
        "Nothing was lost: every update a device sent reached the coordinator."
        if report.get("nothing_lost")
        else "Some updates did not reach the coordinator: see the device table."
    )
    lines.append(
        lost
        + (
            f" The coordinator refused {sum(rejected.values())} update(s) ("
            + ", ".join(f"{k}: {v}" for k, v in rejected.items())
            + ")."
            if rejected
            else ""
        )
    )
    lat = report.get("inference_latency_ms") or {}
    if lat.get("answered") is not None:
        lines.append(
            f"Local inference kept answering during training: {lat['answered']} requests answered, {lat.get('failed', 0)} failed"
            + (f", median {lat['p50']:.0f} ms." if lat.get("p50") is not None else ".")
        )
    return lines


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def charts(report: dict) -> list[tuple[str, str]]:
    """(title, inline SVG) per chart, drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    rounds = report.get("rounds") or []
    out = []

    def lines(title, key, ylabel):
        series: dict[str, list] = {}
        for r in rounds:
            for name, v in (r.get(key) or {}).items():
                series.setdefault(name, []).append((r["version"], v))
        if not series:
            return
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for name, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("global adapter version")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.set_title(title)
        out.append((title, _svg(fig)))

    lines("Held-out loss per device (its own data mix)", "heldout_by_device", "loss (nats/token), lower is better")
    lines("Held-out loss per domain", "heldout_by_domain", "loss (nats/token), lower is better")
    gen = [(r["version"], math.exp(r["general_loss"])) for r in rounds if r.get("general_loss") is not None]
    if gen:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot([g[0] for g in gen], [g[1] for g in gen], marker="o", color="#9333ea")
        ax.axhline(gen[0][1] * 1.05, ls="--", color="#999", label="+5% over the start")
        ax.set_xlabel("global adapter version")
        ax.set_ylabel("perplexity")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax.set_title("General-text perplexity (forgetting)")
        out.append(("General-text perplexity (forgetting)", _svg(fig)))
    up = [(r["version"], r.get("bytes") or 0) for r in rounds if r.get("round") is not None]
    if up:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.bar([str(u[0]) for u in up], [u[1] for u in up], color="#2563eb")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.0f} kB"))
        ax.set_xlabel("global adapter version (the round that produced it)")
        ax.set_ylabel("bytes uploaded by devices")
        ax.set_title("Upload per round")
        out.append(("Upload per round", _svg(fig)))
    probes = [p for p in report.get("probes") or [] if p.get("latency_ms") is not None]
    if probes:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.plot([p.get("ts", i) for i, p in enumerate(probes)], [p["latency_ms"] for p in probes], ".", color="#16a34a")
        ax.set_xlabel("seconds since the fleet started")
        ax.set_ylabel("latency (ms)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8))
        ax.grid(alpha=0.3)
        ax.set_title("Local inference latency (8 tokens) while the fleet trains")
        out.append(("Local inference latency", _svg(fig)))
    return out


def _table(head: list[str], rows: list[list]) -> str:
    cell = lambda v: html.escape(f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v)))  # noqa: E731
    return (
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
        + "</table>"
    )


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """Write report.json and report.html into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    devices = report.get("devices") or {}
    rounds = report.get("rounds") or []
    dev_rows = [
        [
            d,
            v.get("global_version"),
            v.get("adapter"),
            (v.get("intake") or {}).get("train"),
            (v.get("intake") or {}).get("heldout"),
            v.get("updates_sent"),
            v.get("updates_counted"),
            v.get("restarts"),
        ]
        for d, v in sorted(devices.items())
    ]
    gate_rows = [
        [
            d,
            g.get("kind"),
            g.get("candidate"),
            "adopted" if g.get("adopted") else "refused",
            g.get("reason", "").replace("_", " "),
            (g.get("numbers") or {}).get("heldout_candidate"),
            (g.get("numbers") or {}).get("heldout_current"),
            (g.get("numbers") or {}).get("heldout_base"),
            None if (g.get("numbers") or {}).get("anchor_ppl_change") is None else f"{g['numbers']['anchor_ppl_change']:+.1%}",
        ]
        for d, v in sorted(devices.items())
        for g in v.get("gate_decisions", [])
    ]
    round_rows = [
        [r["version"], r.get("round"), r.get("num_updates"), r.get("num_examples"), r.get("heldout_mean")] for r in rounds
    ]
    chart_html = "".join(f'<figure aria-label="{html.escape(t)}">{svg}</figure>' for t, svg in charts(report))
    summary = "".join(f"<li>{html.escape(s)}</li>" for s in summary_lines(report))
    setup = (
        f"{report.get('devices_count')} devices, {report.get('rounds_requested')} {report.get('mode')} round(s) of "
        f"{report.get('strategy')}, model {report.get('model')}, {report.get('duration_s') or 0:.0f} s"
        + (", chaos: " + ", ".join(report["chaos"]) if report.get("chaos") else "")
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>edgefm fleet report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1250px;line-height:1.4}} table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} .charts{{display:flex;flex-wrap:wrap;gap:16px}}
figure{{margin:0}} figure svg{{width:560px;height:auto}} #summary li{{margin:0.3em 0}}</style></head><body>
<h1>edgefm fleet report</h1>
<section id="summary"><h2>Summary</h2><ul>{summary}</ul>
<p>Setup: {html.escape(setup)}.</p></section>
<section id="charts"><h2>Charts</h2><div class="charts">{chart_html}</div></section>
<h2>Devices</h2>{_table(["device", "global version", "serving adapter", "examples to train", "held out for its gate", "updates sent", "counted by the coordinator", "restarts"], dev_rows)}
<h2>Gate decisions per device</h2><p>Each candidate (a device's training result or a global adapter) is compared with what the device serves and with the base model on the device's held-out slice, and with the base model on general text.</p>
{_table(["device", "candidate kind", "candidate", "decision", "reason", "held-out loss", "serving adapter's", "base model's", "general-text ppl vs base"], gate_rows)}
<h2>Rounds</h2>{_table(["global version", "round", "updates", "examples", "mean held-out loss"], round_rows)}
<h2>Events</h2><pre>{html.escape(chr(10).join(report.get("events", [])))}</pre></body></html>"""
    (out / "report.html").write_text(page)
    return out / "report.json", out / "report.html"
