"""The review page's parts without a browser: review.csv as the page rebuilds it, the script's data, the measure
the page names, the "how bad is my data?" panel, the pictures; and review.json's summary of every scored row.
(The page in a real browser: tests/test_review_browser.py.)"""

from __future__ import annotations

import json
import shutil
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import irank
from irank.core.estimate import issue_summary
from irank.formats.review_pack import read_decisions, review_sheet, sheet_text
from irank.formats.review_page import candidates_text, describe_measure, issues_html, script_json
from irank.formats.sheet import mark

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# cells a spreadsheet or a CSV reader trips on: separators, quotes, line ends, formula starts, marks, NUL
awkward = st.text(alphabet=st.sampled_from(list("a,;\"'\r\n\t =+-@ é\u2028\x00<>&")) | st.characters(exclude_categories=("Cs",)),
                  max_size=12)  # no lone surrogates: files are UTF-8, and strict JSON refuses them


def flagged_table(ids: list[str], labels: list[str], notes: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"rank": range(1, len(ids) + 1), "id": ids, "label": labels, "score": np.linspace(3, 1, len(ids)),
                         "note": notes})


@FAST
@given(st.lists(st.tuples(awkward, awkward, awkward), min_size=1, max_size=8, unique_by=lambda row: row[0]),
       st.lists(awkward.filter(bool), min_size=1, max_size=3), st.data())
def test_the_pages_review_csv_is_irank_s_byte_for_byte_and_its_decisions_reach_their_ids(rows, classes, data):
    flagged = flagged_table(*map(list, zip(*rows)))
    text, sheet = review_sheet(flagged)
    assert sheet["exact"] and sheet_text(sheet["header"], sheet["rows"], sheet["quote_all"], sheet["newline"]) == text
    at = sheet["decision_at"]
    assert sheet["header"][at:at + 2] == ["decision", "new_label"]
    decided = [list(fields) for fields in sheet["rows"]]
    chosen = []
    for fields in decided:  # what the page's script does: the decision, and the class as review.csv marks it
        decision = data.draw(st.sampled_from(["", "keep", "relabel", "remove"]))
        new_label = data.draw(st.sampled_from(classes)) if decision == "relabel" else ""
        fields[at], fields[at + 1] = decision, mark(new_label)
        chosen.append((decision, new_label))
    exported = sheet_text(sheet["header"], decided, sheet["quote_all"], sheet["newline"]).encode("utf-8")
    read = read_decisions("review.csv", exported)
    assert read["id"].tolist() == flagged["id"].tolist()
    assert list(zip(read["decision"], read["new_label"])) == chosen


def test_script_data_cannot_close_its_element_and_reads_back_the_same():
    hostile = "</script><script>alert(1)</script><!-- & \u2028\u2029 'x' \"y\""
    text = script_json({"ids": [hostile], hostile: 1})
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == {"ids": [hostile], hostile: 1}


@pytest.mark.parametrize(("sidecar", "short", "text"), [
    ((None, None, None, None), "score", "score"),
    (("loss", "refit", None, "features.2"), "loss", "the probe's loss at layer features.2"),
    (("influence", "head", "self-influence", None), "influence", "influence (self-influence) on the checkpoint's head"),
    (("influence", "refit", "boundary-shift", "layer4"), "influence",
     "influence (boundary-shift) on the probe at layer layer4"),
    (("margin", "head", None, None), "negative margin", "the negative margin on the checkpoint's head"),
    (("gradnorm", "refit", None, None), "gradient norm", "the probe's gradient norm"),
    (("aum-loss", "head", None, None), "margin area and loss",  # post-train's judgement (unlearn)
     "the fine-tune's area under the margin and the fine-tuned model's loss, ranks averaged"),
])
def test_the_page_names_the_measure_the_sidecar_records(sidecar, short, text):
    measure = describe_measure(*sidecar)
    assert (measure.short, measure.text) == (short, text)


def test_next_candidates_leave_out_the_given_label():
    row = pd.Series({"label": "cat", "candidate_2": "cat", "candidate_2_prob": 0.3, "candidate_3": "dog",
                     "candidate_3_prob": 0.1})
    assert candidates_text(row) == "dog 10%"
    assert candidates_text(pd.Series({"label": "cat", "candidate_2": "cat", "candidate_2_prob": 0.3})) == "—"


