"""Peak memory (RSS) of `score`, `prune` and `apply` at 10k, 100k and 1M rows (not run by CI).

    python tests/bench/memory_rows.py [--rows 10000,100000,1000000] [--dim 32]

README's table adds ten million rows (`--rows 10000,100000,1000000,10000000`: a 1.28 GB .npy and about
12 GB of outputs; 15 minutes on 2 cores). A child's peak as the kernel reports it includes this
process's own peak at the fork, so the data sets and the reviewed files are made in child processes too,
and this process's peak is printed at the end: it must stay below every figure measured.

Tensor rows (one .npy of generated embeddings, `irank.synthetic.make_embeddings`) and a small MLP
(`mlp-DIM-64`, trained once on the 10k set), so a million rows need no million image files. Every
command runs as its own process; its peak resident set size comes from the kernel (`os.wait4`).
Outputs go to bench-out/memory/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench-out" / "memory"


def peak_rss(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one command run as a child process; fails loudly on a non-zero exit."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    error = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{error}")
    return usage.ru_maxrss / 1024, seconds


def irank(*args: str) -> list[str]:
    return [sys.executable, "-m", "irank", *args, "-q", "--overwrite"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    sizes = [int(text) for text in args.rows.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    manifests = {}
    for size in sorted(set(sizes) | {10_000}):
        folder = OUT / f"rows-{size}"
        if not (folder / "train.csv").exists():
            subprocess.run([sys.executable, "-c", "import sys; from irank import synthetic; synthetic.make_embeddings("
                            "sys.argv[1], num_rows=int(sys.argv[2]), dim=int(sys.argv[3]), num_classes=int(sys.argv[4]), "
                            "noise=0.2, seed=0)", str(folder), str(size), str(args.dim), str(args.classes)], check=True)
        manifests[size] = folder / "train.csv"
    checkpoint = OUT / "mlp.safetensors"
    if not checkpoint.exists():
        subprocess.run(irank("train", f"mlp-{args.dim}-64", str(manifests[10_000]), "-o", str(checkpoint),
                             "--epochs", "5", "--lr", "0.05"), check=True)
    baseline, _ = peak_rss([sys.executable, "-c", "import irank.cli, torch, pandas"])
    results = {"python_torch_pandas_import_mib": round(baseline, 1), "dim": args.dim, "rows": {}}
    print(f"imports alone: {baseline:.0f} MiB")
    for size in sizes:
        folder, manifest = manifests[size].parent, str(manifests[size])
        row = {}
        for name, command in [
            ("score --boundary head", irank("score", str(checkpoint), manifest, "-o", str(folder / "scores-head.csv"),
                                            "--boundary", "head", "--batch-size", "1024")),
            ("score (default refit)", irank("score", str(checkpoint), manifest, "-o", str(folder / "scores.csv"),
                                            "--batch-size", "1024")),
            ("score --memory-budget 0", irank("score", str(checkpoint), manifest, "-o", str(folder / "scores-disk.csv"),
                                              "--batch-size", "1024", "--memory-budget", "0")),
            ("prune", irank("prune", str(folder / "scores.csv"), manifest, "--fraction", "0.2",
                            "-o", str(folder / "kept.csv"), "--removed", str(folder / "removed.csv"))),
        ]:
            row[name] = peak_rss(command)
        subprocess.run([sys.executable, "-c", "import sys, pandas as pd; reviewed = pd.read_csv(sys.argv[1], "
                        "usecols=['id'], nrows=int(sys.argv[2])); reviewed['decision'] = 'remove'; "
                        "reviewed.loc[::2, 'decision'] = 'keep'; reviewed.to_csv(sys.argv[3], index=False)",
                        str(folder / "scores.csv"), str(size // 10), str(folder / "reviewed.csv")], check=True)
        row["apply"] = peak_rss(irank("apply", str(folder / "reviewed.csv"), manifest, "-o", str(folder / "fixed.csv")))
        results["rows"][size] = {name: {"peak_rss_mib": round(rss, 1), "seconds": round(sec, 1)}
                                 for name, (rss, sec) in row.items()}
        print(size, json.dumps(results["rows"][size]))
    results["this_process_peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"this process's own peak: {results['this_process_peak_mib']:.0f} MiB")
    (OUT / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
