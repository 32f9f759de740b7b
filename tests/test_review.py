"""score → review → (annotators edit review.csv) → apply, the CI gate of score, and their error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import irank
from irank.formats.scores_table import class_names_of, top_classes

CLASSES = ["cross", "disk", "hstripes", "vstripes"]


def assert_clean_failure(result, *needles, output: Path | None = None):
    code, _, err = result
    assert code == 3, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("irank: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    if output is not None:
        assert not output.exists()
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


@pytest.fixture(scope="module")
def scored(tiny_data, tiny_model, tmp_path_factory) -> str:
    output = str(tmp_path_factory.mktemp("review-scores") / "scores.csv")
    irank.score(tiny_model, tiny_data["train"], output=output, run_options=irank.RunOptions(device="cpu"))
    return output


@pytest.fixture(scope="module")
def pack(scored, tmp_path_factory) -> Path:
    """A review pack of the 20 most influential rows, written through the library function."""
    folder = tmp_path_factory.mktemp("pack") / "review"
    irank.review(scored, output=str(folder), top=20)
    return folder


@pytest.fixture
def manifest_here(tiny_data, tmp_path) -> Path:
    """A byte copy of the scored manifest in tmp_path, so outputs beside it need no path rebasing."""
    copy = tmp_path / "train.csv"
    shutil.copyfile(tiny_data["train"], copy)
    return copy


def test_top_classes_name_the_second_and_third_most_probable_classes():
    probs = np.array([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    names = np.array(["a", "b", "c"], dtype=object)
    columns = top_classes(probs, np.array([0, 2]))
    assert list(class_names_of(columns["candidate_2"], names)) == ["c", "a"]
    assert list(class_names_of(columns["candidate_3"], names)) == ["a", "b"]
    assert np.allclose(columns["candidate_2_prob"], [0.3, 0.2]) and np.allclose(columns["candidate_3_prob"], [0.1, 0.2])
    assert list(class_names_of(columns["predicted"], names)) == ["b", "c"] and np.allclose(columns["label_prob"], [0.1, 0.6])
    two = top_classes(np.array([[0.7, 0.3]]), np.array([1]))
    assert list(class_names_of(two["candidate_2"], names[:2])) == ["b"]
    assert list(class_names_of(two["candidate_3"], names[:2])) == [""] and np.isnan(two["candidate_3_prob"][0])


def test_scores_carry_the_runner_up_candidates(scored):
    table = pd.read_csv(scored)
    assert (table["candidate_2"] != table["predicted"]).all() and (table["candidate_3"] != table["candidate_2"]).all()
    assert (table["predicted_prob"] >= table["candidate_2_prob"]).all()
    assert (table["candidate_2_prob"] >= table["candidate_3_prob"]).all()


def test_review_pack_holds_the_top_rows_in_every_file(pack, scored):
    assert sorted(p.name for p in pack.iterdir()) == ["index.html", "label-studio.json", "label-studio.xml", "review.csv", "review.json"]
    assert not [p for p in pack.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    scores = pd.read_csv(scored)
    top_ids = scores["id"][:20].tolist()

    review = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)
    assert review["id"].tolist() == top_ids
    assert list(review.columns[:4]) == ["rank", "id", "decision", "new_label"]
    assert (review["decision"] == "").all() and (review["new_label"] == "").all()
    assert "true_label" in review.columns  # the manifest's own columns come along

    html = (pack / "index.html").read_text()
    assert html.count('<article class="card') == 20 and html.count('<img src="') == 20
    assert html.count('src="data:image/png;base64,') == 20  # thumbnails embedded
    assert "http://" not in html and "https://" not in html  # nothing fetched from a network
    first = scores.iloc[0]
    assert f'data-id="{first["id"]}"' in html and f"suggested: <b>{first['predicted']}</b>" in html
    assert f"next: {first['candidate_2']} " in html

    tasks = json.loads((pack / "label-studio.json").read_text())
    assert [task["data"]["irank_id"] for task in tasks] == top_ids
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [first["predicted"]]
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=" + first["path"]  # relative to the manifest's folder
    config = (pack / "label-studio.xml").read_text()
    assert all(f'<Choice value="{name}"/>' in config for name in CLASSES)
    summary = json.loads((pack / "review.json").read_text())
    assert summary["classes"] == CLASSES and summary["flagged_rows"] == 20 and summary["missing_images"] == 0
    assert summary["cut_score"] == pytest.approx(scores["score"][19])


def test_review_per_class_fraction_takes_from_each_class(cli, scored, tmp_path):
    code, out, err = cli("review", scored, "-o", tmp_path / "r", "--fraction", "0.1", "--per-class", "--json", "-q")
    assert code == 0, err
    scores = pd.read_csv(scored)
    review = pd.read_csv(tmp_path / "r" / "review.csv")
    expected = {label: int(round(0.1 * len(group))) for label, group in scores.groupby("label")}
    assert review["label"].value_counts().to_dict() == expected
    assert (review["class_rank"] <= review["label"].map(expected)).all()
    assert json.loads(out)["flagged_per_class"] == expected


def test_review_shows_a_placeholder_and_warns_for_a_missing_image(cli, scored, tmp_path):
    table = pd.read_csv(scored)
    table.loc[1, "path"] = "gone/nowhere.png"
    moved = tmp_path / "scores.csv"
    table.to_csv(moved, index=False)
    shutil.copyfile(scored + ".json", str(moved) + ".json")  # still points at the scored manifest's folder
    code, _, err = cli("review", moved, "-o", tmp_path / "r", "--top", "5")
    assert code == 0, err
    assert "1 of 5 images not found" in err and "nowhere.png" in err
    html = (tmp_path / "r" / "index.html").read_text()
    assert html.count('<img src="') == 5 and html.count('class="card missing"') == 1
    assert html.count('src="data:image/svg+xml;base64,') == 1


def test_review_image_root_overrides_the_sidecar(cli, scored, tmp_path):
    code, _, err = cli("review", scored, "-o", tmp_path / "r", "--top", "3", "--image-root", tmp_path)
    assert code == 0, err
    assert "3 of 3 images not found" in err


def test_round_trip_applies_exactly_the_edits(cli, pack, manifest_here, tmp_path):
    review = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)
    relabeled, removed, kept = review.iloc[0], review.iloc[1], review.iloc[2]
    new_label = relabeled["predicted"] if relabeled["predicted"] != relabeled["label"] else relabeled["candidate_2"]
    review.loc[0, ["decision", "new_label"]] = ["relabel", new_label]
    review.loc[1, "decision"] = "remove"
    review.loc[2, "decision"] = "Keep "  # spreadsheets add capitals and spaces
    edited_in_pack = tmp_path / "review.csv"  # a copy of the pack, edited by the annotator
    review.to_csv(edited_in_pack, index=False)
    shutil.copyfile(pack / "review.json", tmp_path / "review.json")
    fixed, audit = tmp_path / "fixed.csv", tmp_path / "audit.csv"
    code, out, err = cli("apply", edited_in_pack, manifest_here, "-o", fixed, "--audit", audit, "--json")
    assert code == 0, err
    assert "classes from the review pack" in err
    manifest = pd.read_csv(manifest_here, dtype=str, keep_default_na=False)
    expected = manifest.copy()
    expected.loc[expected["path"] == relabeled["id"], "label"] = new_label
    expected = expected[expected["path"] != removed["id"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_csv(fixed, dtype=str, keep_default_na=False), expected)
    log = pd.read_csv(audit, dtype=str, keep_default_na=False)
    assert list(log.columns) == ["id", "old_label", "new_label", "decision"]
    assert log.iloc[0].tolist() == [relabeled["id"], relabeled["label"], new_label, "relabel"]
    assert log.iloc[1].tolist() == [removed["id"], removed["label"], "", "remove"]
    assert log.iloc[2].tolist() == [kept["id"], kept["label"], kept["label"], "keep"]
    assert len(log) == 20 and set(log["decision"][3:]) == {"keep"}
    summary = json.loads(out)
    assert (summary["relabeled"], summary["removed"], summary["kept"], summary["output_rows"]) == (1, 1, 18, 239)


def test_library_round_trip_with_a_label_studio_export(pack, manifest_here, tmp_path):
    tasks = json.loads((pack / "label-studio.json").read_text())
    target = next(name for name in CLASSES if name != tasks[0]["data"]["given_label"])
    tasks[0]["annotations"] = [{"result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                            "value": {"choices": [target]}}]}]
    tasks[1]["annotations"] = [{"result": [{"from_name": "irank_decision", "to_name": "image", "type": "choices",
                                            "value": {"choices": ["remove from the data set"]}}]}]
    tasks[2]["annotations"] = [{"was_cancelled": True, "result": [{"from_name": "label", "value": {"choices": [target]}}]}]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    result = irank.apply_review(str(export), str(manifest_here), output=str(tmp_path / "fixed.csv"))
    manifest = pd.read_csv(manifest_here, dtype=str, keep_default_na=False)
    fixed = pd.read_csv(tmp_path / "fixed.csv", dtype=str, keep_default_na=False)
    assert len(fixed) == len(manifest) - 1 and tasks[1]["data"]["irank_id"] not in set(fixed["path"])
    assert fixed.set_index("path").loc[tasks[0]["data"]["irank_id"], "label"] == target
    changed = fixed.merge(manifest, on="path", suffixes=("", "_before"))
    assert (changed["label"] != changed["label_before"]).sum() == 1
    assert result.summary["class_source"] == "the labels found in the manifest"


def edited_review(pack: Path, tmp_path: Path, **first_row) -> Path:
    review = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)
    for column, value in first_row.items():
        review.loc[0, column] = value
    path = tmp_path / "reviewed.csv"
    review.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("edit, needles", [
    ({"decision": "relabel", "new_label": "triangle"}, ["row 1", "new_label 'triangle' is not a class", "cross, disk"]),
    ({"decision": "relabel", "new_label": ""}, ["row 1", "decision relabel needs a new_label"]),
    ({"decision": "maybe"}, ["row 1", "decision 'maybe' is not one of keep, relabel, remove"]),
    ({"decision": "", "new_label": "<another class>"}, ["row 1", "set the decision to relabel"]),
    ({"id": "images/not-there.png", "decision": "remove"}, ["row 1", "'images/not-there.png'", "not in the manifest"]),
])
def test_apply_refuses_a_bad_row_naming_it(cli, pack, manifest_here, tmp_path, edit, needles):
    if edit.get("new_label") == "<another class>":
        given = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)["label"][0]
        edit = {**edit, "new_label": next(name for name in CLASSES if name != given)}
    reviewed = edited_review(pack, tmp_path, **edit)
    fixed = tmp_path / "fixed.csv"
    assert_clean_failure(cli("apply", reviewed, manifest_here, "-o", fixed, "--audit", tmp_path / "audit.csv"),
                         "reviewed.csv", *needles, output=fixed)
    assert not (tmp_path / "audit.csv").exists()


def test_apply_refuses_an_id_reviewed_twice(cli, pack, manifest_here, tmp_path):
    review = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)
    reviewed = tmp_path / "reviewed.csv"
    pd.concat([review, review.head(1)]).to_csv(reviewed, index=False)
    fixed = tmp_path / "fixed.csv"
    assert_clean_failure(cli("apply", reviewed, manifest_here, "-o", fixed), "row 21", "already reviewed in row 1", output=fixed)


def test_apply_classes_file_allows_a_new_class(cli, pack, manifest_here, tmp_path):
    reviewed = edited_review(pack, tmp_path, decision="relabel", new_label="triangle")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES + ["triangle"]) + "\n")
    fixed = tmp_path / "fixed.csv"
    code, _, err = cli("apply", reviewed, manifest_here, "-o", fixed, "--classes", tmp_path / "classes.txt")
    assert code == 0, err
    assert "classes from --classes" in err
    assert (pd.read_csv(fixed)["label"] == "triangle").sum() == 1


def test_apply_never_writes_over_its_input(cli, pack, manifest_here, tmp_path):
    reviewed = edited_review(pack, tmp_path)
    assert_clean_failure(cli("apply", reviewed, manifest_here, "-o", manifest_here), "refusing to overwrite an input")


def test_review_replaces_an_untouched_pack_but_not_an_annotators_work(cli, scored, tmp_path):
    folder = tmp_path / "r"
    assert cli("review", scored, "-o", folder, "--top", "5", "-q")[0] == 0
    assert_clean_failure(cli("review", scored, "-o", folder, "--top", "7", "-q"), "already holds a review pack", "--overwrite")
    assert len(pd.read_csv(folder / "review.csv")) == 5
    code, _, err = cli("review", scored, "-o", folder, "--top", "7", "-q", "--overwrite")
    assert code == 0, err
    assert len(pd.read_csv(folder / "review.csv")) == 7
    review = pd.read_csv(folder / "review.csv", dtype=str, keep_default_na=False)
    review.loc[0, "decision"] = "remove"
    review.to_csv(folder / "review.csv", index=False)
    assert_clean_failure(cli("review", scored, "-o", folder, "--top", "5", "--overwrite"), "1 rows filled in", "refusing to overwrite")
    assert len(pd.read_csv(folder / "review.csv")) == 7
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_clean_failure(cli("review", scored, "-o", other), "not an irank review pack")


@pytest.mark.parametrize("args, needles", [
    (["--top", "0"], ["--top 0"]),
    (["--top", "3", "--fraction", "0.1"], ["--top or --fraction"]),
    (["--fraction", "1.5"], ["--fraction 1.5"]),
])
def test_review_refuses_bad_flags(cli, scored, tmp_path, args, needles):
    out = tmp_path / "r"
    assert_clean_failure(cli("review", scored, "-o", out, *args), *needles, output=out)


# The CI gate. The tiny model disagrees with about 10% of the (noisy) labels.

def test_gate_passes_under_the_threshold(cli, tiny_data, tiny_model, tmp_path):
    output = tmp_path / "s.csv"
    code, out, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu", "--boundary", "head", "--fail-over", "0.9", "--json")
    assert code == 0, err
    payload = json.loads(out)
    reference = (Path(__file__).resolve().parent.parent / "docs" / "reference" / "json-output.md").read_text()
    score_section = reference.split("## score", 1)[1].split("\n## ", 1)[0]
    assert [key for key in [*payload, *payload["gate"], *payload["summary"]] if f"`{key}`" not in score_section] == []
    gate = payload["gate"]
    assert gate["failed"] is False and gate["measure"] == "estimated_noise_share" and 0 < gate["share"] < 0.9
    assert "gate passed" in err


def test_gate_fails_over_the_threshold_but_keeps_the_scores(cli, tiny_data, tiny_model, tmp_path):
    output = tmp_path / "s.csv"
    code, out, err = cli("score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu", "-q", "--boundary", "head", "--fail-over", "0.01")
    assert code == 4, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("irank: gate failed: estimated share of mislabeled samples"), err
    assert "exceeds --fail-over 0.01" in lines[0]
    assert len(pd.read_csv(output)) == 240 and (tmp_path / "s.csv.json").exists()


def test_gate_on_the_share_of_high_scores(cli, scored, tiny_data, tiny_model, tmp_path):
    """--fail-score gates on score values: auto ranks by the probe's loss there (the joint loss is a share of rows)."""
    losses = tmp_path / "loss.csv"
    assert cli("score", tiny_model, tiny_data["train"], "-o", losses, "--device", "cpu", "-q", "--method", "loss")[0] == 0
    threshold = float(pd.read_csv(losses)["score"].iloc[11])  # 12 of 240 rows (5%) score at least this
    output = tmp_path / "s.csv"
    base = ["score", tiny_model, tiny_data["train"], "-o", output, "--device", "cpu", "-q", "--fail-score", repr(threshold)]
    code, out, err = cli(*base, "--fail-over", "0.04", "--json")
    assert code == 4 and "share of samples with score >=" in err
    assert json.loads(out)["gate"]["share"] == pytest.approx(12 / 240)
    code, _, err = cli(*base, "--fail-over", "0.05", "--overwrite")
    assert code == 0, err


