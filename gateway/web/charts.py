"""The usage chart: per-day charge stacked by model as inline SVG (no library, no script), with a table beside it."""

from __future__ import annotations

from typing import Any

from .render import esc, money

__all__ = ["daily_chart"]

_PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563")
_HEIGHT = 120
_BAR_W = 18
_GAP = 6


def daily_chart(totals: list[dict[str, Any]], currency: str) -> str:
    if not totals:
        return '<p id="no-chart">No usage in this period.</p>'
    days = sorted({str(t["day"]) for t in totals})
    models = sorted({str(t["model"]) for t in totals})
    colour = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(models)}
    by_day: dict[str, dict[str, dict[str, Any]]] = {d: {} for d in days}
    for t in totals:
        by_day[str(t["day"])][str(t["model"])] = t
    # Charge when anything was charged, else requests, so a free day still shows its bars.
    measure = "charge_micro" if any(int(t["charge_micro"] or 0) for t in totals) else "requests"
    peak = max(sum(int(t[measure] or 0) for t in day.values()) for day in by_day.values()) or 1
    width = len(days) * (_BAR_W + _GAP) + _GAP
    bars = []
    for i, day in enumerate(days):
        x = _GAP + i * (_BAR_W + _GAP)
        y = _HEIGHT
        for model in models:
            cell = by_day[day].get(model)
            if cell is None:
                continue
            value = int(cell[measure] or 0)
            h = max(1, round(value * (_HEIGHT - 10) / peak)) if value else 0
            y -= h
            label = f"{esc(day)} {esc(model)}: {int(cell['requests'])} requests, {money(int(cell['charge_micro'] or 0), currency, 6)}"
            bars.append(
                f'<rect x="{x}" y="{y}" width="{_BAR_W}" height="{h}" fill="{colour[model]}">'
                f"<title>{label}</title></rect>"
            )
    legend = "".join(
        f'<li><svg width="10" height="10" aria-hidden="true"><rect width="10" height="10" fill="{colour[m]}"/></svg> '
        f"{esc(m)}</li>"
        for m in models
    )
    rows = "".join(
        f'<tr><td>{esc(t["day"])}</td><td>{esc(t["model"])}</td><td class="num">{int(t["requests"])}</td>'
        f'<td class="num">{int(t["input_cache_hit_tokens"] or 0) + int(t["input_cache_miss_tokens"] or 0)}</td>'
        f'<td class="num">{int(t["output_tokens"] or 0)}</td>'
        f'<td class="num">{money(int(t["charge_micro"] or 0), currency, 6)}</td></tr>'
        for t in sorted(totals, key=lambda t: (str(t["day"]), str(t["model"])), reverse=True)
    )
    what = "charge" if measure == "charge_micro" else "requests"
    return (
        f'<figure class="chart"><svg id="daily-chart" role="img" viewBox="0 0 {width} {_HEIGHT}" '
        f'width="{width}" height="{_HEIGHT}" aria-label="Daily {what} by model, {len(days)} days">'
        f'{"".join(bars)}</svg><figcaption>Daily {what} by model <ul class="legend">{legend}</ul>'
        "</figcaption></figure>"
        '<details><summary>Daily totals as a table</summary><table id="daily-totals"><thead><tr>'
        '<th scope="col">Day (UTC)</th><th scope="col">Model</th><th scope="col">Requests</th>'
        '<th scope="col">Input tokens</th><th scope="col">Output tokens</th><th scope="col">Charge</th>'
        f"</tr></thead><tbody>{rows}</tbody></table></details>"
    )
