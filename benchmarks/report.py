"""The suite's matrices, from the runs cached in $IRANK_BENCH: docs/benchmarks/suite.md.

    python benchmarks/report.py              # writes docs/benchmarks/suite.md
    python benchmarks/report.py --print      # prints it instead

One table per measure: rows are the bases, columns the rankings, then the mean and the worst case of each
ranking over the bases it ran on (a column with fewer bases says so in its row `bases`). Only runs that
finished are shown ("—": not run yet, or undefined, e.g. AUROC on clean labels).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bases import NAMES  # noqa: E402
from common import BASES, RESULTS, read_json  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "suite.md"
RANKINGS = {  # results key → column title
    "irank-score": "irank score (default: joint loss)",
    "probe-loss": "probe loss (default before)",
    "irank-head-influence": "head influence (paper)",
    "head-loss": "head loss",
    "head-margin": "head margin",
    "knn": "kNN disagreement",
    "cleanlab-k2": "cleanlab K=2",
    "cleanlab-k5": "cleanlab K=5",
    "aum-finetune": "AUM (fine-tune)",
    "irank-post-train-aum": "irank post-train (default: margins + loss)",
    "irank-post-train-loss": "post-train, its loss alone (default before)",
    "irank-post-train-aum-e10": "post-train --epochs 10 (a third)",
    "irank-post-train-aum-e20": "post-train --epochs 20 (two thirds)",
    "irank-post-train-crossfit": "post-train --strategy crossfit",
    "crossfit": "cross-fitted unlearn (candidate)",
    "crossfit-both": "cross-fitted, in + out of sample (candidate)",
    "aum-training": "AUM of the base's training (reference)",
    "ceiling": "clean supervision (ceiling)",
}
REFERENCES = {"aum-training", "ceiling"}  # shown, never bold: a user's checkpoint does not come with them
PEERS_COMMAND = "python benchmarks/peers.py BASE   # per base; benchmarks/queue.sh runs every step in order"


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell; — for a missing one."""
    return "—" if value is None else f"{value:.{digits}f}"


def load() -> tuple[dict, dict]:
    """(facts of each trained base, results of each base) in the suite's order."""
    facts = {name: read_json(BASES / f"{name}.json") for name in NAMES}
    facts = {name: value for name, value in facts.items() if value}
    return facts, {name: read_json(RESULTS / f"{name}.json") for name in facts}


def dates(results: dict, keys) -> str:
    """The dates of the runs a table shows, as one day or a span."""
    days = sorted({run["date"] for result in results.values() for key, run in result.get("runs", {}).items()
                   if key in keys and "date" in run})
    span = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}" if days else None
    return f"runs of {span}" if span else "no runs yet"


def bases_table(facts: dict) -> list[str]:
    """One row a trained base: its recipe, noise, fit to its own labels, test accuracy and training time."""
    lines = ["## The bases", "", "`python benchmarks/data.py && python benchmarks/bases.py NAME` (benchmarks/README.md "
             "describes the recipes and the noise); 10,000 training rows, 10,000 test images.", "",
             "| base | recipe | noise | wrong labels | fit to its labels: all / wrong ones | test accuracy "
             "(this loop / `irank eval`) | minutes |", "|---|---|---|---|---|---|---|"]
    for name, f in facts.items():
        lines.append(f"| `{name}` | {f['recipe_name']} | {f['noise']} | {f['wrong']:,} ({f['noise_rate']:.1%}) | "
                     f"{f['fit']:.3f} / {fmt(f['fit_wrong'])} | {f['test_accuracy']:.4f} / "
                     f"{f['irank_test_accuracy']:.4f} | {f['train_seconds'] / 60:.1f} |")
    return lines


def summary_rows(columns: dict[str, list[float]], worst) -> list[str]:
    """The mean, worst case and number of bases of each column."""
    cells = {"mean": [], "worst": [], "bases": []}
    for values in columns.values():
        cells["mean"].append(fmt(sum(values) / len(values)) if values else "—")
        cells["worst"].append(fmt(worst(values)) if values else "—")
        cells["bases"].append(str(len(values)))
    return [f"| **{label}** | " + " | ".join(row) + " |" for label, row in cells.items()]


