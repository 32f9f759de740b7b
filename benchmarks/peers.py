"""Every ranking of the suite on one base, cached in $IRANK_BENCH/results/BASE.json.

    python benchmarks/peers.py BASE                       # every group not cached yet
    python benchmarks/peers.py BASE --only one-shot,aum   # some groups (the queue runs them in its order)
    python benchmarks/peers.py BASE --redo cleanlab-k2    # compute a group again

Each group's runs are merged into results/BASE.json under "runs" (rankings, and the oracle's test accuracy); a
one-shot ranking already there is not computed again (--redo one-shot computes them all).

Groups (each ranking: AUROC and precision at k against the true labels, and its cost in seconds):
  one-shot     irank's default `irank score` (the joint loss) and the probe's loss alone (`--method loss`, the
               default before); the paper's head influence (`--boundary head --method
               influence`); the head's loss and margin (irank's `--method loss|margin` on the head); kNN label
               disagreement (k=20, cosine, at the head's input); AUM of the base's own training (a reference:
               a user has it only if the training loop logged every margin)
  cleanlab-k2, cleanlab-k5   cleanlab 2.x as documented: out-of-sample probabilities from K-fold training
               of the base's recipe from scratch, then get_label_quality_scores and find_label_issues
  aum          area under the margin over the epochs of a fine-tune of the base on every row (Pleiss 2020)
  post-train   `irank post-train` before it judged by the fine-tune's margins (its runs are kept; run again, it
               is post-train-aum's run under another folder)
  post-train-aum  irank's default `irank post-train`: its ranking (the fine-tune's area under the margin and
               the final model's loss), its estimated budget, its model's test accuracy; and the same run's
               ranking by the final model's loss alone (post-train-loss: the default before)
  post-train-third  the same with --epochs 10: what a third of its cost buys (before the margins)
  post-train-aum-third, post-train-aum-two-thirds  the default with --epochs 10 and 20: what a third and two
               thirds of its cost buy
  post-train-crossfit  `irank post-train --strategy crossfit`: the cross-fitted strategy as shipped
  oracle       post-train's fine-tune recipe (`irank refine`) on exactly the clean rows: the recovery's ceiling
  crossfit     a candidate for post-train: its fine-tune cross-fitted on two halves, each ranking the other half
               out of sample; the out-of-sample disagreement as budget; a refine on the rows kept (crossfit.py);
               and crossfit-both: each row's rank shares of its loss in and out of sample, averaged
  known-budget the top (true noise rate) of post-train-aum's ranking removed, the checkpoint refined on the rest
               with the oracle's recipe: what knowing the rate buys
  ceiling      a reference, not a peer: the base's architecture trained from scratch on the 10,000 test images
               with their true labels (once per architecture), each train row's given label's loss under it:
               what clean supervision of the same size reaches, out of sample
irank runs through its CLI with no flags beyond the files, as a user would run it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bases import irank_eval, parse  # noqa: E402
from common import BASES, DATA, OUTPUTS, RESULTS, detection, read_json, threads, write_json  # noqa: E402
from crossfit import crossfit_ranking  # noqa: E402
from data import images, labels_of  # noqa: E402
from recipes import load_base, normalize  # noqa: E402
from trained_peers import aum_ranking, ceiling_ranking, cleanlab_ranking  # noqa: E402

from irank.core.joint import rank_shares  # noqa: E402  (irank's joint loss: rank shares added, ties sharing)

KNN_K = 20
# `irank score` runs: ranking name → the flags beyond checkpoint, manifest and output
SCORE_RUNS = {
    "irank-score": [],
    "probe-loss": ["--method", "loss"],  # the default before the joint loss
    "irank-head-influence": ["--boundary", "head", "--method", "influence"],
    "head-loss": ["--boundary", "head", "--method", "loss"],
    "head-margin": ["--boundary", "head", "--method", "margin"],
}
# post-train's default fine-tune (irank/posttrain.py RECIPES["unlearn"]), for the oracle
UNLEARN_FLAGS = ["--scope", "full", "--epochs", "30", "--lr", "0.1", "--augment", "auto", "--loss", "gce"]


class Base:
    """One base's files and labels, as every ranking needs them."""

    def __init__(self, name: str):
        self.name = name
        self.recipe_name, self.noise = parse(name)
        self.checkpoint = BASES / f"{name}.safetensors"
        self.manifest = DATA / f"train-{self.noise}.csv"
        table = pd.read_csv(self.manifest)
        self.paths = table.path.to_numpy()
        self.given = labels_of(table, "label").numpy()
        self.wrong = self.given != labels_of(table, "true_label").numpy()
        self.out = OUTPUTS / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.facts = read_json(BASES / f"{name}.json")


