"""`aggregator status --html FILE`: one self-contained page picturing the gaps.

Nothing is fetched when the page opens (no CDN, no font, no image: inline CSS and SVG), so it
can be mailed or opened from a file share. Large portfolios stay small: each site is one JSON
array of its domain and one character per day and source (`html_data.CELL_STATES`), which a
short inline script turns into cells. Healthy account groups stay collapsed and are drawn only
when opened; `#all` at the end of the URL opens every group. Rendering is a pure function of
`ReportData`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from aggregator import token_health
from aggregator.dates import SOURCES
from aggregator.status import render as status_render
from aggregator.status.html_data import CELL_STATES, ReportData, SiteRow
from aggregator.status.verdict import RunSummary, StatusReport
from aggregator.usage import UsageError

SOURCE_NAMES = {"matomo": "Matomo visits", "gsc": "Search Console"}
CELL_COLOURS = {
    "F": "#2e9e5b",  # final
    "P": "#8fd4a8",  # provisional
    "Z": "#c9d6cf",  # zero
    "M": "#f2b33d",  # missing
    "X": "#d9443a",  # failed
    "B": "#f3f3f3",  # before deployment
    "N": "#dfe8f5",  # not due yet
}
NO_GROUP = "no Search Console account"

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px}
table.t{border-collapse:collapse}table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd;
text-align:left;font-size:13px}td.num{text-align:right}
td.e{white-space:nowrap}.bad{color:#b3261e}.warn{color:#8a5a00}
.r{white-space:nowrap;height:11px;line-height:11px}
.n{display:inline-block;width:230px;overflow:hidden;text-overflow:ellipsis;font-size:11px;
vertical-align:top}
.c{display:inline-block;width:300px;margin-right:14px;vertical-align:top}
.c i{display:inline-block;width:9px;height:9px;margin-right:1px}
.h{height:auto;font-size:11px;color:#555}
summary{cursor:pointer;padding:3px 0}summary.gaps{font-weight:bold}
#tip{position:fixed;bottom:0;left:0;right:0;background:#333;color:#fff;padding:3px 8px;
font-size:12px;min-height:1.2em}
""" + "".join(f".{k}{{background:{v}}}" for k, v in CELL_COLOURS.items())

# Draws a group's rows the first time it is open; shows the cell under the pointer.
_SCRIPT = """
(function(){
var d=JSON.parse(document.getElementById('data').textContent),S=d.sources;
var grid=document.getElementById('grid'),tip=document.getElementById('tip');
function esc(s){return s.replace(/[&<>"]/g,function(c){return '&#'+c.charCodeAt(0)+';';});}
function draw(g,box){var h=[];g.rows.forEach(function(r){h.push('<div class=r><span class=n>'+
esc(r[0])+'</span>');for(var i=0;i<S.length;i++){var c=r[i+1];h.push('<span class="c '+S[i]+
'">');for(var j=0;j<c.length;j++)h.push('<i class='+c[j]+'></i>');h.push('</span>');}
h.push('</div>');});box.innerHTML=h.join('');}
d.groups.forEach(function(g){var det=document.createElement('details'),s=document.createElement(
'summary'),box=document.createElement('div');s.textContent=g.name+' \u2014 '+g.rows.length+
' sites, '+g.gaps+' with gaps';if(g.gaps)s.className='gaps';det.appendChild(s);det.appendChild(box);
grid.appendChild(det);var done=false;function fill(){if(!done){done=true;draw(g,box);}}
det.addEventListener('toggle',fill);if(g.gaps||location.hash=='#all'){det.open=true;fill();}});
grid.addEventListener('mouseover',function(e){var t=e.target;if(t.tagName!='I')return;
var p=t.parentNode,k=Array.prototype.indexOf.call(p.children,t);tip.textContent=
p.parentNode.firstChild.textContent+' \u00b7 '+p.className.slice(2)+' \u00b7 '+d.days[k]+
' \u00b7 '+d.states[t.className];});
})();
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _script_json(value: object) -> str:
    """JSON safe inside <script>: no '<' can close the element early."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")


def grid_data(data: ReportData) -> dict[str, object]:
    """The compact grid: per account group, one [domain, cells per source...] per site."""

    def row(site: SiteRow) -> list[str]:
        return [site.site, *(site.cells.get(source, "") for source in SOURCES)]

    return {
        "sources": list(SOURCES),
        "days": [day.isoformat() for day in data.days],
        "states": dict(CELL_STATES),
        "groups": [
            {
                "name": account or NO_GROUP,
                "gaps": sum(1 for site in sites if site.needs_attention),
                "rows": [row(site) for site in sites],
            }
            for account, sites in data.groups()
        ],
    }


def _legend(data: ReportData) -> str:
    head = "".join(
        f'<th><i class="{k}" style="display:inline-block;width:9px;height:9px"></i> {_e(v)}</th>'
        for k, v in CELL_STATES.items()
    )
    body = ""
    for source in SOURCES:
        counts = data.counts(source)
        cells = "".join(f'<td class="num">{counts[k]:,}</td>' for k in CELL_STATES)
        body += f"<tr><td>{_e(SOURCE_NAMES[source])}</td>{cells}</tr>"
    return f'<table class="t"><tr><th>cells</th>{head}</tr>{body}</table>'


