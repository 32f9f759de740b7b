"""The review page: one self-contained HTML file (inline CSS, SVG and script; pictures as data URIs) on which
annotators decide (keep, relabel, remove) and download review.csv with their decisions.

Every text from the data is HTML-escaped where it is written into the page; the script's data is JSON in a
`<script type="application/json">` element with `<`, `>`, `&`, U+2028 and U+2029 written as escapes, so no
value can end the element or run as markup.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from html import escape

import numpy as np
import pandas as pd

from irank.formats.review_page_assets import SCRIPT, STYLE
from irank.formats.sheet import mark

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


def number(value: float, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def percent(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0%}"


def candidates_text(row: pd.Series) -> str:
    """The runners-up after the suggested class, less the given label (its line shows it already)."""
    parts = []
    for place in (2, 3):
        name, prob = row.get(f"candidate_{place}"), row.get(f"candidate_{place}_prob")
        if isinstance(name, str) and name and name != str(row["label"]):
            parts.append(f"{escape(name)} {percent(prob)}")
    return ", ".join(parts) if parts else "—"


def decide_html(first_choice: str, first_index: int) -> str:
    """A card's decision buttons, its class choice (the suggested class; the script adds the others when it is
    opened) and the line that says what was decided."""
    return (
        '<div class="decide">'
        '<button type="button" data-decision="keep" aria-pressed="false" title="keep the given label (k)">keep</button>'
        '<button type="button" data-decision="relabel" aria-pressed="false" title="relabel as the class chosen '
        'beside (1-9: the class of that number)">relabel</button>'
        f'<select class="new-label" aria-label="new label"><option value="{first_index}">1 · {escape(first_choice)}'
        '</option></select>'
        '<button type="button" data-decision="remove" aria-pressed="false" title="remove from the data set (r)">remove</button>'
        '</div><div class="status" aria-live="polite"></div>'
    )


def card_html(place: int, row: pd.Series, picture: str | None, full: str | None, problem: str | None,
              classes: list[str], measure: str) -> str:
    """The card of review.csv's row `place`: the picture (`full`: a larger one for the full-size view), what the
    scores say of the row, and its decision controls. `measure`: the score's short name."""
    label, predicted = str(row["label"]), str(row["predicted"])
    label_prob = row.get("label_prob", float("nan"))
    attributes = {
        "data-row": str(place), "data-id": str(row["id"]), "data-label": label, "data-predicted": predicted,
        "data-rank": str(int(row["rank"])), "data-class-rank": str(int(row["class_rank"])),
        "data-score": repr(float(row["score"])),
        "data-label-prob": repr(float(label_prob)) if not pd.isna(label_prob) else "0",
        "data-decision": "", "data-new-label": "",
    }
    attribute_text = " ".join(f'{name}="{escape(value)}"' for name, value in attributes.items())
    missing = picture is None
    first = classes.index(predicted) if predicted in classes else 0
    full_attribute = f' data-full="{full}"' if full else ""
    return (
        f'<article class="card{" missing" if missing else ""}" tabindex="-1" aria-selected="false" {attribute_text}>'
        f'<img src="{picture or PLACEHOLDER}"{full_attribute} alt="{escape(str(row["id"]))}" title="{escape(str(row["path"]))}">'
        '<div class="meta">'
        f'<div class="rank">#{int(row["rank"])} · {escape(measure)} {number(float(row["score"]))}'
        f' · #{int(row["class_rank"])} in class</div>'
        f'<div class="given">given: <b>{escape(label)}</b> ({percent(label_prob)})</div>'
        f'<div class="suggested">suggested: <b>{escape(predicted)}</b> {percent(row["predicted_prob"])}</div>'
        f'<div class="candidates">next: {candidates_text(row)}</div>'
        f'<div class="id">{escape(str(row["id"]))}{" — image not shown: " + escape(problem or "not found") if missing else ""}</div>'
        f'{decide_html(classes[first] if classes else predicted, first)}'
        "</div></article>"
    )