def test_gate_library_function_matches_the_estimate(scored):
    table = pd.read_csv(scored)
    share = float((table["label"] != table["predicted"]).mean())
    assert irank.check_gate(table, fail_over=share).failed is False
    assert irank.check_gate(table, fail_over=share - 1e-9).failed is True


@pytest.mark.parametrize("args, needles", [
    (["--fail-score", "1.0"], ["--fail-score needs --fail-over"]),
    (["--fail-over", "1.5"], ["--fail-over 1.5"]),
    (["--boundary", "refit", "--fail-over", "0.3"], ["--fail-over", "--boundary head"]),
])
def test_gate_refuses_bad_flags_before_scoring(cli, tiny_data, tiny_model, tmp_path, args, needles):
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, tiny_data["train"], "-o", out, *args), *needles, output=out)


def test_exit_code_4_is_documented_in_help_and_the_docs(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "4 the CI gate" in " ".join(out.split())
    codes = (Path(__file__).resolve().parent.parent / "docs" / "reference" / "exit-codes.md").read_text()
    assert "\n| 4 | the CI gate failed" in codes


def test_review_escapes_odd_class_names_and_falls_back_to_the_scores_folder(tmp_path):
    from PIL import Image

    odd = '<b>"cats" & dogs</b>'
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / name)
    scores = pd.DataFrame({
        "rank": [1, 2, 3], "id": ["a", "b", "c"], "path": ["img/a.png", "img/b.png", "img/c.png"],
        "label": [odd, "plain", odd], "predicted": ["plain", odd, odd], "label_prob": [0.1, 0.2, 0.9],
        "predicted_prob": [0.9, 0.8, 0.9], "loss": [2.3, 1.6, 0.1], "score": [3.0, 2.0, 1.0], "class_rank": [1, 1, 2],
        "candidate_2": [odd, "plain", "plain"], "candidate_2_prob": [0.1, 0.2, 0.1], "candidate_3": ["", "", ""],
        "candidate_3_prob": [None, None, None],
    })
    scores.to_csv(tmp_path / "scores.csv", index=False)  # no sidecar: images resolve against this folder
    result = irank.review(str(tmp_path / "scores.csv"), output=str(tmp_path / "r"), top=2)
    assert result.missing_images == [] and result.summary["image_root_source"].startswith("the scores file's folder")
    assert result.summary["classes"] == sorted([odd, "plain"])
    html = (tmp_path / "r" / "index.html").read_text()
    assert odd not in html and "&lt;b&gt;&quot;cats&quot; &amp; dogs&lt;/b&gt;" in html
    # each row's 2nd candidate is its given label, which "next:" does not repeat; an empty 3rd candidate is left out
    assert html.count('<article class="card') == 2 and html.count("next: —") == 2
    from xml.etree import ElementTree

    config = ElementTree.parse(tmp_path / "r" / "label-studio.xml").getroot()
    assert [choice.get("value") for choice in config.find("Choices").iter("Choice")] == sorted([odd, "plain"])
