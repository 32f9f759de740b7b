"""The array-level API: the same scores and selection as the file-level stages, from arrays or a model and a
Dataset, with no files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_tensor_inputs import embeddings, mlp_model  # noqa: F401  (module fixtures)

import irank
from irank.model.checkpoint import read_checkpoint


def _model_of(checkpoint_path):
    from irank.model.checkpoint import build_model, load_weights

    checkpoint = read_checkpoint(str(checkpoint_path))
    model = build_model(checkpoint.metadata["arch"], len(checkpoint.metadata["classes"]))
    load_weights(model, checkpoint, checkpoint.metadata["arch"])
    return model.eval(), checkpoint.metadata["classes"]


@pytest.mark.parametrize("method", ["loss", "auto"])
def test_probe_scores_from_features_equal_irank_score(cli, embeddings, mlp_model, tmp_path, method):  # noqa: F811
    """The probe's loss from features alone, and the default (the joint loss) from features and the head's logits:
    the scores irank score writes, row for row."""
    out = tmp_path / "s.csv"
    code, _, err = cli("score", mlp_model, embeddings["train"], "-o", out, "--layer", "input", "--device", "cpu", "-q",
                       "--method", method)
    assert code == 0, err
    table = pd.read_csv(out)
    manifest = pd.read_csv(embeddings["train"])
    model, classes = _model_of(mlp_model)
    labels = manifest["label"].map(classes.index).to_numpy()
    features = embeddings["values"][manifest["index"].to_numpy()]
    with torch.no_grad():
        logits = model(torch.from_numpy(features)).numpy() if method == "auto" else None
    scores = irank.label_issue_scores(labels, features=features, logits=logits)
    expected = table.set_index("index").loc[manifest["index"], "score"].to_numpy()  # in the manifest's order
    assert np.allclose(scores, expected, rtol=1e-9, atol=0)
    assert pd.read_json(str(out) + ".json", typ="series")["method"] == ("joint-loss" if method == "auto" else "loss")


def test_score_model_equals_the_default_score(cli, embeddings, mlp_model, tmp_path):  # noqa: F811
    from irank.model.checkpoint import build_model, load_weights

    out = tmp_path / "s.csv"
    code, _, err = cli("score", mlp_model, embeddings["train"], "-o", out, "--device", "cpu", "-q")
    assert code == 0, err
    checkpoint = read_checkpoint(str(mlp_model))
    model = build_model(checkpoint.metadata["arch"], len(checkpoint.metadata["classes"]))
    load_weights(model, checkpoint, checkpoint.metadata["arch"])
    manifest = pd.read_csv(embeddings["train"])
    labels = manifest["label"].map(checkpoint.metadata["classes"].index).to_numpy()
    values = torch.from_numpy(embeddings["values"][manifest["index"].to_numpy()])
    scores = irank.score_model(model, torch.utils.data.TensorDataset(values, torch.from_numpy(labels)))
    expected = pd.read_csv(out).set_index("index").loc[manifest["index"], "score"].to_numpy()
    assert np.allclose(scores, expected, rtol=1e-9, atol=0)


def test_the_head_loss_is_the_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 4), torch.randint(0, 4, (50,))
    scores = irank.label_issue_scores(labels.numpy(), logits=logits.numpy())
    assert np.allclose(scores, F.cross_entropy(logits.double(), labels, reduction="none").numpy(), rtol=1e-6)
    margins = irank.label_issue_scores(labels.numpy(), logits=logits.numpy(), method="margin")
    others = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    assert np.allclose(margins, (others - logits.gather(1, labels[:, None]).squeeze(1)).numpy(), rtol=1e-6)


def test_find_label_issues_is_prunes_rule():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=40), rng.integers(0, 3, 40)
    mask = irank.find_label_issues(scores, labels, fraction=0.25)
    assert mask.sum() == 10 and set(np.flatnonzero(mask)) == set(np.argsort(-scores)[:10])
    per_class = irank.find_label_issues(scores, labels, count=2, per_class=True)
    for label in range(3):
        members = np.flatnonzero(labels == label)
        assert set(np.flatnonzero(per_class & (labels == label))) == set(members[np.argsort(-scores[members])[:2]])
    ranks, class_ranks = irank.rank(scores, labels)
    assert ranks[np.argmax(scores)] == 1 and sorted(ranks) == list(range(1, 41))


@pytest.mark.parametrize("call, message", [
    (lambda: irank.label_issue_scores([0, 1]), "give features="),
    (lambda: irank.label_issue_scores([0, 1], features=np.zeros((2, 3)), method="joint-loss"), "needs logits="),
    (lambda: irank.label_issue_scores([0, 1], features=np.zeros((2, 3)), logits=np.zeros((2, 2)), method="margin"),
     "joint loss only"),
    (lambda: irank.label_issue_scores([0.5, 1.0], features=np.zeros((2, 3))), "class indices"),
    (lambda: irank.label_issue_scores([0, 1, 1], features=np.zeros((2, 3))), "one row per label"),
    (lambda: irank.label_issue_scores([0, 1], logits=np.zeros((2, 2)), method="influence"), "needs head_inputs"),
])
def test_mistakes_are_clear(call, message):
    with pytest.raises(ValueError, match=message):
        call()