def test_the_issues_panel_counts_every_pair_and_escapes_the_names():
    names = ["<b>bold</b>", "a&b", 'q"uote']
    summary = issue_summary([names[0]] * 3 + [names[1]] * 2, [names[1], names[1], names[0], names[2], names[1]], names)
    html = issues_html(summary)
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html and "a&amp;b" in html
    assert "<b>3</b> of 5 samples (60%)" in html
    assert 'title="given &lt;b&gt;bold&lt;/b&gt;, suggested a&amp;b: 2">2</td>' in html
    assert "given <b>&lt;b&gt;bold&lt;/b&gt;</b> → suggested <b>a&amp;b</b>: 2" in html
    assert "2 of 3</td>" in html  # the given class's issues of its rows


def test_the_full_size_view_gets_a_larger_picture_only_when_the_image_is_larger(tmp_path):
    from PIL import Image

    from irank.stages.review import pictures_of

    Image.new("RGB", (800, 600), (10, 200, 30)).save(tmp_path / "big.jpg")
    Image.new("RGB", (16, 16), (10, 200, 30)).save(tmp_path / "small.png")
    small, full, problem = pictures_of(tmp_path / "big.jpg")
    assert problem is None and small.startswith("data:image/jpeg;base64,") and full.startswith("data:image/jpeg;base64,")
    import base64
    import io

    sizes = [Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size for uri in (small, full)]
    assert sizes == [(160, 120), (512, 384)]
    assert pictures_of(tmp_path / "small.png")[1] is None
    assert pictures_of(tmp_path / "gone.png")[:2] == (None, None)


@pytest.fixture(scope="module")
def scored(tiny_data, tiny_model, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("page-scores") / "scores.csv")
    irank.score(tiny_model, tiny_data["train"], output=output, run_options=irank.RunOptions(device="cpu"))
    return output


def test_review_json_summarizes_every_scored_row_and_the_page_shows_it(scored, tmp_path):
    result = irank.review(scored, output=str(tmp_path / "r"), top=10)
    table = pd.read_csv(scored, dtype=str, keep_default_na=False)
    classes = json.loads(Path(scored + ".json").read_text())["classes"]
    expected = issue_summary(table["label"], table["predicted"], classes)
    written = json.loads((tmp_path / "r" / "review.json").read_text())
    assert written["summary"] == expected == result.summary["summary"] and expected["estimated_issues"] > 0
    html = (tmp_path / "r" / "index.html").read_text()
    assert f'<b>{expected["estimated_issues"]}</b> of {len(table)} samples' in html
    top = expected["confused_pairs"][0]
    assert f"given <b>{top['given']}</b> → suggested <b>{top['suggested']}</b>: {top['count']}" in html


def test_the_page_says_which_measure_ranked_the_rows(scored, tmp_path):
    sidecar = json.loads(Path(scored + ".json").read_text())
    assert sidecar["method"] == "joint-loss" and sidecar["parameters"]["boundary"] == "refit"
    irank.review(scored, output=str(tmp_path / "r"), top=5)
    html = (tmp_path / "r" / "index.html").read_text()
    layer = sidecar["parameters"]["layer"]
    text = f"the joint loss (the probe's loss at layer {layer} and the head's, ranks averaged)"
    assert f"ranked by {html_escape(text)}" in html and f"score: {html_escape(text)}" in html
    assert "influence" not in html.lower()  # no card, heading or axis calls the loss influence
    assert json.loads((tmp_path / "r" / "review.json").read_text())["score_measure"] == text
    assert describe_measure("loss", "refit", None, layer).text == f"the probe's loss at layer {layer}"
    bare = tmp_path / "bare" / "scores.csv"  # no sidecar: the page cannot say, and says "score"
    bare.parent.mkdir()
    shutil.copyfile(scored, bare)
    irank.review(str(bare), output=str(tmp_path / "b"), top=5, image_root_dir=str(Path(sidecar["inputs"]["manifest"]["path"]).parent))
    html = (tmp_path / "b" / "index.html").read_text()
    assert "ranked by score," in html and '<div class="rank">#1 · score ' in html
    assert "score: not named (no sidecar" in html
