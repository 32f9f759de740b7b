"""Layer features and probes on a refit linear boundary."""

from pathlib import Path

import pytest
import torch

from irank.core.metrics import auroc
from irank.core.probe import heldout_probe_loss, probe_scores
from irank.model.checkpoint import build_model
from irank.model.inputs import make_loader
from irank.model.layers import candidate_layers, layer_features, pool
from irank.model.prepare import prepare
from irank.options import BoundaryOptions, ModelOptions


def test_pool_shapes():
    assert pool(torch.randn(2, 3, 4, 4)).shape == (2, 6)
    assert pool(torch.randn(2, 5, 7)).shape == (2, 7)
    assert pool(torch.randn(2, 9)).shape == (2, 9)
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 0, 0] = 4.0
    assert pool(maps).tolist() == [[1.0, 4.0]]


def test_candidate_layers_in_run_order():
    model = build_model("tiny-cnn", 3)
    names = [name for name, *_ in candidate_layers(model, torch.zeros(1, 3, 16, 16))]
    assert names.index("features.0") < names.index("features.2") < names.index("fc")
    shapes = {name: shape for name, _, shape, _ in candidate_layers(model, torch.zeros(1, 3, 16, 16))}
    assert shapes["features.1"] == (16, 4, 4) and shapes["fc"] == (3,)


def test_layer_features_stop_early_and_match_a_full_pass(tiny_data, tiny_model):
    prepared = prepare(tiny_model, tiny_data["train"], ModelOptions())
    loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=64)
    features = layer_features(prepared.model, "features.1", loader, num_rows=240, device=torch.device("cpu"))
    images = torch.stack([loader.dataset[i][0] for i in range(5)])
    with torch.no_grad():
        expected = pool(prepared.model.features[:2](images))
    assert features.shape == (240, 32)
    assert torch.allclose(features[:5], expected, atol=1e-5)


def test_probe_finds_flipped_labels_and_heldout_loss_prefers_informative_features():
    torch.manual_seed(0)
    n, classes = 300, 3
    truth = torch.arange(n) % classes
    informative = torch.nn.functional.one_hot(truth, classes).float() * 3 + torch.randn(n, classes)
    noise = torch.randn(n, classes)
    labels = truth.clone()
    flipped = torch.arange(n) % 10 == 0
    labels[flipped] = (truth[flipped] + 1) % classes
    for measure in ("loss", "margin", "self-influence", "boundary-shift"):
        scores, _, _ = probe_scores(informative, labels, classes, l2=0.01, measure=measure)
        assert auroc(scores.numpy(), flipped.numpy()) > 0.9, measure
    assert heldout_probe_loss(informative, labels, classes, l2=0.01) < heldout_probe_loss(noise, labels, classes, l2=0.01)


def test_score_on_a_refit_boundary_with_auto_layer(cli, tiny_data, tiny_model, tmp_path):
    import json

    import pandas as pd

    out = tmp_path / "s.csv"
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", out, "--boundary", "refit", "--layer", "auto", "-q")
    assert code == 0, err
    parameters = json.loads((tmp_path / "s.csv.json").read_text())["parameters"]
    assert parameters["boundary"] == "refit" and parameters["layer"] in parameters["layers"]
    figures = parameters["layers"]
    eligible = [f for f in figures.values() if not f["memorized"]] or list(figures.values())
    assert figures[parameters["layer"]]["heldout_loss"] == min(f["heldout_loss"] for f in eligible)
    table = pd.read_csv(out)
    assert auroc(table["score"].to_numpy(), (table["label"] != table["true_label"]).to_numpy()) > 0.85


def test_score_refit_on_a_named_layer_and_bad_layer(cli, tiny_data, tiny_model, tmp_path):
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "s.csv", "--boundary", "refit",
                       "--layer", "features.2", "--method", "loss", "-q")
    assert code == 0, err
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "t.csv", "--boundary", "refit",
                       "--layer", "features.9")
    assert code == 3 and "--layer features.9" in err and "irank layers" in err
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "u.csv", "--boundary", "head", "--layer", "features.2")
    assert code == 3 and "--boundary refit" in err
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "v.csv", "--influence-measure", "parameter-shift")
    assert code == 3 and "--influence-measure parameter-shift" in err and "--boundary head" in err
    assert not (tmp_path / "v.csv").exists()


