"""The review page: one self-contained HTML file (inline CSS, SVG and script; thumbnails as data URIs)."""

from __future__ import annotations

import base64
import math
from html import escape

import numpy as np
import pandas as pd

MAX_BAR_CLASSES = 30
HISTOGRAM_BINS = 40
PLACEHOLDER = "data:image/svg+xml;base64," + base64.b64encode(
    b'<svg xmlns="http://www.w3.org/2000/svg" width="128" height="128" viewBox="0 0 128 128">'
    b'<rect width="128" height="128" fill="#eee" stroke="#c00" stroke-dasharray="4"/>'
    b'<text x="64" y="60" font-family="sans-serif" font-size="13" text-anchor="middle" fill="#c00">image</text>'
    b'<text x="64" y="78" font-family="sans-serif" font-size="13" text-anchor="middle" fill="#c00">not found</text></svg>'
).decode("ascii")


def tensor_placeholder(row: pd.Series) -> str:
    """A card picture for a tensor row (no image to show): the file's name and the row's index (and key)."""
    path = str(row.get("path", ""))
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    name = name if len(name) <= 18 else name[:8] + "…" + name[-9:]
    key = row.get("key")
    key_text = str(key) if isinstance(key, str) and key else ""
    index = row.get("index")
    index_text = "" if index is None or (isinstance(index, float) and math.isnan(index)) else str(index)
    if index_text.endswith(".0"):
        index_text = index_text[:-2]
    lines = ["tensor row", name] + ([key_text[:18]] if key_text else []) + ([f"[{index_text}]"] if index_text else [])
    texts = "".join(
        f'<text x="64" y="{44 + 17 * number}" font-family="sans-serif" font-size="13" text-anchor="middle" '
        f'fill="#446">{escape(line)}</text>' for number, line in enumerate(lines)
    )
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="128" height="128" viewBox="0 0 128 128">'
           f'<rect width="128" height="128" fill="#eef" stroke="#99b"/>{texts}</svg>')
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; background: #fafafa; }
h1 { margin: .6em 0 .2em; font-size: 1.5em; } h2 { font-size: 1.05em; margin: .2em 0 .4em; }
.lead { color: #555; margin: 0 0 1em; }
.summary { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; margin-bottom: 1em; }
.panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em .9em; }
table.classes { border-collapse: collapse; } table.classes td, table.classes th { padding: .15em .6em; text-align: right; }
table.classes td:first-child, table.classes th:first-child { text-align: left; }
table.classes tbody tr:nth-child(odd) { background: #f4f4f4; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .bar { fill: #d9534f; cursor: pointer; } svg .bar:hover { fill: #b52b27; }
svg .rest { fill: #bbb; } svg .flag { fill: #d9534f; } svg .cut { stroke: #222; stroke-width: 1.5; stroke-dasharray: 4 3; }
.controls { position: sticky; top: 0; background: #fafafa; padding: .5em 0; border-bottom: 1px solid #ddd;
            display: flex; gap: 1.2em; flex-wrap: wrap; align-items: center; z-index: 1; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: .8em; margin-top: .8em; }
.card { display: flex; gap: .7em; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em; }
.card[hidden] { display: none; }
.card img { width: 128px; height: 128px; object-fit: contain; background: #eee; flex: none; }
.card img.pixelated { image-rendering: pixelated; }
.card.missing { border-color: #c00; }
.meta { min-width: 0; } .meta div { overflow-wrap: anywhere; }
.rank { font-weight: 600; } .given b { color: #b52b27; } .suggested b { color: #1a7f37; }
.candidates, .id { color: #666; font-size: .92em; }
"""

SCRIPT = """
window.addEventListener("error", function () { document.body.setAttribute("data-error", "1"); });
(function () {
  "use strict";
  var container = document.getElementById("cards");
  var cards = Array.prototype.slice.call(container.querySelectorAll(".card"));
  var classFilter = document.getElementById("class-filter");
  var classField = document.getElementById("class-field");
  var sortKey = document.getElementById("sort-key");
  var shown = document.getElementById("shown");
  var numeric = { rank: 1, classRank: 1, labelProb: 1 };
  function compare(key) {
    return function (a, b) {
      var order;
      if (key in numeric) {
        order = numeric[key] * (parseFloat(a.dataset[key]) - parseFloat(b.dataset[key]));
      } else {
        order = a.dataset[key].localeCompare(b.dataset[key]);
      }
      return order || (parseInt(a.dataset.rank, 10) - parseInt(b.dataset.rank, 10));
    };
  }
  function update() {
    var wanted = classFilter.value, field = classField.value, visible = 0;
    cards.slice().sort(compare(sortKey.value)).forEach(function (card) {
      var show = wanted === "" || card.dataset[field] === wanted;
      card.hidden = !show;
      if (show) { visible += 1; }
      container.appendChild(card);
    });
    shown.textContent = visible + " of " + cards.length + " cards shown";
  }
  [classFilter, classField, sortKey].forEach(function (control) { control.addEventListener("change", update); });
  Array.prototype.forEach.call(document.querySelectorAll("[data-filter-class]"), function (bar) {
    bar.addEventListener("click", function () {
      classField.value = "label";
      classFilter.value = bar.getAttribute("data-filter-class");
      update();
    });
  });
  cards.forEach(function (card) {
    var image = card.querySelector("img");
    function sharpen() { if (image.naturalWidth && image.naturalWidth < 96) { image.classList.add("pixelated"); } }
    if (image.complete) { sharpen(); } else { image.addEventListener("load", sharpen); }
  });
  // A link can preselect the view: index.html#class=cat&by=predicted&sort=labelProb
  var asked = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (pair) {
    var at = pair.indexOf("=");
    if (at > 0) { asked[decodeURIComponent(pair.slice(0, at))] = decodeURIComponent(pair.slice(at + 1)); }
  });
  function choose(select, value) {
    var known = Array.prototype.some.call(select.options, function (option) { return option.value === value; });
    if (value !== undefined && known) { select.value = value; }
  }
  choose(classFilter, asked["class"]);
  choose(classField, asked.by);
  choose(sortKey, asked.sort);
  update();
  document.body.setAttribute("data-ready", "1");
}());
"""


def number(value: float, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def percent(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0%}"


def candidates_text(row: pd.Series) -> str:
    parts = []
    for place in (2, 3):
        name, prob = row.get(f"candidate_{place}"), row.get(f"candidate_{place}_prob")
        if isinstance(name, str) and name:
            parts.append(f"{escape(name)} {percent(prob)}")
    return ", ".join(parts) if parts else "—"


def card_html(row: pd.Series, thumbnail: str | None, problem: str | None = None) -> str:
    label, predicted = str(row["label"]), str(row["predicted"])
    label_prob = row.get("label_prob", float("nan"))
    attributes = {
        "data-id": str(row["id"]), "data-label": label, "data-predicted": predicted, "data-rank": str(int(row["rank"])),
        "data-class-rank": str(int(row["class_rank"])), "data-score": repr(float(row["score"])),
        "data-label-prob": repr(float(label_prob)) if not pd.isna(label_prob) else "0",
    }
    attribute_text = " ".join(f'{name}="{escape(value)}"' for name, value in attributes.items())
    missing = thumbnail is None
    return (
        f'<article class="card{" missing" if missing else ""}" {attribute_text}>'
        f'<img src="{thumbnail or PLACEHOLDER}" alt="{escape(str(row["id"]))}" title="{escape(str(row["path"]))}">'
        '<div class="meta">'
        f'<div class="rank">#{int(row["rank"])} · influence {number(float(row["score"]))}'
        f' · #{int(row["class_rank"])} in class</div>'
        f'<div class="given">given: <b>{escape(label)}</b> ({percent(label_prob)})</div>'
        f'<div class="suggested">suggested: <b>{escape(predicted)}</b> {percent(row["predicted_prob"])}</div>'
        f'<div class="candidates">next: {candidates_text(row)}</div>'
        f'<div class="id">{escape(str(row["id"]))}{" — image not shown: " + escape(problem or "not found") if missing else ""}</div>'
        "</div></article>"
    )


def per_class_counts(samples: pd.Series, flagged: pd.DataFrame) -> pd.DataFrame:
    """Per class: `samples` (every scored row's count, indexed by label), the flagged rows, and those of them the
    model predicts another class for."""
    labels = flagged["label"].astype(str)
    counts = pd.DataFrame({"samples": samples, "flagged": labels.value_counts()}).fillna(0).astype(int)
    disagree = labels != flagged["predicted"].astype(str)
    counts["suggested_other"] = labels[disagree].value_counts().reindex(counts.index).fillna(0).astype(int)
    return counts.sort_index()


def bar_chart_svg(counts: pd.DataFrame) -> str:
    """Horizontal bars of flagged rows per class (the classes with the most, at most MAX_BAR_CLASSES)."""
    shown = counts[counts["flagged"] > 0].sort_values("flagged", ascending=False, kind="mergesort").head(MAX_BAR_CLASSES)
    if shown.empty:
        return "<p>No rows flagged.</p>"
    name_width, bar_width, row_height = 120, 260, 18
    top = int(shown["flagged"].max())
    height = row_height * len(shown) + 6
    parts = [f'<svg role="img" aria-label="flagged rows per class" width="{name_width + bar_width + 50}" height="{height}">']
    for index, (name, row) in enumerate(shown.iterrows()):
        y = index * row_height + 3
        width = max(1.0, bar_width * row["flagged"] / top)
        short = name if len(name) <= 18 else name[:17] + "…"
        parts.append(
            f'<text x="{name_width - 6}" y="{y + 12}" text-anchor="end">{escape(short)}</text>'
            f'<rect class="bar" data-filter-class="{escape(name)}" x="{name_width}" y="{y}" width="{width:.1f}" height="{row_height - 4}">'
            f'<title>{escape(name)}: {row["flagged"]} of {row["samples"]} flagged</title></rect>'
            f'<text x="{name_width + width + 4:.1f}" y="{y + 12}">{row["flagged"]}</text>'
        )
    parts.append("</svg>")
    hidden = int((counts["flagged"] > 0).sum()) - len(shown)
    note = f"<p>and {hidden} more classes with flagged rows</p>" if hidden > 0 else ""
    return "".join(parts) + note


def histogram_svg(scores: np.ndarray, mask: np.ndarray, cut_score: float | None, cut_label: str) -> str:
    """Histogram of all scores, flagged rows stacked in red, the cut as a dashed line; log10 axis for wide positive ranges."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    scores, mask = scores[finite], np.asarray(mask)[finite]
    if len(scores) == 0:
        return "<p>No scores.</p>"
    use_log = bool(scores.min() > 0 and scores.max() / scores.min() > 100)
    values = np.log10(scores) if use_log else scores
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    all_counts, _ = np.histogram(values, bins=edges)
    flagged_counts, _ = np.histogram(values[mask], bins=edges)
    width, height, left, bottom = 420, 150, 36, 30
    plot_height = height - bottom - 8
    peak = max(1, int(all_counts.max()))
    bin_width = (width - left - 6) / HISTOGRAM_BINS
    parts = [f'<svg role="img" aria-label="histogram of influence scores" width="{width}" height="{height}">']
    for index, (total, flagged) in enumerate(zip(all_counts, flagged_counts)):
        x = left + index * bin_width
        for count, base, css in ((total - flagged, 0, "rest"), (flagged, total - flagged, "flag")):
            if count <= 0:
                continue
            bar = max(1.0, plot_height * count / peak)
            y = 8 + plot_height - plot_height * base / peak - bar
            parts.append(f'<rect class="{css}" x="{x:.1f}" y="{y:.1f}" width="{max(bin_width - 1, 1):.1f}" height="{bar:.1f}"/>')
    axis_y = 8 + plot_height
    shown_low, shown_high = (10 ** low, 10 ** high) if use_log else (low, high)
    parts.append(
        f'<line x1="{left}" y1="{axis_y}" x2="{width - 6}" y2="{axis_y}" stroke="#666"/>'
        f'<text x="{left}" y="{axis_y + 14}">{number(shown_low, 3)}</text>'
        f'<text x="{width - 6}" y="{axis_y + 14}" text-anchor="end">{number(shown_high, 3)}</text>'
        f'<text x="{(left + width) / 2}" y="{axis_y + 26}" text-anchor="middle">influence score{" (log scale)" if use_log else ""}</text>'
        f'<text x="{left - 4}" y="16" text-anchor="end">{peak}</text><text x="{left - 4}" y="{axis_y}" text-anchor="end">0</text>'
    )
    if cut_score is not None and np.isfinite(cut_score) and (cut_score > 0 or not use_log):
        cut_value = math.log10(cut_score) if use_log else cut_score
        x = left + (cut_value - low) / (high - low) * (width - left - 6)
        parts.append(f'<line class="cut" x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{axis_y}"/>'
                     f'<text x="{x - 4:.1f}" y="14" text-anchor="end">{escape(cut_label)} {number(cut_score, 3)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def class_table_html(counts: pd.DataFrame) -> str:
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{row['samples']}</td><td>{row['flagged']}</td>"
        f"<td>{row['flagged'] / row['samples']:.0%}</td><td>{row['suggested_other']}</td></tr>"
        for name, row in counts.iterrows()
    )
    return ('<table class="classes"><thead><tr><th>given label</th><th>samples</th><th>flagged</th><th>share</th>'
            f'<th>model suggests another</th></tr></thead><tbody>{rows}</tbody></table>')


def options_html(values: list[str]) -> str:
    return "".join(f'<option value="{escape(value)}">{escape(value)}</option>' for value in values)


def render_page(flagged: pd.DataFrame, samples: pd.Series, scores: np.ndarray, thumbnails: list[str | None], *,
                mask: np.ndarray, classes: list[str], summary: dict, problems: list[str | None] | None = None) -> str:
    """The whole page as one string; `samples`: every scored row's count per label, `scores`: every scored row's
    score, `mask` marks the flagged ones."""
    counts = per_class_counts(samples, flagged)
    parameters = summary["parameters"]
    if parameters["fraction"] is not None:
        rule = f"the first {parameters['fraction']:.0%} in the rank"
    else:
        rule = f"the first {parameters['top'] or len(flagged)} in the rank"
    rule += " of each class" if parameters["per_class"] else ""
    cut_label = "lowest flagged" if parameters["per_class"] else "cut"
    filter_classes = sorted(set(classes) | set(flagged["label"].astype(str)) | set(flagged["predicted"].astype(str)))
    missing = summary["missing_images"]
    problems = problems or [None] * len(thumbnails)
    cards = "\n".join(card_html(row, thumbnail, problem)
                      for (_, row), thumbnail, problem in zip(flagged.iterrows(), thumbnails, problems))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>irank review: {len(flagged)} flagged samples</title>
<style>{STYLE}</style>
</head>
<body data-ready="0">
<h1>irank review</h1>
<p class="lead">{len(flagged)} of {summary['scored_rows']} samples flagged ({escape(rule)}), rank 1 (the most suspect) first.
Write your decision for each in <code>review.csv</code> (<code>keep</code>, <code>relabel</code> with a
<code>new_label</code>, or <code>remove</code>), then run <code>irank apply review.csv MANIFEST -o FIXED.csv</code>.
{f'<strong>{missing} images were not found or could not be shown</strong> (under {escape(summary["image_root"])}).' if missing else ''}</p>
<section class="summary">
<div class="panel"><h2>Flagged per class</h2>{bar_chart_svg(counts)}</div>
<div class="panel"><h2>Influence scores: all samples, flagged in red</h2>{histogram_svg(scores, mask, summary["cut_score"], cut_label)}</div>
<div class="panel"><h2>Per class</h2>{class_table_html(counts)}</div>
</section>
<section class="controls">
<label>Show class <select id="class-filter"><option value="">all classes</option>{options_html(filter_classes)}</select></label>
<label>by <select id="class-field"><option value="label">given label</option><option value="predicted">suggested label</option></select></label>
<label>Sort by <select id="sort-key"><option value="rank">rank (most suspect first)</option>
<option value="classRank">rank within class</option><option value="labelProb">given label's probability (lowest first)</option>
<option value="label">given label</option><option value="predicted">suggested label</option></select></label>
<span id="shown">{len(flagged)} cards</span>
</section>
<main id="cards">
{cards}
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""