def _accounts(data: ReportData) -> str:
    if not data.accounts:
        return "<p>No Google account.</p>"
    now = data.generated_at
    rows = ""
    for account in data.accounts:
        health = account.health
        cause = token_health.failure_cause(health) if health.failing else None
        error = " ".join((health.last_error or "").split())
        problem = f"{error} ({cause})" if cause else error
        css = ' class="bad"' if health.failing and account.active else ""
        rows += (
            f'<tr{css}><td class="e">{_e(account.email)}</td>'
            f"<td>{'yes' if account.active else 'no'}</td>"
            f'<td class="num">{account.sites}</td>'
            f"<td>{_e(token_health.summary(health, now))}</td><td>{_e(problem)}</td></tr>"
        )
    return (
        '<table class="t"><tr><th>account</th><th>active</th><th>sites</th><th>token</th>'
        f"<th>last error</th></tr>{rows}</table>"
    )


def sparkline(
    title: str, values: Sequence[float | None], fmt: Callable[[float], str], colour: str
) -> str:
    """A 320x64 inline SVG line of `values` (oldest first); None leaves a gap."""
    width, height, pad = 320, 64, 4
    known = [v for v in values if v is not None]
    top = max(known, default=0) or 1
    step = (width - 2 * pad) / max(len(values) - 1, 1)
    points, segments = [], []
    for n, value in enumerate(values):
        if value is None:
            if points:
                segments.append(points)
            points = []
            continue
        x = pad + n * step
        y = height - pad - (height - 2 * pad) * value / top
        points.append(f"{x:.1f},{y:.1f}")
    if points:
        segments.append(points)
    lines = "".join(
        f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(p)}"/>'
        if len(p) > 1
        else f'<circle cx="{p[0].split(",")[0]}" cy="{p[0].split(",")[1]}" r="2" fill="{colour}"/>'
        for p in segments
    )
    label = f"{title}: max {fmt(max(known))}, last {fmt(known[-1])}" if known else f"{title}: n/a"
    return (
        f'<figure style="display:inline-block;margin:0 1.5em 0 0"><svg width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">'
        f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>{lines}</svg>'
        f"<figcaption>{_e(label)}</figcaption></figure>"
    )


def _runs(report: StatusReport) -> str:
    runs = list(reversed(report.runs))  # oldest first
    if not runs:
        return f"<p>No run in the last {report.window_days} days.</p>"

    def error_rate(run: RunSummary) -> float | None:
        requests = sum(r for r, _ in run.api.values())
        return sum(f for _, f in run.api.values()) / requests if requests else None

    return (
        sparkline("duration", [r.seconds for r in runs], lambda v: f"{v:.0f} s", "#3367d6")
        + sparkline(
            "rows written", [r.rows_upserted for r in runs], lambda v: f"{v:,.0f}", "#2e9e5b"
        )
        + sparkline(
            "API error rate", [error_rate(r) for r in runs], lambda v: f"{100 * v:.1f}%", "#d9443a"
        )
    )


def _grid_header(data: ReportData) -> str:
    days = "".join(
        f'<i style="background:none;font-size:8px;overflow:visible">{d.day}</i>'
        if d.day % 5 == 0
        else "<i style='background:none'></i>"
        for d in data.days
    )
    names = "".join(f'<span class="c">{_e(SOURCE_NAMES[s])}</span>' for s in SOURCES)
    cells = "".join(f'<span class="c">{days}</span>' for _ in SOURCES)
    return (
        f'<div class="r h"><span class="n"></span>{names}</div>'
        f'<div class="r h"><span class="n">day of month</span>{cells}</div>'
    )


def render(data: ReportData) -> str:
    report = data.status
    summary = "\n".join(status_render.overview_lines(report, data.zone))
    first, last = data.days[0], data.days[-1]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aggregator status {report.today}</title><style>{_CSS}</style></head>
<body>
<h1>Analytics aggregator: status on {report.today} ({_e(data.zone.key)})</h1>
<pre>{_e(summary)}</pre>
<h2>Days {first} to {last}, per site and source</h2>
{_legend(data)}
<p>Groups are Search Console accounts; those with gaps (missing or failed days) are open.
Point at a cell to see its day; add <code>#all</code> to the URL to open every group.</p>
{_grid_header(data)}
<div id="grid"></div>
<noscript>The grid needs JavaScript; the counts above do not.</noscript>
<h2>Runs, last {report.window_days} days</h2>
{_runs(report)}
<h2>Google accounts</h2>
{_accounts(data)}
<p style="margin-bottom:3em">Generated {data.generated_at.strftime("%Y-%m-%d %H:%M %Z")}.</p>
<div id="tip"></div>
<script type="application/json" id="data">{_script_json(grid_data(data))}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def size_text(size: int) -> str:
    """A file size for the operator: '27 kB', '1.2 MB'."""
    return f"{size / 1e6:.1f} MB" if size >= 1_000_000 else f"{max(size // 1000, 1)} kB"


def write(data: ReportData, path: Path) -> int:
    """Write the page to `path` (whole or not at all: a half-written report would mislead);
    return its size in bytes."""
    page = render(data).encode("utf-8")
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_bytes(page)
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UsageError(f"cannot write --html {path}: {exc.strerror or exc}") from None
    return len(page)