def test_layers_command_lists_candidates(cli, tiny_model):
    import json

    code, out, err = cli("layers", tiny_model, "--image-size", "16", "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)["layers"]}
    assert rows["features.1"]["candidate"] and rows["features.1"]["shape"] == [16, 4, 4]
    assert not rows["fc"]["candidate"]


def test_refit_on_a_middle_layer_writes_a_cut_model_that_eval_and_score_run(cli, tiny_data, tiny_model, tmp_path):
    import json

    from irank.model.checkpoint import read_checkpoint

    out = tmp_path / "cut.safetensors"
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", out, "--scope", "refit", "--layer", "features.2",
                       "--l2", "0.01", "-q")
    assert code == 0, err
    meta = read_checkpoint(str(out)).metadata
    assert meta["probe"] == {"layer": "features.2", "in_features": 64} and meta["head"] == "probe"
    code, text, err = cli("eval", out, tiny_data["test"], "--json", "-q")
    assert code == 0, err
    assert json.loads(text)["accuracy"] > 0.7
    code, _, err = cli("score", out, tiny_data["train"], "-o", tmp_path / "s.csv", "-q")
    assert code == 0, err
    code, _, err = cli("refine", tiny_model, tiny_data["train"], "-o", tmp_path / "x.safetensors", "--layer", "features.2")
    assert code == 3 and "--scope refit" in err


