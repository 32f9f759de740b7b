"""Unusual class layouts work through score → prune → refine: a single-sample class, a missing class, two classes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import irank


def local_manifest(tiny_data, folder: Path, table: pd.DataFrame) -> str:
    """`table`'s rows as a manifest in `folder`, images copied beside it."""
    (folder / "images").mkdir()
    paths = []
    for path in table["path"]:
        target = folder / "images" / Path(path).name
        target.write_bytes((Path(tiny_data["folder"]) / path).read_bytes())
        paths.append(f"images/{target.name}")
    table = table.assign(path=paths)
    table.to_csv(folder / "m.csv", index=False)
    return str(folder / "m.csv")


def score_prune_refine(checkpoint: str, manifest: str, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = irank.RunOptions(device="cpu", batch_size=16)
    scores = irank.score(checkpoint, manifest, output=str(folder / "s.csv"), run_options=run).table
    kept = irank.prune(str(folder / "s.csv"), manifest, output=str(folder / "kept.csv"), fraction=0.2,
                       per_class=True).kept
    irank.refine(checkpoint, str(folder / "kept.csv"), output=str(folder / "r.safetensors"), run_options=run,
                 train_options=irank.TrainOptions(scope="head", epochs=1))
    return scores, kept


def test_a_single_sample_class_and_a_missing_class(tiny_data, tiny_model, tmp_path):
    table = pd.read_csv(tiny_data["train"])
    single = table[table["label"] == "cross"].head(1)
    rest = table[~table["label"].isin(["cross", "vstripes"])].head(40)
    manifest = local_manifest(tiny_data, tmp_path, pd.concat([rest, single]))
    scores, kept = score_prune_refine(tiny_model, manifest, tmp_path)
    assert len(scores) == 41 and scores["score"].notna().all()
    assert (kept["label"] == "cross").sum() == 1  # --min-per-class 1 keeps the lone sample
    assert "vstripes" not in set(scores["label"])
    assert irank.evaluate(str(tmp_path / "r.safetensors"), manifest, run_options=irank.RunOptions(device="cpu"))["num_samples"] == 41


def test_a_two_class_model(tiny_data, tmp_path):
    table = pd.read_csv(tiny_data["train"])
    manifest = local_manifest(tiny_data, tmp_path, table[table["label"].isin(["disk", "cross"])].head(40))
    model = str(tmp_path / "two.safetensors")
    irank.train("tiny-cnn", manifest, output=model, run_options=irank.RunOptions(device="cpu", batch_size=16),
                train_options=irank.TrainOptions(scope="full", epochs=2, lr=0.05))
    scores, kept = score_prune_refine(model, manifest, tmp_path)
    assert set(scores["predicted"]) <= {"cross", "disk"} and scores["candidate_3"].fillna("").eq("").all()
    assert 0 < len(kept) < 40
