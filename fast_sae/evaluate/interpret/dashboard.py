"""A static, self-contained HTML feature dashboard per SAE.

Why self-contained: it must open from a results folder or an e-mail attachment with no server and
no network: CSS is inline, the density histogram is an inline base64 PNG (matplotlib Agg), there
is no JavaScript. Every token and judge string is HTML-escaped (tokens are arbitrary model text).
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.1em;margin:1.2em 0 .3em}
table.summary td,table.index td,table.index th{padding:.1em .8em .1em 0;text-align:left}
.feature{border-top:1px solid #ccc;padding:.4em 0}
.meta{color:#555;font-size:.9em}
.ctx{font-family:ui-monospace,monospace;font-size:.85em;margin:.25em 0;white-space:pre-wrap;line-height:1.6}
.tok{border-radius:2px;padding:0 1px}
.peak{outline:1px solid #900}
.score{font-weight:bold}
.unmeaningful .score{font-weight:normal;color:#888;text-decoration:line-through}
.banner{background:#fde8e8;border:1px solid #c00;padding:.5em;margin:.5em 0;font-weight:bold}
.mark{font-size:.8em;color:#555;border:1px solid #aaa;border-radius:3px;padding:0 3px;margin-left:.3em}
.rule{color:#555;font-size:.9em;margin:.3em 0}
"""


def density_histogram_png(density: np.ndarray) -> str:
    """Base64 PNG of the log10 activation density of the live features (dead ones counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = np.asarray(density, dtype=np.float64)
    live = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 2.6), dpi=90)
    if len(live):
        ax.hist(np.log10(live), bins=50, color="#3572b0")
    ax.set_xlabel("log10 activation density (fraction of tokens > 0)")
    ax.set_ylabel("features")
    ax.set_title(f"{len(live)} live, {len(density) - len(live)} dead of {len(density)} features", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _token_html(token: str, act: float, scale: float, peak: bool) -> str:
    alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale))
    text = html.escape(token.replace("\n", "\u21b5\n"))
    cls = "tok peak" if peak else "tok"
    return (f'<span class="{cls}" style="background:rgba(230,60,30,{alpha:.2f})" '
            f'title="{act:.3f}">{text}</span>')


def _marks(context: dict) -> list[str]:
    """What a reader must know about an example: repeated context, template prefix, attention sink."""
    out = []
    if context.get("copies", 1) > 1:
        out.append(f'&times;{context["copies"]} copies')
    if context.get("in_shared_prefix"):
        out.append("shared template prefix (not a ★ token)")
    elif context.get("position") == 0:
        out.append("position 0 (not a ★ token)")
    return out


def _feature_html(rep: dict, judged: dict | None) -> str:
    k = rep["feature"]
    head = f'<h2 id="f{k}">Feature {k}</h2>'
    meta = (f'<div class="meta">density {rep["density"]:.3g} &middot; max {rep["max_act"]:.3g} '
            f'&middot; mean {rep["mean_act"]:.3g}')
    if judged is not None:
        if judged.get("score") is not None:
            meta += (f' &middot; judge <span class="score">{judged["score"]}/5</span> '
                     f'&ldquo;{html.escape(str(judged["name"]))}&rdquo;')
        else:
            meta += f' &middot; unscored ({html.escape(str(judged.get("reason")))})'
    meta += "</div>"
    scale = max([c["max_act"] for c in rep["contexts"]] or [0.0])
    rows = []
    for c in rep["contexts"]:
        spans = "".join(_token_html(t, a, scale, i == c["peak"])
                        for i, (t, a) in enumerate(zip(c["tokens"], c["acts"])))
        marks = "".join(f'<span class="mark">{m}</span>' for m in _marks(c))
        rows.append(f'<div class="ctx" title="sequence {c["sequence"]}, position {c["position"]}">'
                    f'<b>{c["max_act"]:.2f}</b> {spans}{marks}</div>')
    if not rows:
        rows.append('<div class="meta">no positive activation in the cache</div>')
    return f'<div class="feature" data-feature="{k}">{head}{meta}{"".join(rows)}</div>'


def write_dashboard(path: Path, *, title: str, reports: Sequence[dict], density: np.ndarray,
                    judged: Sequence[dict] | None = None, summary: dict | None = None,
                    judge_note: str | None = None, selection_rule: str | None = None) -> Path:
    """Write the dashboard: a summary table, the density histogram, then one block per feature.

    ``judge_note`` (the judge's scores are not meaningful) is shown as a banner and the scores are
    struck through, so a page read alone cannot be mistaken for a result. ``selection_rule`` says how
    the examples were chosen (``TopExamples.selection_rule``)."""
    by_feature = {r["feature"]: r for r in (judged or [])}
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in (summary or {}).items())
    index = []
    for rep in reports:
        j = by_feature.get(rep["feature"]) or {}
        verdict = (f'{j["score"]}/5 {html.escape(str(j.get("name")))}' if j.get("score") is not None
                   else ("unscored" if j else ""))
        if judge_note and j.get("score") is not None:
            verdict = f'<s>{verdict}</s> (not meaningful)'

        index.append(f'<tr><td><a href="#f{rep["feature"]}">{rep["feature"]}</a></td><td>{rep["density"]:.3g}</td>'
                     f'<td>{rep["max_act"]:.3g}</td><td>{verdict}</td></tr>')
    banner = [f'<div class="banner">Judge scores {html.escape(judge_note)}</div>'] if judge_note else []
    body = [f"<h1>{html.escape(title)}</h1>", *banner, f'<table class="summary">{rows}</table>',
            *([f'<p class="rule">Top examples: {html.escape(selection_rule)}.</p>'] if selection_rule else []),
            f'<img alt="density histogram" src="data:image/png;base64,{density_histogram_png(density)}">',
            '<table class="index"><tr><th>feature</th><th>density</th><th>max</th><th>judge</th></tr>'
            + "".join(index) + "</table>"]
    body += [_feature_html(rep, by_feature.get(rep["feature"]) if judged is not None else None) for rep in reports]
    doc = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
           + ('<body class="unmeaningful">\n' if judge_note else "<body>\n")
           + "\n".join(body) + "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path