def irank(*args: str) -> float:
    """Run the irank CLI (its progress goes to this log); the wall-clock seconds it took."""
    started = time.perf_counter()
    subprocess.run(["irank", *args], check=True, stdout=sys.stderr)
    return time.perf_counter() - started


def ranked_scores(base: Base, scores_csv: Path) -> np.ndarray:
    """An irank scores table as one suspicion value per manifest row (higher = ranked earlier)."""
    table = pd.read_csv(scores_csv, usecols=["rank", "id"])  # id: the manifest's path (no id column given)
    position = pd.Series(-table["rank"].to_numpy(float), index=table["id"])
    return position.reindex(base.paths).to_numpy()


def irank_score(base: Base, flags: list[str], output: Path) -> tuple[np.ndarray, float]:
    """`irank score` on the base's train rows with the given flags: (suspicion per row, seconds)."""
    seconds = irank("score", str(base.checkpoint), str(base.manifest), "-o", str(output), *flags)
    return ranked_scores(base, output), seconds


def head_features(base: Base) -> np.ndarray:
    """What flows into the head `fc` for every train row (eval mode, no augmentation)."""
    model, _ = load_base(base.checkpoint)
    captured = []
    hook = model.fc.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    train = images("train")
    with torch.no_grad():
        for start in range(0, len(train), 500):
            model(normalize(train[start:start + 500]))
    hook.remove()
    return torch.cat(captured).numpy()


