"""Post-train benchmark on CIFAR-10 subsets with label noise (not run by CI).

    python benchmarks/cifar/posttrain_cifar.py SETTING [--variants head-refit,probe-refit,head-full,probe-full] [--rounds 8]
    python benchmarks/cifar/posttrain_cifar.py SETTING --variants probeloss-rejudge   # post-train --rejudge, unlearning recipe
    python benchmarks/cifar/posttrain_cifar.py SETTING --variants probeloss-rejudge --rejudge-loss gce --references all
        # with GCE fine-tunes, and the same fine-tune on every row ranked by a probe and by its own head
    python benchmarks/cifar/posttrain_cifar.py SETTING --variants unlearn   # post-train's default, budget estimated
    python benchmarks/cifar/posttrain_cifar.py SETTING --variants unlearn --unlearn-epochs 10   # the same, shorter

SETTING is a base checkpoint name from benchmarks/cifar/train_bases.sh (ce-sym40, ce-sym20, ce-asym40,
ce-sym0, gce-sym40; with EXTRA=1 also ce-sym60, ce-asym20, gce-sym20, ce-sym40-es, ce-sym40-aug).
Writes bench-out/<SETTING>/results.json and prints a markdown table. Every stage caches its result in
that JSON, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import irank
from irank.core.head_scores import method_scores
from irank.core.linear import fit_softmax_regression
from irank.core.metrics import auroc, precision_at_k
from irank.model.forward import forward_pass
from irank.model.inputs import batches, make_loader
from irank.model.placement import Placement, placement_for, resolve_device
from irank.model.prepare import prepare
from irank.options import RECIPES, BoundaryOptions, LoopOptions, ModelOptions, RunOptions, TrainOptions
from irank.workflows.post_train import post_train

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "bench-data" / "cifar10"
RUN = RunOptions(device="auto", batch_size=256, num_workers=2)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def stage(results: dict, path: Path, name: str, compute):
    if name not in results:
        started = time.perf_counter()
        results[name] = compute()
        results[name + "_seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(results, indent=2, sort_keys=True))
        print(f"[{name}] done in {results[name + '_seconds']:.0f} s", flush=True)
    return results[name]


def base_paths(setting: str) -> tuple[str, str]:
    """(base checkpoint, its training manifest) of a setting such as ce-sym40 or gce-sym40."""
    return (str(ROOT / "bench-out" / "base" / f"{setting}.safetensors"),
            str(DATA / f"train-{setting.split('-')[1]}.csv"))


def scores_in_row_order(scores: str | Path, manifest: str) -> np.ndarray:
    """A scores table's `score` column in the manifest's row order (ids are the manifest's paths)."""
    ids = pd.read_csv(manifest)["path"].tolist()
    return pd.read_csv(scores).set_index("id")["score"].reindex(ids).to_numpy()


def truth_mask(manifest: str) -> np.ndarray:
    table = pd.read_csv(manifest)
    return (table["label"] != table["true_label"]).to_numpy()


def detection(scores: np.ndarray, corrupted: np.ndarray) -> dict:
    order = np.argsort(-scores, kind="stable")
    return {"auroc": auroc(scores, corrupted), "precision_at_k": precision_at_k(order, corrupted)}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _placement(run: RunOptions, model, placed: bool) -> Placement:
    """`score`'s placement of `model` (channels-last for wide conv nets, bf16 autocast on CUDA), or (`placed`
    False) the default layout in full precision on the same device."""
    return placement_for(run, model) if placed else Placement(resolve_device(run.device))


def plain_inference_seconds(checkpoint: str, manifest: str, placed: bool = False, run: RunOptions = RUN,
                            model_options: ModelOptions | None = None) -> float:
    """Seconds of a plain `model(x)` loop over `score`'s DataLoader: in the default layout and full precision (the
    issue's baseline), or (`placed`) in the placement `score` uses (the fairer baseline). The device is
    synchronized before the clock stops."""
    prepared = prepare(checkpoint, manifest, model_options or ModelOptions())
    loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                         num_workers=run.num_workers)
    place = _placement(run, prepared.model, placed)
    model = place.place_model(prepared.model).eval()
    synchronize()
    started = time.perf_counter()
    with torch.inference_mode(), place.autocast():
        for images, _ in batches(loader):
            model(place.inputs(images))
    synchronize()
    return time.perf_counter() - started


