"""`irank demo`: the whole pipeline, offline, on a small generated image set with flipped labels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from irank.core.metrics import auroc, precision_at_k
from irank.formats.synthetic import make_dataset
from irank.options import RunOptions, TrainOptions
from irank.runtime.progress import Reporter
from irank.stages.evaluate import evaluate
from irank.stages.prune import prune
from irank.stages.refine import refine, train
from irank.stages.score import score

DEMO = {
    "num_classes": 6, "train_size": 1500, "test_size": 600, "image_size": 32, "pixel_noise": 0.15,
    "arch": "tiny-cnn", "train_epochs": 30, "refine_epochs": 5,
}


def run_demo(folder: str | Path, *, noise: float = 0.25, seed: int = 0, reporter: Reporter | None = None) -> dict:
    """Generate data, train on noisy labels, score → prune → refine, and measure what happened."""
    reporter = reporter or Reporter()
    folder = Path(folder)
    started = time.perf_counter()
    # no loader workers: on 1,500 small images, starting them for every epoch costs more than they save
    run = RunOptions(device="auto", batch_size=64, num_workers=0)
    reporter.info(f"making {DEMO['train_size']} training images ({noise:.0%} flipped labels) and {DEMO['test_size']} test images in {folder}")
    train_csv, test_csv = make_dataset(
        folder / "data", num_classes=DEMO["num_classes"], train_size=DEMO["train_size"], test_size=DEMO["test_size"],
        noise=noise, image_size=DEMO["image_size"], pixel_noise=DEMO["pixel_noise"], seed=seed,
    )
    model = str(folder / "model.safetensors")
    reporter.info(f"training {DEMO['arch']} on the noisy labels")
    # The demo's folder is its own: a second run replaces the files of the first.
    train(DEMO["arch"], str(train_csv), output=model, run_options=run, reporter=reporter, overwrite=True,
          train_options=TrainOptions(scope="full", epochs=DEMO["train_epochs"], lr=0.05, seed=seed))
    reporter.info("scoring every training sample's influence")
    scores_csv = str(folder / "scores.csv")
    table = score(model, str(train_csv), output=scores_csv, run_options=run, reporter=reporter, overwrite=True).table
    flipped = (table["label"] != table["true_label"]).to_numpy()
    budget = int(round(noise * len(table)))
    clean_csv, removed_csv = str(folder / "clean.csv"), str(folder / "removed.csv")
    prune(scores_csv, str(train_csv), output=clean_csv, removed_output=removed_csv, count=budget, overwrite=True)
    reporter.info(f"refining on the {len(table) - budget} kept samples")
    refined = str(folder / "refined.safetensors")
    refine(model, clean_csv, output=refined, run_options=run, reporter=reporter, overwrite=True,
           train_options=TrainOptions(scope="full", epochs=DEMO["refine_epochs"], lr=0.01, seed=seed))
    before = evaluate(model, str(test_csv), run_options=run)["accuracy"]
    after = evaluate(refined, str(test_csv), run_options=run)["accuracy"]
    fit_noisy = evaluate(model, str(train_csv), run_options=run)["accuracy"]
    caught = int(flipped[:budget].sum())
    summary = {
        "folder": str(folder),
        "train_rows": len(table),
        "flipped_labels": int(flipped.sum()),
        "removed": budget,
        "flipped_among_removed": caught,
        "precision_at_k": precision_at_k(np.arange(len(table)), flipped, budget),
        "auroc": auroc(table["score"].to_numpy(), flipped),
        "train_accuracy_on_noisy_labels": fit_noisy,
        "test_accuracy_before": before,
        "test_accuracy_after": after,
        "seconds": time.perf_counter() - started,
    }
    return summary