def knn_disagreement(features: np.ndarray, given: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Similarity-weighted share of a row's k nearest neighbours (cosine, itself excluded) whose given label
    differs from its own: a label its neighbourhood does not share is suspect."""
    unit = torch.nn.functional.normalize(torch.from_numpy(features).float(), dim=1)
    labels = torch.from_numpy(given)
    scores = np.empty(len(unit), np.float32)
    for start in range(0, len(unit), 1000):
        similarity = unit[start:start + 1000] @ unit.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -2
        values, neighbours = similarity.topk(k, dim=1)
        weights = values.clamp_min(0) + 1e-12
        differs = (labels[neighbours] != labels[start:start + len(similarity)].view(-1, 1)).float()
        scores[start:start + len(similarity)] = ((weights * differs).sum(1) / weights.sum(1)).numpy()
    return scores


def ranking(base: Base, scores: np.ndarray, seconds: float, **extra) -> dict:
    """One ranking's entry in the results: its detection measures, its cost, anything else it reports."""
    return {**detection(scores, base.wrong), "seconds": seconds, **extra}


def one_shot(base: Base, cached: set[str]) -> dict:
    """The rankings that need no training and are not `cached` yet: irank's scores, kNN at the head's input, AUM
    of the training."""
    rankings = {}
    for name, flags in SCORE_RUNS.items():
        if name not in cached:
            scores, seconds = irank_score(base, flags, base.out / f"{name}.csv")
            rankings[name] = ranking(base, scores, seconds)
    if "knn" not in cached:
        started = time.perf_counter()
        knn = knn_disagreement(head_features(base), base.given)
        np.save(base.out / "knn-disagreement.npy", knn)
        rankings["knn"] = ranking(base, knn, time.perf_counter() - started)
    margins = np.load(base.out / "base-train-margins.npy").astype(np.float32)
    rankings["aum-training"] = ranking(base, -margins.mean(0), 0.0)
    return rankings


def removal_facts(base: Base, removed_paths) -> dict:
    """How many rows a removal took, and how many of them had a wrong label."""
    removed = np.isin(base.paths, np.asarray(removed_paths))
    wrong = int((removed & base.wrong).sum())
    return {"removed": int(removed.sum()), "budget": float(removed.mean()),
            "removed_precision": float(wrong / removed.sum()) if removed.any() else None,
            "removed_recall": float(wrong / base.wrong.sum()) if base.wrong.any() else None}


def post_train(base: Base, cached: set[str], epochs: int | None = None, strategy: str | None = None) -> dict:
    """irank's default post-train: its final ranking of every row, what its estimated budget removed, and the
    test accuracy of its model; a rerun of the same command resumes an interrupted fine-tune. With `epochs`, the
    same with `--epochs` (post-train-third: a third of the default's 30, and of its cost); with `strategy`, the
    same with `--strategy` (post-train-crossfit)."""
    suffix = (f"-e{epochs}" if epochs is not None else "") + (f"-{strategy}" if strategy else "")
    out = base.out / f"post-train{suffix}"
    flags = ([] if epochs is None else ["--epochs", str(epochs)]) + ([] if strategy is None else ["--strategy", strategy])
    seconds = irank("post-train", str(base.checkpoint), str(base.manifest), "--out-dir", str(out), *flags)
    return {f"irank-post-train{suffix}": ranking(base, ranked_scores(base, out / "scores.csv"), seconds,
                                                  **post_train_facts(base, out))}


def post_train_facts(base: Base, out: Path) -> dict:
    """What a finished post-train run in `out` removed, the test accuracy of its model and its judgement."""
    return {**removal_facts(base, pd.read_csv(out / "removed.csv")["id"]),
            "test_accuracy": irank_eval(out / "final.safetensors", DATA / "test.csv"),
            "judgement": read_json(out / "summary.json").get("judgement")}


def post_train_aum(base: Base, cached: set[str], epochs: int | None = None) -> dict:
    """The default post-train since it judges by the fine-tune's margins (aum-loss), and the same run's judgement
    by its final model's loss alone (the `loss` column of its scores.csv: the default before, on the same fine-tune).
    With `epochs`, the same with `--epochs` (post-train-aum-third and -two-thirds: 10 and 20 of the default's 30)."""
    suffix = f"-e{epochs}" if epochs is not None else ""
    out = base.out / f"post-train-aum{suffix}"
    irank("post-train", str(base.checkpoint), str(base.manifest), "--out-dir", str(out),
          *([] if epochs is None else ["--epochs", str(epochs)]))
    summary = read_json(out / "summary.json")
    seconds = summary["unlearned"]["seconds"] + summary["judgement"]["seconds"]  # a resumed run's, all told
    table = pd.read_csv(out / "scores.csv", usecols=["id", "loss"]).set_index("id")["loss"]
    return {f"irank-post-train-aum{suffix}": ranking(base, ranked_scores(base, out / "scores.csv"), seconds,
                                                     **post_train_facts(base, out)),
            f"irank-post-train-loss{suffix}": ranking(base, table.reindex(base.paths).to_numpy(), seconds)}


def oracle(base: Base, cached: set[str]) -> dict:
    """post-train's fine-tune on exactly the clean rows: the test accuracy a perfect removal would reach."""
    manifest = DATA / f"clean-rows-{base.noise}.csv"
    if not manifest.exists():
        table = pd.read_csv(base.manifest)
        table[table.label == table.true_label].to_csv(manifest, index=False)
    output = base.out / "oracle.safetensors"
    seconds = irank("refine", str(base.checkpoint), str(manifest), "-o", str(output), "--overwrite", *UNLEARN_FLAGS)
    return {"oracle": {"test_accuracy": irank_eval(output, DATA / "test.csv"), "seconds": seconds, "rows": int((~base.wrong).sum())}}


def known_budget(base: Base, cached: set[str]) -> dict:
    """What knowing the noise rate buys: the top (true rate) of the default's ranking (post-train-aum) removed and
    the checkpoint refined on the rest with the oracle's recipe; its test accuracy beside the oracle's."""
    scores = pd.read_csv(base.out / "post-train-aum" / "scores.csv", usecols=["rank", "id"]).sort_values("rank")
    removed = scores["id"].head(int(round(base.wrong.mean() * len(scores))))
    table = pd.read_csv(base.manifest)
    manifest = DATA / f"known-budget-{base.name}.csv"  # beside the images its paths name
    table[~table.path.isin(set(removed))].to_csv(manifest, index=False)
    output = base.out / "known-budget.safetensors"
    seconds = irank("refine", str(base.checkpoint), str(manifest), "-o", str(output), "--overwrite", *UNLEARN_FLAGS)
    return {"known-budget": {**removal_facts(base, removed), "seconds": seconds,
                             "test_accuracy": irank_eval(output, DATA / "test.csv")}}


def crossfit(base: Base, cached: set[str]) -> dict:
    """A candidate for post-train: the unlearn fine-tune cross-fitted on two halves (crossfit.py)."""
    out_of_sample, in_sample, seconds, facts = crossfit_ranking(base, irank, irank_eval, removal_facts, UNLEARN_FLAGS)
    both = rank_shares(torch.from_numpy(in_sample), rank_shares(torch.from_numpy(out_of_sample))).numpy()
    return {"crossfit": ranking(base, out_of_sample, seconds, **facts),
            "crossfit-both": ranking(base, both, facts["ranking_seconds"])}


def cleanlab_group(folds: int):
    """The group of cleanlab at K folds (trained_peers.py does the training)."""
    def run(base: Base, cached: set[str]) -> dict:
        scores, seconds, facts = cleanlab_ranking(base, folds)
        return {f"cleanlab-k{folds}": ranking(base, scores, seconds, **facts)}
    return run


def ceiling(base: Base, cached: set[str]) -> dict:
    """The reference of clean supervision (trained_peers.py trains it once per architecture)."""
    scores, seconds, facts = ceiling_ranking(base)
    return {"ceiling": ranking(base, scores, seconds, **facts)}


def aum_group(base: Base, cached: set[str]) -> dict:
    """The group of AUM over a fine-tune (trained_peers.py does the training)."""
    scores, seconds, facts = aum_ranking(base)
    return {"aum-finetune": ranking(base, scores, seconds, **facts)}


GROUPS = {
    "one-shot": (one_shot, [*SCORE_RUNS, "knn", "aum-training"]),
    "cleanlab-k2": (cleanlab_group(2), ["cleanlab-k2"]),
    "cleanlab-k5": (cleanlab_group(5), ["cleanlab-k5"]),
    "aum": (aum_group, ["aum-finetune"]),
    "post-train": (post_train, ["irank-post-train"]),
    "post-train-third": (lambda base, cached: post_train(base, cached, epochs=10), ["irank-post-train-e10"]),
    "post-train-crossfit": (lambda base, cached: post_train(base, cached, strategy="crossfit"),
                            ["irank-post-train-crossfit"]),
    "post-train-aum": (post_train_aum, ["irank-post-train-aum", "irank-post-train-loss"]),
    "post-train-aum-third": (lambda base, cached: post_train_aum(base, cached, epochs=10),
                             ["irank-post-train-aum-e10", "irank-post-train-loss-e10"]),
    "post-train-aum-two-thirds": (lambda base, cached: post_train_aum(base, cached, epochs=20),
                                  ["irank-post-train-aum-e20", "irank-post-train-loss-e20"]),
    "oracle": (oracle, ["oracle"]),
    "known-budget": (known_budget, ["known-budget"]),
    "crossfit": (crossfit, ["crossfit", "crossfit-both"]),
    "ceiling": (ceiling, ["ceiling"]),
}


def run_groups(name: str, groups: list[str], redo: list[str]) -> dict:
    """Compute the groups not cached yet (or named in `redo`) and merge them into results/NAME.json."""
    path = RESULTS / f"{name}.json"
    base = Base(name)
    for group in groups:
        results = read_json(path) or {"base": name}
        compute, keys = GROUPS[group]
        if group not in redo and all(key in results.get("runs", {}) for key in keys):
            continue
        print(f"{name}: {group}", file=sys.stderr)
        runs = compute(base, set() if group in redo else set(results.get("runs", {})))
        for run in runs.values():
            run["date"] = time.strftime("%Y-%m-%d")
        results = read_json(path) or {"base": name}  # read again: another step may have written meanwhile
        results.setdefault("runs", {}).update(runs)
        results.update(noise_rate=float(base.wrong.mean()), wrong=int(base.wrong.sum()))
        write_json(path, results)
    return read_json(path)


def main() -> None:
    """Parse the command line, run the groups asked for, print every cached ranking of the base."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--redo", default="", help="comma-separated groups to compute again")
    args = parser.parse_args()
    groups, redo = args.only.split(","), [g for g in args.redo.split(",") if g]
    unknown = [g for g in groups + redo if g not in GROUPS]
    if unknown:
        raise SystemExit(f"unknown groups {unknown} (known: {', '.join(GROUPS)})")
    if not (BASES / f"{args.base}.json").exists():
        raise SystemExit(f"{args.base}: no base yet (python benchmarks/bases.py {args.base})")
    torch.set_num_threads(threads())
    results = run_groups(args.base, sorted(set(groups + redo), key=list(GROUPS).index), redo)
    for key, row in results.get("runs", {}).items():
        measures = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
        print(f"{args.base} {key}: {measures}")


if __name__ == "__main__":
    main()
