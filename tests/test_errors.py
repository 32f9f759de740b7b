"""Every bad input gets a one-line error naming the file, row or flag, exit code 3, and no output file."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from irank.model.checkpoint import read_checkpoint, save_checkpoint


def manifest_copy(tiny_data, folder: Path, rows: int = 20, **changes) -> Path:
    """A manifest in `folder` with the first `rows` tiny training images, copied beside it (relative paths)."""
    table = pd.read_csv(tiny_data["train"]).head(rows)
    (folder / "images").mkdir(exist_ok=True)
    copied = []
    for path in table["path"]:
        target = folder / "images" / Path(path).name
        target.write_bytes((Path(tiny_data["folder"]) / path).read_bytes())
        copied.append(f"images/{target.name}")
    table["path"] = copied
    for column, value in changes.items():
        table[column] = value
    path = folder / "m.csv"
    table.to_csv(path, index=False)
    return path


def assert_clean_failure(result, *needles, output: Path | None = None):
    code, out, err = result
    assert code == 3, (code, err)
    lines = err.strip().splitlines()
    message = lines[-1]  # progress notes may come first; the error is one line, the last
    assert message.startswith("irank: error: ") and sum("error" in line for line in lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in message, message
    if output is not None:
        assert not output.exists()
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]  # no temp file left


def test_missing_manifest(cli, tiny_model, tmp_path):
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, tmp_path / "nope.csv", "-o", out), "nope.csv", "no such file", output=out)


def test_missing_checkpoint(cli, tiny_data, tmp_path):
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tmp_path / "nope.safetensors", tiny_data["train"], "-o", out), "nope.safetensors", output=out)


@pytest.mark.parametrize("drop", ["path", "label"])
def test_missing_column(cli, tiny_data, tiny_model, tmp_path, drop):
    manifest = manifest_copy(tiny_data, tmp_path)
    pd.read_csv(manifest).drop(columns=[drop]).to_csv(manifest, index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "m.csv", f"missing column '{drop}'", output=out)


def test_label_not_in_class_list(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    table = pd.read_csv(manifest)
    table.loc[6, "label"] = "zebra"
    table.to_csv(manifest, index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "row 7", "'zebra'", "class list", output=out)


def test_integer_labels_index_the_class_list(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path, label=2)
    code, _, err = cli("score", tiny_model, manifest, "-o", tmp_path / "s.csv", "-q")
    assert code == 0, err
    assert set(pd.read_csv(tmp_path / "s.csv")["label"]) == {"hstripes"}


def test_duplicate_ids(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path, id=["a", "b", "c", "b"] + [f"x{i}" for i in range(16)])
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "duplicate id 'b'", "rows 2 and 4", output=out)


def test_missing_image(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    table = pd.read_csv(manifest)
    table.loc[4, "path"] = "not-there.png"
    table.to_csv(manifest, index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "not-there.png", "row 5", output=out)


def test_corrupt_image(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    table = pd.read_csv(manifest)
    table.loc[9, "path"] = "broken.png"
    table.to_csv(manifest, index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out, "--num-workers", "1"), "broken.png", "row 10", output=out)


def test_checkpoint_that_does_not_fit_the_architecture(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, tiny_data["train"], "-o", out, "--arch", "small-cnn"),
                         "does not fit --arch small-cnn", "features.3", output=out)


def test_unknown_architecture(cli, tiny_data, tiny_model, tmp_path):
    assert_clean_failure(cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "s.csv", "--arch", "resnet81"),
                         "--arch resnet81", "resnet18")


def test_model_without_linear_head(cli, tiny_data, tmp_path):
    factory = tmp_path / "convnet.py"
    factory.write_text(
        "from torch import nn\n"
        "def build(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, num_classes, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("convnet", factory)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build(4).state_dict(), tmp_path / "conv.pt")
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tmp_path / "conv.pt", tiny_data["train"], "-o", out, "--arch", f"{factory}:build"),
                         "no nn.Linear", "--head", output=out)


def test_output_equal_to_input(cli, tiny_data, tiny_model, tmp_path):
    manifest = manifest_copy(tiny_data, tmp_path)
    before = manifest.read_bytes()
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", manifest), "same file", "manifest")
    assert manifest.read_bytes() == before
    assert_clean_failure(cli("prune", manifest, manifest, "--fraction", "0.1", "-o", manifest), "same file")
    assert manifest.read_bytes() == before


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.2"])
def test_fraction_outside_open_unit_interval(cli, tiny_data, tiny_model, tmp_path, fraction):
    scores = tmp_path / "s.csv"
    assert cli("score", tiny_model, tiny_data["train"], "-o", scores, "-q")[0] == 0
    out = tmp_path / "clean.csv"
    assert_clean_failure(cli("prune", scores, tiny_data["train"], "--fraction", fraction, "-o", out), "--fraction", output=out)


def test_prune_needs_exactly_one_rule(cli, tiny_data, tmp_path):
    out = tmp_path / "clean.csv"
    assert_clean_failure(cli("prune", tiny_data["train"], tiny_data["train"], "-o", out), "exactly one of", output=out)


def test_prune_rejects_a_table_that_is_not_scores(cli, tiny_data, tmp_path):
    out = tmp_path / "clean.csv"
    assert_clean_failure(cli("prune", tiny_data["train"], tiny_data["train"], "--count", "3", "-o", out),
                         "missing column", "irank score", output=out)


def test_nan_logits(cli, tiny_data, tiny_model, tmp_path):
    checkpoint = read_checkpoint(tiny_model)
    from irank.model.checkpoint import build_model

    model = build_model("tiny-cnn", 4)
    model.load_state_dict(checkpoint.state_dict)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    broken = tmp_path / "nan.safetensors"
    save_checkpoint(model, str(broken), checkpoint.metadata)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", broken, tiny_data["train"], "-o", out, "--boundary", "head"), "NaN or infinite", "rows 1, 2, 3", output=out)


def test_malicious_pickle_is_refused_and_not_executed(cli, tiny_data, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"fc.weight": Exploit()}, tmp_path / "evil.pt")
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tmp_path / "evil.pt", tiny_data["train"], "-o", out, "--arch", "tiny-cnn"),
                         "evil.pt", "weights_only", output=out)
    assert not marker.exists()


def test_refine_output_must_be_safetensors(cli, tiny_data, tiny_model, tmp_path):
    out = tmp_path / "refined.pt"
    assert_clean_failure(cli("refine", tiny_model, tiny_data["train"], "-o", out), "safetensors", output=out)


def test_unparseable_command_line_exits_2(cli, tiny_model, tiny_data):
    code, _, _ = cli("score", tiny_model, tiny_data["train"], "-o", "x.csv", "--method", "astrology")
    assert code == 2


def test_on_bad_image_skip_leaves_rows_out_and_lists_them(cli, tiny_data, tiny_model, tmp_path):
    import json

    table = pd.read_csv(tiny_data["train"]).head(20)
    folder = Path(tiny_data["folder"])
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    table.loc[3, "path"] = "images/broken.png"
    table.loc[8, "path"] = "images/missing.png"
    manifest = folder / "skip.csv"
    table.to_csv(manifest, index=False)
    out = tmp_path / "s.csv"
    assert_clean_failure(cli("score", tiny_model, manifest, "-o", out), "broken.png", "row 4", output=out)
    code, _, err = cli("score", tiny_model, manifest, "-o", out, "--on-bad-image", "skip", "-q")
    assert code == 0, err
    scores = pd.read_csv(out)
    assert len(scores) == 18 and "images/broken.png" not in set(scores["path"])
    skipped = json.loads((tmp_path / "s.csv.json").read_text())["skipped_rows"]
    assert [item["row"] for item in skipped] == [4, 9]
    assert "no such file" in skipped[1]["reason"]
    code, _, err = cli("score", tiny_model, manifest, "-o", tmp_path / "t.csv", "--on-bad-image", "ignore")
    assert code == 3 and "--on-bad-image ignore" in err