def per_class_counts(samples: pd.Series, flagged: pd.DataFrame, issues: dict | None = None) -> pd.DataFrame:
    """Per class: `samples` (every scored row's count, indexed by label), the flagged rows, those of them the
    model predicts another class for, and (from `issues`, `estimate.issue_summary` of every row) the estimated
    issues among all its rows."""
    labels = flagged["label"].astype(str)
    counts = pd.DataFrame({"samples": samples, "flagged": labels.value_counts()}).fillna(0).astype(int)
    disagree = labels != flagged["predicted"].astype(str)
    counts["suggested_other"] = labels[disagree].value_counts().reindex(counts.index).fillna(0).astype(int)
    per_class = (issues or {}).get("per_class", {})
    counts["issues"] = [per_class.get(str(name), {}).get("estimated_issues", 0) for name in counts.index]
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


def histogram_svg(scores: np.ndarray, mask: np.ndarray, cut_score: float | None, cut_label: str,
                  measure: str = "score") -> str:
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
    parts = [f'<svg role="img" aria-label="histogram of the scores ({escape(measure)})" width="{width}" height="{height}">']
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
        f'<text x="{(left + width) / 2}" y="{axis_y + 26}" text-anchor="middle">{escape(measure)}{" (log scale)" if use_log else ""}</text>'
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
        f"<td>{percent(row['flagged'] / row['samples']) if row['samples'] else '—'}</td>"
        f"<td>{row['suggested_other']}</td><td>{row['issues']}</td></tr>"
        for name, row in counts.iterrows()
    )
    return ('<table class="classes"><thead><tr><th>given label</th><th>samples</th><th>flagged</th><th>share</th>'
            '<th>flagged, model suggests another</th><th>estimated issues (all samples)</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def options_html(values: list[str]) -> str:
    return "".join(f'<option value="{escape(value)}">{escape(value)}</option>' for value in values)




METHOD_NAMES = {"influence": "influence", "loss": "loss", "margin": "negative margin", "gradnorm": "gradient norm",
                "joint-loss": "joint loss", "aum-loss": "margin area and loss"}
MAX_MATRIX_CLASSES = 12
MAX_PAIRS = 10


@dataclass
class Measure:
    """What the scores measure, as the page names it: `short` on the cards and the histogram's axis, `text` in
    sentences ("the probe's loss at layer features.2")."""

    short: str = "score"
    text: str = "score"


def describe_measure(method: str | None, boundary: str | None, influence_measure: str | None,
                     layer: str | None) -> Measure:
    """The measure the scores' sidecar records (`method`, `parameters.boundary`, `parameters.influence_measure`,
    `parameters.layer`); "score" when there is no sidecar to say."""
    if not method:
        return Measure()
    short = METHOD_NAMES.get(method, method)
    if method == "influence":
        where = {"head": " on the checkpoint's head", "refit": " on the probe"}.get(boundary or "", "")
        at = f" at layer {layer}" if boundary == "refit" and layer else ""
        return Measure(short, f"influence ({influence_measure or 'self-influence'}){where}{at}")
    if method == "joint-loss":
        at = f" at layer {layer}" if layer else ""
        return Measure(short, f"the joint loss (the probe's loss{at} and the head's, ranks averaged)")
    if method == "aum-loss":
        return Measure(short, "the fine-tune's area under the margin and the fine-tuned model's loss, ranks averaged")
    if boundary == "refit":
        return Measure(short, f"the probe's {short}" + (f" at layer {layer}" if layer else ""))
    return Measure(short, f"the {short}" + (" on the checkpoint's head" if boundary == "head" else ""))


def script_json(value) -> str:
    """JSON to put inside a <script> element: `<`, `>` and `&` (which only strings hold) and U+2028/2029 escaped,
    so that no value can close the element, open a comment or end a line of script."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for character, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"),
                               ("\u2029", "\\u2029")):
        text = text.replace(character, escaped)
    return text


def matrix_classes(issues: dict, limit: int = MAX_MATRIX_CLASSES) -> list[str]:
    """The classes of the given × suggested matrix: those in the most confused rows (as given or suggested),
    at most `limit`, in the class list's order."""
    involved: dict[str, int] = {}
    for pair in issues["confused_pairs"]:
        for name in (pair["given"], pair["suggested"]):
            involved[name] = involved.get(name, 0) + pair["count"]
    chosen = set(sorted(involved, key=lambda name: (-involved[name], name))[:limit])
    listed = [name for name in issues["per_class"] if name in chosen]
    return listed + sorted(chosen - set(listed))


def matrix_html(issues: dict) -> str:
    """Rows whose given label (row) differs from the model's prediction (column), counted over every scored row."""
    names = matrix_classes(issues)
    if not names:
        return ""
    counts = {(pair["given"], pair["suggested"]): pair["count"] for pair in issues["confused_pairs"]}
    peak = max(counts.values())
    head = "".join(f'<th scope="col">{escape(name)}</th>' for name in names)
    rows = []
    for given in names:
        cells = []
        for suggested in names:
            count = counts.get((given, suggested), 0)
            if given == suggested:
                cells.append('<td class="same">·</td>')
                continue
            shade = f' style="background: rgba(217, 83, 79, {0.1 + 0.6 * count / peak:.2f})"' if count else ""
            cells.append(f'<td{shade} title="given {escape(given)}, suggested {escape(suggested)}: {count}">'
                         f'{count or ""}</td>')
        own = issues["per_class"].get(given, {"rows": 0, "estimated_issues": 0})
        rows.append(f'<tr><th scope="row">{escape(given)}</th>{"".join(cells)}'
                    f'<td>{own["estimated_issues"]} of {own["rows"]}</td></tr>')
    hidden = len({name for pair in issues["confused_pairs"] for name in (pair["given"], pair["suggested"])}) - len(names)
    more = f'<p class="caption">and {hidden} more classes (review.json: summary)</p>' if hidden > 0 else ""
    return (f'<table class="matrix"><thead><tr><th>given ↓ suggested →</th>{head}<th>issues of rows</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>{more}')


def issues_html(issues: dict) -> str:
    """"How bad is my data?": the estimated issues overall, the given × suggested matrix and the top confused pairs."""
    pairs = "".join(f"<li>given <b>{escape(pair['given'])}</b> → suggested <b>{escape(pair['suggested'])}</b>: "
                    f"{pair['count']}</li>" for pair in issues["confused_pairs"][:MAX_PAIRS])
    return (
        '<div class="panel" id="issues"><h2>How bad is the data?</h2>'
        f'<p><b>{issues["estimated_issues"]}</b> of {issues["rows"]} samples ({percent(issues["share"])}) have a '
        "given label the model does not predict: an estimate of the wrong labels, and a lower bound where the "
        "model learned some of them by heart.</p>"
        f'{matrix_html(issues)}'
        + (f'<h3>Most confused</h3><ol class="pairs">{pairs}</ol>' if pairs else "<p>No sample's label differs from "
           "the model's prediction.</p>")
        + "</div>"
    )


@dataclass
class PageData:
    """What the page shows. `samples`: every scored row's count per label; `scores`: every scored row's score,
    `mask` marks the flagged ones; `pictures` (None: not shown, `problems` says why) and `fulls` (a larger
    picture for the full-size view, None: the card's own) per flagged row; `sheet`: `review_pack.review_sheet`'s
    description of review.csv; `key`: unique to the pack (review.csv's sha256), the browser's storage key;
    `issues`: `estimate.issue_summary` of every scored row."""

    flagged: pd.DataFrame
    samples: pd.Series
    scores: np.ndarray
    mask: np.ndarray
    classes: list[str]
    summary: dict
    pictures: list[str | None]
    sheet: dict
    key: str
    issues: dict
    fulls: list[str | None] | None = None
    problems: list[str | None] | None = None
    measure: Measure | None = None


def selection_rule(summary: dict, flagged: pd.DataFrame) -> str:
    parameters = summary["parameters"]
    if parameters["fraction"] is not None:
        rule = f"the first {parameters['fraction']:.0%} in the rank"
    else:
        rule = f"the first {parameters['top'] or len(flagged)} in the rank"
    return rule + (" of each class" if parameters["per_class"] else "")


def lead_html(page: PageData, measure: Measure) -> str:
    summary = page.summary
    missing = summary["missing_images"]
    return (
        f'<p class="lead">{len(page.flagged)} of {summary["scored_rows"]} samples flagged '
        f'({escape(selection_rule(summary, page.flagged))}), ranked by {escape(measure.text)}, rank 1 (the most '
        "suspect) first.</p>"
        '<p class="lead help">Decide on each card: <b>keep</b>, <b>relabel</b> (the suggested class first) or '
        "<b>remove</b>. Click a card, then <kbd>k</kbd> keeps, <kbd>r</kbd> removes, <kbd>1</kbd>–<kbd>9</kbd> "
        "relabels as that class of its list, <kbd>u</kbd> undoes; <kbd>←</kbd> <kbd>→</kbd> <kbd>↑</kbd> "
        "<kbd>↓</kbd> or <kbd>j</kbd> <kbd>l</kbd> move, <kbd>Enter</kbd> (or a click on the picture) shows it full "
        "size. Decisions are kept in this browser; <b>Download review.csv</b> and run "
        "<code>irank apply review.csv MANIFEST -o FIXED.csv</code>."
        + (f' <strong>{missing} images were not found or could not be shown</strong> (under '
           f'{escape(summary["image_root"])}).' if missing else "")
        + "</p>"
    )


def summary_html(page: PageData, measure: Measure) -> str:
    counts = per_class_counts(page.samples, page.flagged, page.issues)
    cut_label = "lowest flagged" if page.summary["parameters"]["per_class"] else "cut"
    histogram = histogram_svg(page.scores, page.mask, page.summary["cut_score"], cut_label, measure.short)
    caption = (f"score: {measure.text}" if measure.text != "score"
               else "score: not named (no sidecar SCORES.json beside the scores says what was computed)")
    return (
        '<section class="summary">'
        f'{issues_html(page.issues)}'
        f'<div class="panel"><h2>Flagged per class</h2>{bar_chart_svg(counts)}</div>'
        f'<div class="panel" id="scores"><h2>Scores: all samples, flagged in red</h2>'
        f'<p class="caption">{escape(caption)}</p>{histogram}</div>'
        f'<div class="panel"><h2>Per class</h2>{class_table_html(counts)}</div>'
        "</section>"
    )


def controls_html(page: PageData) -> str:
    names = sorted(set(page.classes) | set(page.flagged["label"].astype(str)) | set(page.flagged["predicted"].astype(str)))
    return (
        '<section class="controls">'
        f'<label>Show class <select id="class-filter"><option value="">all classes</option>{options_html(names)}</select></label>'
        '<label>by <select id="class-field"><option value="label">given label</option>'
        '<option value="predicted">suggested label</option></select></label>'
        '<label>decided <select id="decision-filter"><option value="all">any</option><option value="undecided">not yet'
        '</option><option value="keep">keep</option><option value="relabel">relabel</option>'
        '<option value="remove">remove</option></select></label>'
        '<label>Sort by <select id="sort-key"><option value="rank">rank (most suspect first)</option>'
        '<option value="classRank">rank within class</option><option value="labelProb">given label\'s probability '
        '(lowest first)</option><option value="label">given label</option><option value="predicted">suggested label'
        "</option></select></label>"
        f'<span id="shown">{len(page.flagged)} cards</span>'
        f'<span id="decided">0 of {len(page.flagged)} decided</span>'
        '<button type="button" id="download">Download review.csv</button><span id="note" class="note"></span>'
        "</section>"
    )


def page_script_data(page: PageData) -> str:
    """The script's data as JSON for a <script type="application/json"> element (see `script_json`)."""
    return script_json({"key": page.key, "classes": page.classes, "marked_classes": [mark(name) for name in page.classes],
                        "sheet": page.sheet})


def render_page(page: PageData) -> str:
    """The whole page as one string."""
    measure = page.measure or Measure()
    count = len(page.flagged)
    fulls = page.fulls or [None] * count
    problems = page.problems or [None] * count
    cards = "\n".join(card_html(place, row, picture, full, problem, page.classes, measure.short)
                      for place, ((_, row), picture, full, problem)
                      in enumerate(zip(page.flagged.iterrows(), page.pictures, fulls, problems)))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>irank review: {count} flagged samples</title>
<style>{STYLE}</style>
</head>
<body data-ready="0">
<h1>irank review</h1>
{lead_html(page, measure)}
{summary_html(page, measure)}
{controls_html(page)}
<main id="cards">
{cards}
</main>
<div id="viewer" hidden role="dialog" aria-label="full-size picture"><img id="viewer-image" alt=""><p id="viewer-caption"></p></div>
<script type="application/json" id="irank-data">{page_script_data(page)}</script>
<script>{SCRIPT}</script>
</body>
</html>
"""