def measure_table(title: str, measure: str, results: dict, noisy: list[str]) -> list[str]:
    """One matrix: a row per noisy base, a column per ranking, the best of each row (references excepted) in bold."""
    keys = [key for key in RANKINGS if any(key in results[name].get("runs", {}) for name in noisy)]
    lines = [f"## {title}", "", f"`{PEERS_COMMAND}`, then `python benchmarks/report.py`; {dates(results, keys)}.", "",
             "| base | " + " | ".join(RANKINGS[key] for key in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    columns = {key: [] for key in keys}
    for name in noisy:
        runs = results[name].get("runs", {})
        values = [runs.get(key, {}).get(measure) for key in keys]
        best = max((v for k, v in zip(keys, values) if v is not None and k not in REFERENCES), default=None)
        cells = [f"**{fmt(v)}**" if v is not None and v == best else fmt(v) for v in values]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        for key, value in zip(keys, values):
            if value is not None:
                columns[key].append(value)
    return lines + summary_rows(columns, min)


def recovery(base_accuracy: float, after: float | None, oracle: float | None) -> float | None:
    """Share of the gap between the base and the oracle (the same fine-tune on exactly the clean rows) closed."""
    if after is None or oracle is None or abs(oracle - base_accuracy) < 1e-9:
        return None
    return (after - base_accuracy) / (oracle - base_accuracy)


def post_train_row(name: str, facts: dict, runs: dict, key: str) -> tuple[str, float | None, float | None]:
    """One base's row for the post-training run `key`, with its gain in test accuracy and its recovery."""
    post, oracle = runs.get(key, {}), runs.get("oracle", {})
    after = post.get("test_accuracy")
    gain = None if after is None else after - facts["test_accuracy"]
    ratio = recovery(facts["test_accuracy"], after, oracle.get("test_accuracy"))
    flagged = [runs.get(key, {}).get("flagged") for key in ("cleanlab-k2", "cleanlab-k5")]
    flagged = " / ".join("—" if f is None else f"{f / facts['rows']:.1%}" for f in flagged)
    removal = "—" if not post else (f"{post['budget']:.1%} (precision {fmt(post['removed_precision'])}, "
                                    f"recall {fmt(post['removed_recall'])})")
    row = (f"| `{name}` | {facts['noise_rate']:.1%} | {facts['test_accuracy']:.3f} | {fmt(after)} | "
           f"{fmt(oracle.get('test_accuracy'))} | {fmt(gain)} | {fmt(ratio, 2)} | {removal} | {flagged} |")
    return row, gain, ratio


# post-training runs with a model: results key → (peers.py group, table title, the run in words, a note)
POST_TRAININGS = {
    "irank-post-train-aum": ("post-train-aum", "Post-training", "Default `irank post-train`",
                             "The default judges by the fine-tune's area under the margin and the final model's "
                             "loss, their ranks averaged; its model is the fine-tune's, as before."),
    "irank-post-train-aum-e10": ("post-train-aum-third", "Post-training with --epochs 10",
                                 "`irank post-train --epochs 10`",
                                 "The default with a third of its fine-tune (and of its cost): the same judgement "
                                 "by the margins and the loss, the same budget estimate."),
    "irank-post-train-aum-e20": ("post-train-aum-two-thirds", "Post-training with --epochs 20",
                                 "`irank post-train --epochs 20`",
                                 "The default with two thirds of its fine-tune (and of its cost): the same judgement "
                                 "by the margins and the loss, the same budget estimate."),
    "irank-post-train-crossfit": ("post-train-crossfit", "Post-training with --strategy crossfit",
                                  "`irank post-train --strategy crossfit`",
                                  "The cross-fitted strategy as shipped: post-train's fine-tune once on each half of "
                                  "the rows (its own stratified halves), every row ranked by the mean of its loss's "
                                  "rank share in and out of sample, the budget estimated in sample (the share of "
                                  "rows whose label the model that trained on them disagrees with), then the same "
                                  "fine-tune on the rows kept. Its cost counts all three fine-tunes."),
    "crossfit": ("crossfit", "Cross-fitted unlearn (candidate)", "The candidate",
                 "The candidate (benchmarks/crossfit.py): post-train's fine-tune run once on each half of the rows, "
                 "each model ranking the other half by its loss (out of sample); the budget is the share of rows "
                 "whose label differs from their out-of-sample prediction; the same fine-tune then refines the "
                 "checkpoint on the rows kept. Its cost counts all three fine-tunes."),
}


def post_train_table(facts: dict, results: dict, key: str) -> list[str]:
    """A post-training run's outcome on every base it ran on (noisy or clean), with the mean and worst gain and
    recovery."""
    group, title, what, note = POST_TRAININGS[key]
    names = [name for name in facts if key in results[name].get("runs", {})]
    lines = [f"## {title}: test accuracy, recovery, estimated budget", "", *([note, ""] if note else []),
             f"`{PEERS_COMMAND.replace('BASE', f'BASE --only {group},oracle')}`; "
             f"{dates(results, [key, 'oracle'])}. {what} on each base; oracle: "
             "its fine-tune (`irank refine --scope full --epochs 30 --lr 0.1 --augment auto --loss gce`) on exactly "
             "the clean rows; recovery = (after − base) / (oracle − base). Estimated budget: the share "
             "it removed (precision and recall of that removal against the wrong labels), beside the share "
             "cleanlab's `find_label_issues` flags at K=2 / K=5.", "",
             "| base | wrong labels | test accuracy: base | after | oracle | gain | recovery | removed "
             "| cleanlab flags K=2 / K=5 |", "|---|---|---|---|---|---|---|---|---|"]
    gains, ratios = [], []
    for name in names:
        row, gain, ratio = post_train_row(name, facts[name], results[name].get("runs", {}), key)
        lines.append(row)
        gains += [gain] if gain is not None else []
        ratios += [ratio] if ratio is not None else []
    for label, pick in (("mean", lambda v: sum(v) / len(v)), ("worst", min)):
        lines.append(f"| **{label}** | | | | | {fmt(pick(gains)) if gains else '—'} | "
                     f"{fmt(pick(ratios), 2) if ratios else '—'} | | |")
    return lines


def cost_table(results: dict) -> list[str]:
    """Mean wall-clock seconds of each ranking on this machine (2 shared CPU cores, one torch thread)."""
    keys = [key for key in RANKINGS if any(key in r.get("runs", {}) for r in results.values())]
    lines = ["## Cost", "", "Mean wall-clock seconds of each ranking per base (CPU, one torch thread, a machine "
             "shared with other work: expect ±30%); trainings count in full (cleanlab: every fold).", "",
             "| ranking | seconds | bases |", "|---|---|---|"]
    for key in keys:
        seconds = [r["runs"][key]["seconds"] for r in results.values() if key in r.get("runs", {})]
        lines.append(f"| {RANKINGS[key]} | {sum(seconds) / len(seconds):,.0f} | {len(seconds)} |")
    return lines


def render() -> str:
    """The whole page: the bases, then one matrix per measure, then the post-training table and the costs."""
    facts, results = load()
    noisy = [name for name in facts if facts[name]["wrong"]]
    parts = [["# Benchmark suite (issue #24)", "",
              "Generated by `python benchmarks/report.py` from the runs in $IRANK_BENCH; how to run them: "
              "benchmarks/README.md. AUROC and precision at k (k = the number of wrong labels) of each ranking "
              "against the true labels; the best of each row in bold (the two reference columns excepted: AUM of the "
              "base's training needs the margins logged during it, which a checkpoint does not carry; the ceiling is "
              "a model of the base's architecture trained from scratch on 10,000 other images with their true "
              "labels, which no user has: what clean supervision of the same size reaches, out of sample).",
              "", f"Generated {time.strftime('%Y-%m-%d %H:%M')}, from {len(facts)} of the {len(NAMES)} bases "
              "(the queue trains them in the order below; a column's `bases` row says on how many it ran)."],
             bases_table(facts),
             measure_table("AUROC", "auroc", results, noisy),
             measure_table("Precision at k", "precision_at_k", results, noisy),
             *(post_train_table(facts, results, key) for key in POST_TRAININGS), cost_table(results)]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


if __name__ == "__main__":
    text = render()
    if sys.argv[1:] == ["--print"]:
        print(text)
    else:
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        OUTPUT.write_text(text)
        print(f"wrote {OUTPUT}")
