"""The Label Studio hand-off: label-studio.json is a list of tasks in Label Studio's import format that fits
label-studio.xml; --image-url-prefix points the image URLs at a server of one's own; and, where the
`label-studio` package is at hand, a real Label Studio project takes the config and the tasks, serves the images
with the set-up the review guide describes, and its JSON export is what `irank apply` reads."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit
from xml.etree import ElementTree

import pandas as pd
import pytest
from test_errors import assert_clean_failure

HELPER = Path(__file__).parent / "helpers" / "label_studio_roundtrip.py"
IMAGES = {"a": "img/a.png", "b": "img/sub dir/b #1.png", "c": "img/c%d.png", "d": "img/é.png"}
LABELS = {"a": "cat", "b": "dog", "c": "cat", "d": "bird"}


def check_label_studio_import(tasks, config_text: str) -> None:
    """Label Studio's JSON import format for image classification with predictions, as this config reads it: a
    list of tasks, each {"data": {...}, "predictions": [{"model_version"?, "score"?, "result": [...]}]}; the data
    holds every $variable the config names (the image a URL string); each result names a Choices control of the
    config (from_name), the object it labels (to_name), type "choices", and value.choices from that control."""
    config = ElementTree.fromstring(config_text)
    assert config.tag == "View"
    objects = {element.get("name"): element for element in config.iter() if element.tag == "Image"}
    controls = {element.get("name"): element for element in config.iter("Choices")}
    assert objects and controls and all(control.get("toName") in objects for control in controls.values())
    choices = {name: [choice.get("value") for choice in control.iter("Choice")] for name, control in controls.items()}
    variables = {value[1:] for element in config.iter() for value in [element.get("value") or ""]
                 if element.tag in ("Image",) and value.startswith("$")}
    headers = [element.get("value") for element in config.iter("Header")]
    variables |= {word.strip(":,()")[1:] for header in headers for word in header.split() if word.startswith("$")}
    assert isinstance(tasks, list) and tasks
    for task in tasks:
        assert isinstance(task, dict) and set(task) <= {"data", "predictions", "annotations", "meta", "id"}
        data = task["data"]
        assert isinstance(data, dict) and variables <= set(data), variables - set(data)
        for element in objects.values():
            url = data[element.get("value")[1:]]
            assert isinstance(url, str) and (url.startswith(("/", "http://", "https://"))), url
        for prediction in task["predictions"]:
            assert set(prediction) <= {"model_version", "score", "result"}
            assert isinstance(prediction.get("model_version", ""), str)
            score = prediction.get("score", 0.0)
            assert isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
            for result in prediction["result"]:
                assert set(result) == {"from_name", "to_name", "type", "value"}
                control = controls[result["from_name"]]
                assert result["to_name"] == control.get("toName") and result["type"] == "choices"
                picked = result["value"]["choices"]
                assert isinstance(picked, list) and set(picked) <= set(choices[result["from_name"]])
                assert control.get("choice") != "single" or len(picked) == 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """root/dataset/: four small images (in a subfolder, with a space, a #, a % and an é in their names), a manifest,
    and a scores table as irank score writes it (no sidecar: images resolve against its folder)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("ls-root")
    folder = root / "dataset"
    for place, path in enumerate(IMAGES.values()):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * place, 100, 200)).save(folder / path)
    ids = list(IMAGES)
    pd.DataFrame({"id": ids, "path": [IMAGES[i] for i in ids], "label": [LABELS[i] for i in ids]}).to_csv(
        folder / "train.csv", index=False)
    pd.DataFrame({
        "rank": [1, 2, 3, 4], "id": ids, "path": [IMAGES[i] for i in ids], "label": [LABELS[i] for i in ids],
        "predicted": ["dog", "cat", "cat", "cat"], "label_prob": [0.1, 0.2, 0.6, 0.3], "predicted_prob": [0.8, 0.7, 0.6, 0.5],
        "loss": [2.3, 1.6, 0.5, 1.2], "score": [4.0, 3.0, 2.0, 1.0], "class_rank": [1, 1, 2, 1],
        "candidate_2": ["cat", "dog", "dog", "bird"], "candidate_2_prob": [0.1, 0.2, 0.3, 0.3], "candidate_3": ["bird"] * 4,
        "candidate_3_prob": [0.1] * 4,
    }).to_csv(folder / "scores.csv", index=False)
    return folder


def test_label_studio_tasks_fit_the_import_format_and_the_config(cli, dataset, tmp_path):
    code, out, err = cli("review", dataset / "scores.csv", "-o", tmp_path / "r", "--json", "-q")
    assert code == 0, err
    tasks = json.loads((tmp_path / "r" / "label-studio.json").read_text())
    check_label_studio_import(tasks, (tmp_path / "r" / "label-studio.xml").read_text())
    assert [task["data"]["irank_id"] for task in tasks] == list(IMAGES)
    for task in tasks:  # local-files URLs: the path under the image root, which Label Studio unquotes
        url = urlsplit(task["data"]["image"])
        assert url.path == "/data/local-files/" and parse_qs(url.query)["d"] == [IMAGES[task["data"]["irank_id"]]]
    assert json.loads(out)["image_url_prefix"] is None


