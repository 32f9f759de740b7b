"""The peers that train: cleanlab's cross-validation and the fine-tune whose margins give AUM; and the ceiling,
a model trained on other images with their true labels.

Called by peers.py; each function returns (suspicion per row, seconds, facts) and keeps what future method
work needs in outputs/BASE/: the out-of-sample probabilities (cv-probs-kK.npy, one file per fold while it
runs, so a stopped queue resumes at the fold it was in) and every epoch's margins of the fine-tune.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from bases import MarginLog
from common import DATA, OUTPUTS, read_json, write_json
from data import images, labels_of
from recipes import AUG, RECIPES, accuracy, fit, load_base, predict

# The fine-tune of AUM, the same for every base: crops, flips, one-cycle to lr 0.1, cross-entropy, 10 epochs
# (a third of a base's training). Pleiss et al. train from scratch; a user's checkpoint is where irank starts.
AUM_EPOCHS = 10


def evaluation_sets() -> tuple[tuple, tuple]:
    """(test, val) as (uint8 images, true labels)."""
    test = (images("test"), labels_of(pd.read_csv(DATA / "test.csv")))
    val = (images("val"), labels_of(pd.read_csv(DATA / "val.csv")))
    return test, val


def fold_assignment(given: np.ndarray, folds: int) -> np.ndarray:
    """Each row's fold: stratified by the given label, seeded (cleanlab's own cross-validation does the same)."""
    from sklearn.model_selection import StratifiedKFold

    assignment = np.empty(len(given), np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(given)), given)):
        assignment[held] = fold
    return assignment


def fold_run(base, folds: int, fold: int, assignment: np.ndarray) -> dict:
    """Train the base's recipe from scratch on the other folds; its softmax on this fold (cached per fold)."""
    path = base.out / f"cv-k{folds}" / f"fold-{fold}.json"
    if path.exists():
        record = read_json(path)
        return {**record, "probs": np.load(path.with_suffix(".npy"))}
    train, given = images("train"), torch.from_numpy(base.given)
    fit_rows, held = np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)
    test, val = evaluation_sets()
    started = time.perf_counter()
    model, _ = fit(RECIPES[base.recipe_name], train[fit_rows], given[fit_rows], seed=1 + fold, val=val)
    probs = torch.softmax(predict(model, train[held]), 1).numpy()
    record = {"seconds": time.perf_counter() - started, "test_accuracy": accuracy(model, *test)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".npy"), probs)
    write_json(path, record)
    return {**record, "probs": probs}


def cleanlab_ranking(base, folds: int) -> tuple[np.ndarray, float, dict]:
    """cleanlab 2.x as its documentation prescribes: out-of-sample pred_probs by K-fold training, then
    get_label_quality_scores (suspicion = 1 − quality) and find_label_issues (the rows it flags)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    assignment = fold_assignment(base.given, folds)
    probs, seconds, test_accuracies = np.zeros((len(base.given), 10), np.float32), 0.0, []
    for fold in range(folds):
        run = fold_run(base, folds, fold, assignment)
        probs[assignment == fold] = run["probs"]
        seconds += run["seconds"]
        test_accuracies.append(run["test_accuracy"])
    np.save(base.out / f"cv-probs-k{folds}.npy", probs)
    started = time.perf_counter()
    quality = get_label_quality_scores(base.given, probs)
    issues = find_label_issues(base.given, probs)
    seconds += time.perf_counter() - started
    flagged = int(issues.sum())
    facts = {"flagged": flagged, "flagged_precision": float(base.wrong[issues].mean()) if flagged else None,
             "flagged_recall": float(base.wrong[issues].sum() / base.wrong.sum()) if base.wrong.any() else None,
             "fold_test_accuracy": float(np.mean(test_accuracies)),
             "cv_fit": float((probs.argmax(1) == base.given).mean())}
    return 1 - quality, seconds, facts


def aum_ranking(base) -> tuple[np.ndarray, float, dict]:
    """Area under the margin: the given label's margin, averaged over every step of a fine-tune of the base
    on all rows; a label the network keeps fighting (low margin) is suspect."""
    model, metadata = load_base(base.checkpoint)
    recipe = replace(AUG, arch=metadata["arch"], epochs=AUM_EPOCHS)
    given = torch.from_numpy(base.given)
    margins = MarginLog(given, recipe.epochs)
    started = time.perf_counter()
    model, _ = fit(recipe, images("train"), given, model=model, on_batch=margins)
    seconds = time.perf_counter() - started
    np.save(base.out / "aum-finetune-margins.npy", margins.margins.astype(np.float16))
    test, _ = evaluation_sets()
    return -margins.margins.mean(0), seconds, {"test_accuracy": accuracy(model, *test), "epochs": recipe.epochs}


def ceiling_logits(arch: str) -> tuple[np.ndarray, dict]:
    """The architecture trained from scratch (crops, flips, one-cycle: the suite's usual recipe) on the 10,000
    test images with their true labels; its logits on the train rows (cached per architecture, so every base of
    that architecture shares one training)."""
    out = OUTPUTS / f"ceiling-{arch}"
    if (out / "facts.json").exists():
        return np.load(out / "train-logits.npy"), read_json(out / "facts.json")
    recipe, started = replace(AUG, arch=arch), time.perf_counter()
    test, _ = evaluation_sets()
    model, _ = fit(recipe, *test, seed=1)
    logits = predict(model, images("train")).numpy()
    truth = labels_of(pd.read_csv(DATA / "train-clean.csv")).numpy()
    facts = {"seconds": time.perf_counter() - started, "train_true_accuracy": float((logits.argmax(1) == truth).mean()),
             "recipe": recipe.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train-logits.npy", logits)
    write_json(out / "facts.json", facts)
    return logits, facts


def ceiling_ranking(base) -> tuple[np.ndarray, float, dict]:
    """What clean supervision of the same size reaches: the loss of each row's given label under a model of the
    base's architecture that never saw these images nor any wrong label. Not a peer (a user has no such model):
    the distance from it is what a ranking from the noisy checkpoint leaves on the table."""
    arch = base.facts["recipe"]["arch"]
    logits, facts = ceiling_logits(arch)
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(base.given), reduction="none").numpy()
    return loss, facts["seconds"], {"arch": arch, "train_true_accuracy": facts["train_true_accuracy"]}