def plain_training_seconds(checkpoint: str, manifest: str, options: TrainOptions, placed: bool = False,
                           run: RunOptions = RUN, model_options: ModelOptions | None = None) -> float:
    """Seconds of a plain training loop: the loader (shuffled, seeded), SGD settings and epochs `refine` uses, in
    the default layout and full precision or (`placed`) in `refine`'s placement."""
    prepared = prepare(checkpoint, manifest, model_options or ModelOptions())
    loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=run.batch_size,
                         num_workers=run.num_workers, shuffle=True, seed=options.seed)
    place = _placement(run, prepared.model, placed)
    model = place.place_model(prepared.model).train()
    labels = torch.from_numpy(prepared.labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=options.lr, momentum=options.momentum,
                                weight_decay=options.weight_decay)
    synchronize()
    started = time.perf_counter()
    for _ in range(options.epochs):
        for images, rows in batches(loader):
            with place.autocast():
                logits = model(place.inputs(images))
            loss = F.cross_entropy(logits.float(), labels[rows].to(place.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    synchronize()
    return time.perf_counter() - started


def one_shot(checkpoint: str, manifest: str, corrupted: np.ndarray, out: Path) -> dict:
    """Every ranking from one forward pass of the base checkpoint, plus the timed `score` run."""
    infer = plain_inference_seconds(checkpoint, manifest)
    started = time.perf_counter()
    irank.score(checkpoint, manifest, output=str(out / "scores.csv"), run_options=RUN)
    score_seconds = time.perf_counter() - started
    prepared = prepare(checkpoint, manifest, ModelOptions())
    loader = make_loader(prepared.manifest.resolved_paths(), prepared.preprocess, batch_size=RUN.batch_size, num_workers=RUN.num_workers)
    outputs = forward_pass(prepared.model, prepared.head, loader, num_rows=len(corrupted), device=torch.device("cpu"))
    labels = torch.from_numpy(prepared.labels)
    rows = {}
    for name, method, measure in [
        ("influence (self-influence)", "influence", "self-influence"),
        ("influence (boundary-shift)", "influence", "boundary-shift"),
        ("influence (parameter-shift)", "influence", "parameter-shift"),
        ("loss", "loss", None), ("margin", "margin", None), ("gradnorm", "gradnorm", None),
    ]:
        values, _ = method_scores(method, outputs.logits, outputs.head_inputs, labels, measure=measure or "self-influence")
        rows[name] = detection(values.numpy(), corrupted)
    rows["random"] = detection(np.random.default_rng(0).random(len(corrupted)), corrupted)
    rows["cleanlab find_label_issues (5-fold probes)"] = cleanlab_reference(outputs.head_inputs, labels, corrupted)
    torch.save({"head_inputs": outputs.head_inputs, "labels": labels}, out / "features.pt")
    return {"rankings": rows, "score_seconds": score_seconds, "inference_seconds": infer, "cost_ratio": score_seconds / infer}


def cleanlab_reference(features: torch.Tensor, labels: torch.Tensor, corrupted: np.ndarray, folds: int = 5, l2: float = 1e-3) -> dict:
    """cleanlab 2.x fed with out-of-sample probabilities from k-fold linear probes on the checkpoint's features."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    n, classes = len(labels), int(labels.max()) + 1
    fold_of = np.random.default_rng(0).permutation(n) % folds
    probs = np.zeros((n, classes))
    for fold in range(folds):
        held = torch.from_numpy(fold_of == fold)
        weight, bias = fit_softmax_regression(features[~held], labels[~held], classes, l2=l2)
        probs[held.numpy()] = torch.softmax(features[held].double() @ weight.T + bias, 1).numpy()
    flagged = find_label_issues(labels.numpy(), probs)
    quality = get_label_quality_scores(labels.numpy(), probs)
    result = detection(-quality, corrupted)
    result["flagged"] = int(flagged.sum())
    result["flagged_precision"] = float(corrupted[flagged].mean()) if flagged.any() else float("nan")
    result["flagged_recall"] = float(flagged[corrupted].mean())
    return result


def gradual_order(post_dir: Path, manifest: str) -> np.ndarray:
    """Suspicion score per manifest row from post-train's removal order: removed rows first (by round,
    then rank), then the never-removed rows by the last round's scores."""
    ids = pd.read_csv(manifest)["path"].tolist()
    position = {sample_id: row for row, sample_id in enumerate(ids)}
    removed = pd.read_csv(post_dir / "removed.csv")
    summary = json.loads((post_dir / "summary.json").read_text())
    last_scores = pd.read_csv(post_dir / summary["rounds"][-1]["folder"] / "scores.csv")
    order = [position[i] for i in removed["id"]]
    seen = set(order)
    order += [position[i] for i in last_scores["id"] if position[i] not in seen]
    suspicion = np.empty(len(ids))
    suspicion[np.array(order)] = -np.arange(len(order), dtype=float)
    return suspicion


def refine_on_subset(checkpoint: str, manifest: str, keep: np.ndarray, out: Path, name: str, options: TrainOptions) -> str:
    table = pd.read_csv(manifest)
    subset = out / f"{name}.csv"
    table[keep].to_csv(subset, index=False)
    # The subset sits in bench-out/...; point its paths at the images.
    table = pd.read_csv(subset)
    table["path"] = [str(Path(manifest).parent / p) for p in table["path"]]
    table.to_csv(subset, index=False)
    model = str(out / f"{name}.safetensors")
    irank.refine(checkpoint, str(subset), output=model, train_options=options, run_options=RUN,
                 model_options=ModelOptions(allow_outside_root=True), overwrite=True)
    return model


def ranking_of(model: str, manifest: str, corrupted: np.ndarray, head: bool = False) -> dict:
    """AUROC / precision at k of `irank score` on `model` over every row of `manifest`: the default, or with
    `head` `--boundary head --method loss` (the model's own head, by its loss)."""
    output = Path(model).with_suffix(".head-scores.csv" if head else ".scores.csv")
    options = {"boundary": BoundaryOptions(kind="head", layer=None), "method": "loss"} if head else {}
    irank.score(model, manifest, output=str(output), run_options=RUN, overwrite=True, **options)
    layer = json.loads(Path(str(output) + ".json").read_text())["parameters"].get("layer")
    return {"layer": layer, **detection(scores_in_row_order(output, manifest), corrupted)}


def run_unlearn(checkpoint: str, manifest: str, post_dir: Path, corrupted: np.ndarray, budget: float | None,
                epochs: int | None = None) -> dict:
    """`irank post-train` with its defaults (strategy unlearn; the budget estimated unless given; `epochs`, when
    given, replaces the default's): its ranking of every row, the removal's precision and recall, and the fine-tuned
    model's test accuracy."""
    training = RECIPES["unlearn"].train_options()
    training.epochs = epochs or training.epochs
    started = time.perf_counter()
    result = post_train(checkpoint, manifest, out_dir=str(post_dir), loop=LoopOptions(budget=budget),
                        train_options=training, run_options=RUN)
    seconds = time.perf_counter() - started
    judgement = result.summary["judgement"]
    record = {"test_accuracy": test_accuracy(result.final_model), "seconds": seconds, "removed": judgement["removed"],
              "budget": judgement["budget"], "train_options": asdict(training)}
    if corrupted.any():
        record["gradual"] = detection(scores_in_row_order(post_dir / "scores.csv", manifest), corrupted)
        removed = pd.read_csv(manifest)["path"].isin(set(pd.read_csv(post_dir / "removed.csv")["id"])).to_numpy()
        record["removed_precision"] = float(corrupted[removed].mean())
        record["removed_recall"] = float(removed[corrupted].mean())
    return record


def test_accuracy(model: str) -> float:
    return irank.evaluate(model, str(DATA / "test.csv"), run_options=RUN)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("setting")
    parser.add_argument("--variants", default="head-refit,probe-refit,head-full,probe-full",
                        help="BOUNDARY-SCOPE pairs: head or probe (auto-layer L2 probe) scoring; refit or full refinement")
    parser.add_argument("--probe-l2", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--full-epochs", type=int, default=2)
    parser.add_argument("--estimate-budget", action="store_true", help="let post-train estimate the budget")
    parser.add_argument("--budget", type=float, help="the budget to give post-train (default: the true noise rate); "
                        "on a clean setting (ce-sym0) what a user who guesses a noise rate would give")
    parser.add_argument("--references", default="all,random,lossrank,oracle",
                        help="the same-recipe refines to run: all (nothing removed), random, lossrank, oracle")
    parser.add_argument("--unlearn-epochs", type=int, help="--variants unlearn with another --epochs than the default's "
                        "(results tagged -eN)")
    parser.add_argument("--rejudge-rounds", type=int, default=3)
    parser.add_argument("--rejudge-epochs", type=int, default=10)
    parser.add_argument("--rejudge-boundary", default="head", choices=["head", "same"],
                        help="post-train --rejudge-boundary; results of 'same' are tagged -same")
    parser.add_argument("--rejudge-loss", default="ce", choices=["ce", "gce"],
                        help="the fine-tunes' training loss; results of gce are tagged -gce")
    args = parser.parse_args()
    checkpoint, manifest = base_paths(args.setting)
    out = ROOT / "bench-out" / args.setting
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = load_results(results_path)
    corrupted = truth_mask(manifest)
    results["corrupted"] = int(corrupted.sum())
    stage(results, results_path, "base_test_accuracy", lambda: test_accuracy(checkpoint))
    stage(results, results_path, "base_train_fit", lambda: irank.evaluate(checkpoint, manifest, run_options=RUN)["accuracy"])
    stage(results, results_path, "one_shot", lambda: one_shot(checkpoint, manifest, corrupted, out))
    budget = args.budget if args.budget is not None else (corrupted.mean() if corrupted.any() else None)
    rng = np.random.default_rng(0)
    random_keep = np.ones(len(corrupted), dtype=bool)
    if corrupted.any():
        random_keep[rng.choice(len(corrupted), size=int(corrupted.sum()), replace=False)] = False
    for variant in args.variants.split(","):
        if variant == "unlearn":
            tag = "unlearn" + (f"-e{args.unlearn_epochs}" if args.unlearn_epochs else "") + (
                f"-budget{args.budget:g}" if args.budget is not None else "")
            stage(results, results_path, f"post_{tag}",
                  lambda: run_unlearn(checkpoint, manifest, out / f"post-{tag}", corrupted, args.budget, args.unlearn_epochs))
            continue
        boundary, scope = variant.split("-")  # e.g. probe-refit: score on an auto-layer probe, refine by refit
        method = "loss" if boundary == "probeloss" else "influence"  # probeloss: the probe's own loss
        rejudge = scope == "rejudge"  # probeloss-rejudge: post-train --rejudge with the unlearning recipe
        unlearning = TrainOptions(scope="full", epochs=args.rejudge_epochs, lr=0.1, augment="crop-flip", loss=args.rejudge_loss)
        if scope == "refit":
            options = TrainOptions(scope="refit", l2=args.l2)
        elif rejudge:
            options = unlearning
        else:
            options = TrainOptions(scope=scope, epochs=args.full_epochs, lr=0.01)
        tag = variant + ("-estimated" if args.estimate_budget else f"-budget{args.budget:g}" if args.budget is not None else "")
        tag += "-same" if rejudge and args.rejudge_boundary == "same" else ""
        tag += "-gce" if rejudge and args.rejudge_loss == "gce" else ""
        loop = LoopOptions(rounds=args.rejudge_rounds if rejudge else args.rounds,
                           strategy="rejudge" if rejudge else "gradual",
                           rejudge_boundary=args.rejudge_boundary,
                           budget=None if args.estimate_budget else budget,
                           boundary="refit" if boundary.startswith("probe") else "head", method=method,
                           layer="auto" if boundary.startswith("probe") else None, probe_l2=args.probe_l2)

        def run_post(tag=tag, loop=loop, options=options):
            post_dir = out / f"post-{tag}"
            started = time.perf_counter()
            result = post_train(checkpoint, manifest, out_dir=str(post_dir), loop=loop, train_options=options, run_options=RUN)
            seconds = time.perf_counter() - started
            record = {"test_accuracy": test_accuracy(result.final_model), "seconds": seconds,
                      "removed": int(result.summary["rounds"][-1]["removed_total"]), "plan": result.summary["plan"],
                      "layer": result.summary.get("layer")}
            if corrupted.any() and rejudge:  # each round's ranking of every row, and the answer: the final judgement's
                record["per_round"] = [
                    {"boundary": r.get("boundary"), "layer": r.get("layer"), **detection(scores_in_row_order(post_dir / r["folder"] / "scores.csv",
                                                                              manifest), corrupted)}
                    for r in result.summary["rounds"]]
                record["gradual"] = detection(scores_in_row_order(post_dir / "scores.csv", manifest), corrupted)
            elif corrupted.any():
                record["gradual"] = detection(gradual_order(post_dir, manifest), corrupted)
            return record

        post = stage(results, results_path, f"post_{tag}", run_post)
        # The same refine recipe, in one go, on: everything, a random removal of the same size, the clean samples.
        if scope == "refit":
            layer = post.get("layer")
            reference = TrainOptions(scope="refit", l2=args.probe_l2 if layer else args.l2, layer=layer)
        elif rejudge:
            reference = replace(unlearning, epochs=args.rejudge_epochs * args.rejudge_rounds)
        else:
            reference = TrainOptions(scope=scope, epochs=args.full_epochs * args.rounds, lr=0.01)
        name = variant if scope == "refit" and post.get("layer") else scope
        name += "-gce" if rejudge and args.rejudge_loss == "gce" else ""
        keeps = {"all": np.ones(len(corrupted), bool)}
        if corrupted.any():
            loss_order = pd.read_csv(out / "scores.csv").sort_values("loss", ascending=False, kind="stable")["id"]
            keeps.update(random=random_keep, oracle=~corrupted,
                         lossrank=~pd.read_csv(manifest)["path"].isin(set(loss_order[: int(corrupted.sum())])).to_numpy())
        for kind in ("all", "random", "lossrank", "oracle"):
            if kind in keeps and kind in args.references.split(","):
                stage(results, results_path, f"{'refine_all' if kind == 'all' else kind}_{name}",
                      lambda kind=kind: test_accuracy(refine_on_subset(checkpoint, manifest, keeps[kind], out,
                                                                       f"{kind}-{name}", reference)))
                if rejudge and corrupted.any():  # how the reference model itself ranks every row: probe, own head
                    stage(results, results_path, f"{kind}_{name}_ranking",
                          lambda kind=kind: ranking_of(str(out / f"{kind}-{name}.safetensors"), manifest, corrupted))
                    stage(results, results_path, f"{kind}_{name}_head_ranking",
                          lambda kind=kind: ranking_of(str(out / f"{kind}-{name}.safetensors"), manifest, corrupted,
                                                       head=True))
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