def test_image_url_prefix_points_tasks_at_ones_own_server(cli, dataset, tmp_path):
    prefix = "https://data.example.com/imgs/"
    code, out, err = cli("review", dataset / "scores.csv", "-o", tmp_path / "r", "--image-url-prefix", prefix, "-q")
    assert code == 0, err
    tasks = json.loads((tmp_path / "r" / "label-studio.json").read_text())
    check_label_studio_import(tasks, (tmp_path / "r" / "label-studio.xml").read_text())
    urls = {task["data"]["irank_id"]: task["data"]["image"] for task in tasks}
    assert urls == {"a": prefix + "img/a.png", "b": prefix + "img/sub%20dir/b%20%231.png", "c": prefix + "img/c%25d.png",
                    "d": prefix + "img/" + quote("é") + ".png"}
    assert json.loads((tmp_path / "r" / "review.json").read_text())["image_url_prefix"] == prefix
    code, _, err = cli("review", dataset / "scores.csv", "-o", tmp_path / "s", "--image-url-prefix", "/media/", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "label-studio.json").read_text())[0]["data"]["image"] == "/media/img/a.png"


@pytest.mark.parametrize(("extra", "needle"), [
    (["--image-url-prefix", "ftp://host/imgs/"], "must start with http://, https:// or /"),
    (["--image-url-prefix", "imgs/"], "must start with http://, https:// or /"),
    (["--image-url-prefix", ""], "must start with http://, https:// or /"),
    (["--image-url-prefix", "https://host/my imgs/"], "space or control character"),
    (["--image-url-prefix", "https://host/", "--label-studio-root", "."], "--label-studio-root applies to"),
])
def test_a_bad_image_url_prefix_is_one_line_and_writes_nothing(cli, dataset, tmp_path, extra, needle):
    output = tmp_path / "r"
    assert_clean_failure(cli("review", dataset / "scores.csv", "-o", output, *extra), needle, output=output)


def label_studio_python() -> str | None:
    """A Python that has the `label-studio` package: $IRANK_LABEL_STUDIO_PYTHON, else this one if it has it."""
    if os.environ.get("IRANK_LABEL_STUDIO_PYTHON"):
        return os.environ["IRANK_LABEL_STUDIO_PYTHON"]
    return sys.executable if importlib.util.find_spec("label_studio") else None


@pytest.mark.skipif(label_studio_python() is None, reason="needs the label-studio package (large, and not in the test "
                    "extra): pip install label-studio here, or set IRANK_LABEL_STUDIO_PYTHON to a Python that has it")
def test_a_real_label_studio_project_takes_the_pack_serves_its_images_and_exports_what_apply_reads(cli, dataset, tmp_path):
    document_root = dataset.parent  # Label Studio refuses a storage on its document root itself: the folder above
    code, _, err = cli("review", dataset / "scores.csv", "-o", tmp_path / "r", "--label-studio-root", document_root, "-q")
    assert code == 0, err
    decisions = {"a": "dog", "b": "remove", "c": "cat"}  # relabel, remove, keep (its given label); d: not annotated
    (tmp_path / "decisions.json").write_text(json.dumps(decisions))
    (tmp_path / "work").mkdir()
    completed = subprocess.run([label_studio_python(), str(HELPER), str(tmp_path / "r"), str(document_root), str(dataset),
                                str(tmp_path / "work"), str(tmp_path / "decisions.json")],
                               capture_output=True, text=True, timeout=900, cwd=tmp_path / "work")
    lines = [line for line in completed.stdout.splitlines() if line.startswith("IRANK-REPORT ")]
    assert completed.returncode == 0 and lines, completed.stderr[-3000:]
    report = json.loads(lines[0].removeprefix("IRANK-REPORT "))
    assert report["create_project"] == 201, report
    assert report["import"][0] == 201 and report["import"][1]["task_count"] == 4 and report["import"][1]["prediction_count"] == 4
    assert report["storage"] == [201, None] and report["tasks"] == 4 and report["predictions"] == 4
    for sample_id, (status, body) in report["images"].items():  # every image, served by Label Studio as it is on disk
        assert status == 200 and bytes.fromhex(body) == (dataset / IMAGES[sample_id]).read_bytes(), sample_id
    assert report["annotations"] == [201, 201, 201] and report["export"] == 200 and report["network_attempts"] == []
    code, _, err = cli("apply", tmp_path / "work" / "export.json", dataset / "train.csv", "-o", tmp_path / "fixed.csv",
                       "--audit", tmp_path / "audit.csv")
    assert code == 0, err
    audit = pd.read_csv(tmp_path / "audit.csv", dtype=str, keep_default_na=False).set_index("id")
    assert audit["decision"].to_dict() == {"a": "relabel", "b": "remove", "c": "keep"}  # d: no annotation, no change
    fixed = pd.read_csv(tmp_path / "fixed.csv", dtype=str, keep_default_na=False).set_index("id")
    assert fixed["label"].to_dict() == {"a": "dog", "c": "cat", "d": "bird"}
