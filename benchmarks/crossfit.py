"""A candidate for post-train's default, measured beside it: cross-fitted unlearning.

post-train's unlearn fine-tunes the user's checkpoint on every row, then judges every row under the model that
trained on it. Here the rows are split in two halves (stratified by the given label, seeded); the checkpoint is
fine-tuned with the same recipe (`irank refine ... UNLEARN_FLAGS`) once on each half, and each model ranks the
other half by its loss, out of sample, as cleanlab's K-fold does from scratch. Two half fine-tunes cost one
fine-tune on every row. The budget is the share of rows whose label differs from their out-of-sample
prediction; the checkpoint is then refined with the same recipe on the rows kept (test accuracy beside the oracle).

Outputs in outputs/BASE/xfit-e30/ (fold models, out-of-sample probabilities, the final model), so a stopped run
resumes at the step it was in.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch
from common import DATA, read_json, write_json
from data import images, labels_of
from recipes import load_base, predict


def halves(given: np.ndarray) -> np.ndarray:
    """Each row's half (0 or 1): within every given label, a seeded shuffle alternates the halves. (Not
    trained_peers.fold_assignment's split, which cleanlab K=2 uses: the runs measured so far were made with this
    one, and their models are cached under it.)"""
    rng = np.random.default_rng(0)
    half = np.zeros(len(given), int)
    for label in np.unique(given):
        rows = np.flatnonzero(given == label)
        rng.shuffle(rows)
        half[rows[1::2]] = 1
    return half


def label_loss(probabilities: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Each row's cross-entropy on its given label."""
    return -np.log(probabilities[np.arange(len(given)), given] + 1e-12)


def probabilities(checkpoint, split: str) -> np.ndarray:
    """The model's softmax on every image of `split` (eval mode, no augmentation)."""
    with torch.no_grad():
        return torch.softmax(predict(load_base(checkpoint)[0], images(split)), 1).numpy()


def crossfit_ranking(base, irank, irank_eval, removal_facts, flags: list[str]) -> tuple[np.ndarray, np.ndarray,
                                                                                     float, dict]:
    """(out-of-sample loss per row, in-sample loss per row (under the half's model that trained on it), seconds
    of the two fine-tunes and the final refine, facts: budget, removal, test accuracies)."""
    out = base.out / f"xfit-e{flags[flags.index('--epochs') + 1]}"  # the fine-tune's length names the folder
    out.mkdir(exist_ok=True)
    record = read_json(out / "record.json")
    table = pd.read_csv(base.manifest)
    half = halves(base.given)
    test_labels = labels_of(pd.read_csv(DATA / "test.csv"), "label").numpy()
    oos, insample = np.zeros((len(table), 10), np.float32), np.zeros((len(table), 10), np.float32)
    for k in (0, 1):
        manifest = DATA / f"xfit-{base.noise}-fold{k}.csv"
        if not manifest.exists():
            table[half == k].to_csv(manifest, index=False)
        model = out / f"ft{k}.safetensors"
        if not model.exists():
            record[f"ft{k}_seconds"] = irank("refine", str(base.checkpoint), str(manifest), "-o", str(model), *flags)
            write_json(out / "record.json", record)
        train = probabilities(model, "train")
        oos[half != k], insample[half == k] = train[half != k], train[half == k]
        record[f"ft{k}_test"] = float((probabilities(model, "test").argmax(1) == test_labels).mean())
    np.save(out / "oos-probs.npy", oos)
    np.save(out / "in-probs.npy", insample)
    rows = np.arange(len(table))
    loss = label_loss(oos, base.given)
    budget = float((oos.argmax(1) != base.given).mean())
    order = np.lexsort((rows, -loss))
    removed = np.zeros(len(table), bool)
    removed[order[:int(round(budget * len(table)))]] = True
    kept = DATA / f"xfit-kept-{base.name}.csv"
    table[~removed].to_csv(kept, index=False)
    final = out / "final.safetensors"
    if "final_seconds" not in record:
        record["final_seconds"] = irank("refine", str(base.checkpoint), str(kept), "-o", str(final), "--overwrite",
                                        *flags)
        write_json(out / "record.json", record)
    facts = {**removal_facts(base, table.path[removed]), "test_accuracy": irank_eval(final, DATA / "test.csv"),
             "fold_test_accuracy": (record["ft0_test"] + record["ft1_test"]) / 2,
             "ranking_seconds": record["ft0_seconds"] + record["ft1_seconds"]}
    print(f"{base.name}: cross-fit budget {budget:.3f}, test accuracy {facts['test_accuracy']:.4f}", file=sys.stderr)
    return loss, label_loss(insample, base.given), facts["ranking_seconds"] + record["final_seconds"], facts