def noisy_labels(n: int, classes: int, flip_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(true classes, given labels): every `flip_every`-th row's label moved to the next class."""
    truth = torch.arange(n) % classes
    labels = truth.clone()
    flipped = torch.arange(n) % flip_every == 0
    labels[flipped] = (truth[flipped] + 1) % classes
    return truth, labels


def test_auto_layer_skips_a_layer_that_memorized_the_given_labels():
    from irank.core.layer_choice import choose_layer

    torch.manual_seed(0)
    n, classes = 400, 4
    truth, labels = noisy_labels(n, classes, flip_every=5)
    memorized = torch.nn.functional.one_hot(labels, classes).float() * 5 + 0.1 * torch.randn(n, classes)
    structured = torch.nn.functional.one_hot(truth, classes).float() * 2 + torch.randn(n, classes)
    choice = choose_layer({"deep": memorized, "middle": structured}, labels, classes, l2=0.1)
    assert choice.figures["deep"]["memorized"] and not choice.figures["middle"]["memorized"]
    # The trap: the memorized layer's held-out loss is the lower one, so it is not even computed.
    assert heldout_probe_loss(memorized, labels, classes, l2=0.1) < choice.figures["middle"]["heldout_loss"]
    assert choice.figures["deep"]["heldout_loss"] is None
    assert choice.layer == "middle"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_layer_choice_fitted_on_the_gpu_is_the_cpu_choice():
    from irank.core.layer_choice import choose_layer, choose_layer_by_accuracy

    torch.manual_seed(0)
    n, classes = 400, 4
    truth, labels = noisy_labels(n, classes, flip_every=5)
    features = {"deep": torch.nn.functional.one_hot(labels, classes).float() * 5 + 0.1 * torch.randn(n, classes),
                "middle": torch.nn.functional.one_hot(truth, classes).float() * 2 + torch.randn(n, classes),
                "early": torch.randn(n, 6)}
    cpu = choose_layer(features, labels, classes, l2=0.1)
    gpu = choose_layer(features, labels, classes, l2=0.1, device=torch.device("cuda"))
    assert gpu.layer == cpu.layer == "middle"
    for name in features:
        assert gpu.figures[name]["agreement"] == pytest.approx(cpu.figures[name]["agreement"], abs=0.01)
        if cpu.figures[name]["heldout_loss"] is not None:
            assert gpu.figures[name]["heldout_loss"] == pytest.approx(cpu.figures[name]["heldout_loss"], rel=1e-3)
    val = {name: values[:100] for name, values in features.items()}
    by_accuracy = choose_layer_by_accuracy(features, labels, val, truth[:100], classes, l2=0.1, device=torch.device("cuda"))
    assert by_accuracy.layer == choose_layer_by_accuracy(features, labels, val, truth[:100], classes, l2=0.1).layer


def test_layer_choice_runs_on_a_fixed_size_sample_of_a_large_data_set():
    from irank.core import layer_choice as boundary

    torch.manual_seed(0)
    n, classes = 600, 3
    labels = torch.arange(n) % classes
    good = torch.nn.functional.one_hot(labels, classes).float() + 0.8 * torch.randn(n, classes)
    weak = torch.nn.functional.one_hot(labels, classes).float() * 0.2 + torch.randn(n, classes)
    full = boundary.choose_layer({"good": good, "weak": weak}, labels, classes, l2=0.1)
    sampled = boundary.choose_layer({"good": good, "weak": weak}, labels, classes, l2=0.1, max_rows=200)
    assert full.layer == sampled.layer == "good"
    assert "random sample of 200 rows" in sampled.how and "sample" not in full.how
    assert sampled.figures["good"]["heldout_loss"] != full.figures["good"]["heldout_loss"]


def test_auto_layer_on_a_sample_then_the_rest_up_to_the_chosen_layer(tiny_data, tiny_model):
    # Past CHOICE_ROWS rows, score reads the candidates on a sample, chooses, then runs the other rows
    # only up to the chosen layer. Stitched back together, the features must be those of that layer
    # for every row in its place: the scores equal a run with the layer named.
    import numpy as np

    import irank

    run = irank.RunOptions(device="cpu", batch_size=32)
    auto = irank.score(tiny_model, tiny_data["train"], run_options=run, boundary=BoundaryOptions(choice_rows=100))
    parameters = auto.sidecar["parameters"]
    assert "random sample of 100 rows" in parameters["layer_choice"]
    named = irank.score(tiny_model, tiny_data["train"], run_options=run,
                        boundary=BoundaryOptions(kind="refit", layer=parameters["layer"]))
    by_id = named.table.set_index("id")["score"]
    assert np.allclose(auto.table["score"].to_numpy(), by_id.loc[auto.table["id"]].to_numpy(), rtol=1e-4, atol=1e-9)


def test_val_choice_keeps_the_layer_that_predicts_the_clean_labels():
    from irank.core.layer_choice import choose_layer_by_accuracy

    torch.manual_seed(0)
    n, classes = 400, 4
    truth, labels = noisy_labels(n, classes, flip_every=4)
    val_truth = torch.arange(200) % classes
    features = {  # "deep" encodes the given labels, wrong ones too; on unseen rows it carries no class
        "middle": torch.nn.functional.one_hot(truth, classes).float() * 3 + torch.randn(n, classes),
        "deep": torch.nn.functional.one_hot(labels, classes).float() * 5 + 0.1 * torch.randn(n, classes),
    }
    val = {"middle": torch.nn.functional.one_hot(val_truth, classes).float() * 3 + torch.randn(200, classes),
           "deep": torch.randn(200, classes)}
    choice = choose_layer_by_accuracy(features, labels, val, val_truth, classes, l2=0.1)
    assert choice.layer == "middle" and "--val" in choice.how and choice.figures["deep"]["memorized"]
    # A memorized layer stays out even when its probe is the more accurate on the clean set.
    accurate = dict(val, deep=torch.nn.functional.one_hot(val_truth, classes).float() * 9)
    assert choose_layer_by_accuracy(features, labels, accurate, val_truth, classes, l2=0.1).layer == "middle"
    assert choice.figures["middle"]["val_accuracy"] > 0.7 > 0.45 > choice.figures["deep"]["val_accuracy"]
    same = choose_layer_by_accuracy({"a": features["middle"], "b": features["middle"]}, labels,
                                    {"a": val["middle"], "b": val["middle"]}, val_truth, classes, l2=0.1)
    assert same.layer == "b"  # a tie goes to the deeper layer


def test_score_chooses_the_layer_by_val_accuracy(cli, tiny_data, tiny_model, tmp_path):
    import json

    out = tmp_path / "s.csv"
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", out, "--val", tiny_data["test"], "-q")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "s.csv.json").read_text())
    parameters = sidecar["parameters"]
    figures = parameters["layers"]
    assert "--val" in parameters["layer_choice"] and all("val_accuracy" in f for f in figures.values())
    eligible = [f for f in figures.values() if not f["memorized"]] or list(figures.values())
    assert figures[parameters["layer"]]["val_accuracy"] == max(f["val_accuracy"] for f in eligible)
    assert sidecar["inputs"]["val"]["path"] == tiny_data["test"]

    post = tmp_path / "post"
    code, _, err = cli("post-train", tiny_model, tiny_data["train"], "--out-dir", post, "--boundary", "refit",
                       "--layer", "auto", "--scope", "refit", "--budget", "0.1", "--rounds", "1", "--val",
                       tiny_data["test"], "-q")
    assert code == 0, err
    summary = json.loads((post / "summary.json").read_text())
    assert "--val" in summary["layer_choice"]["layer_choice"]


def test_val_needs_an_auto_layer_and_the_manifest_classes(cli, tiny_data, tiny_model, tmp_path):
    import pandas as pd

    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "s.csv", "--boundary", "head",
                       "--val", tiny_data["test"])
    assert code == 3 and "--val" in err and err.strip().count("\n") == 0
    odd = pd.read_csv(tiny_data["test"])
    odd.loc[3, "label"] = "unicorn"
    odd_path = Path(tiny_data["test"]).parent / "odd-val.csv"
    odd.to_csv(odd_path, index=False)
    code, _, err = cli("score", tiny_model, tiny_data["train"], "-o", tmp_path / "s.csv", "--val", odd_path, "-q")
    assert code == 3 and "odd-val.csv" in err and "unicorn" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "s.csv").exists()
