"""Peak memory (RSS) of `score`, `prune`, `review` and `apply` at 10k, 100k and 1M rows (not run by CI).

    python benchmarks/cost/memory_rows.py [--rows 10000,100000,1000000] [--dim 32] [--kind tensors|images]

The table in docs/benchmarks/memory.md adds ten million rows (`--rows 10000,100000,1000000,10000000`: a
1.28 GB .npy and about 12 GB of outputs; 15 minutes on 2 cores). A child's peak as the kernel reports it includes this
process's own peak at the fork, so the data sets and the reviewed files are made in child processes too,
and this process's peak is printed at the end: it must stay below every figure measured.

Tensor rows (one .npy of generated embeddings, `irank.formats.synthetic.make_embeddings`) and a small MLP
(`mlp-DIM-64`, trained once on the 10k set), so a million rows need no million image files. Every
command runs as its own process; its peak resident set size comes from the kernel (`os.wait4`).
Outputs go to bench-out/memory/ (git-ignored).

`--kind images`: what ImageNet- or Clothing1M-sized users run instead, a CSV of image paths (one path a row,
`images/0123/0123456.png`, the id defaulting to the path) read by 2 loader processes, and `tiny-cnn`. The
million files are hard links to 1,200 generated 32×32 PNGs (`irank.formats.synthetic.make_dataset`), so they cost
directory entries, not disk. Beside each command's peak RSS (the largest of its process and its loader
processes, from the kernel), the peak of the whole process tree's proportional set size (PSS: a page shared
by n processes counts 1/n in each), sampled every 0.2 s from /proc, says what the job costs the machine.
Outputs go to bench-out/memory-images/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "bench-out" / "memory"


def tree_pss_kib(pid: int) -> int:
    """Sum of the proportional set size of `pid` and its descendants, in KiB (0 for processes gone)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except (OSError, StopIteration, ValueError):
            continue
    return total


def peak_rss(command: list[str], sample_tree: bool = False) -> tuple[float, float, float | None]:
    """(peak RSS in MiB, wall seconds, sampled peak PSS of the process tree in MiB or None) of one command run
    as a child process; fails loudly on a non-zero exit."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tree_peak = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            tree_peak[0] = max(tree_peak[0], tree_pss_kib(process.pid))

    sampler = threading.Thread(target=sample, daemon=True) if sample_tree else None
    if sampler:
        sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    if sampler:
        sampler.join()
    seconds = time.perf_counter() - started
    error = process.stderr.read().decode() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{error}")
    return usage.ru_maxrss / 1024, seconds, (tree_peak[0] / 1024 if sample_tree else None)


SOURCE_IMAGES = 1_200


def make_image_rows(folder: Path, rows: int) -> None:
    """`rows` image rows (hard links to SOURCE_IMAGES generated PNGs, their noisy labels) in folder/train.csv."""
    import numpy as np
    import pandas as pd

    from irank.formats.synthetic import make_dataset

    source = OUT.parent / "memory-images-source"
    if not (source / "train.csv").exists():
        make_dataset(source, num_classes=6, train_size=SOURCE_IMAGES, test_size=6, noise=0.2, image_size=32,
                     pixel_noise=0.15, seed=0)
    sources = pd.read_csv(source / "train.csv")
    picked = np.arange(rows) % len(sources)
    paths = [f"images/{row // 1000:04d}/{row:07d}.png" for row in range(rows)]
    for folder_number in range(-(-rows // 1000)):
        (folder / "images" / f"{folder_number:04d}").mkdir(parents=True, exist_ok=True)
    for path, origin in zip(paths, sources["path"].to_numpy()[picked]):
        if not (folder / path).exists():
            os.link(source / origin, folder / path)
    pd.DataFrame({"path": paths, "label": sources["label"].to_numpy()[picked],
                  "true_label": sources["true_label"].to_numpy()[picked]}).to_csv(folder / "train.csv", index=False)


def irank(*args: str) -> list[str]:
    return [sys.executable, "-m", "irank", *args, "-q", "--overwrite"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--kind", choices=("tensors", "images"), default="tensors")
    args = parser.parse_args()
    images = args.kind == "images"
    out = OUT.parent / "memory-images" if images else OUT
    sizes = [int(text) for text in args.rows.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    manifests = {}
    for size in sorted(set(sizes) | {10_000}):
        folder = out / f"rows-{size}"
        if not (folder / "train.csv").exists():
            if images:
                subprocess.run([sys.executable, "-c", "import sys, pathlib; sys.path.insert(0, sys.argv[3]); "
                                "import memory_rows; memory_rows.make_image_rows(pathlib.Path(sys.argv[1]), int(sys.argv[2]))",
                                str(folder), str(size), str(Path(__file__).parent)], check=True)
            else:
                subprocess.run([sys.executable, "-c", "import sys; from irank import synthetic; synthetic.make_embeddings("
                                "sys.argv[1], num_rows=int(sys.argv[2]), dim=int(sys.argv[3]), num_classes=int(sys.argv[4]), "
                                "noise=0.2, seed=0)", str(folder), str(size), str(args.dim), str(args.classes)], check=True)
        manifests[size] = folder / "train.csv"
    checkpoint = out / ("tiny-cnn.safetensors" if images else "mlp.safetensors")
    if not checkpoint.exists():
        arch = "tiny-cnn" if images else f"mlp-{args.dim}-64"
        subprocess.run(irank("train", arch, str(manifests[10_000]), "-o", str(checkpoint),
                             "--epochs", "5", "--lr", "0.05"), check=True)
    batch = "256" if images else "1024"
    baseline, _, _ = peak_rss([sys.executable, "-c", "import irank.cli, torch, pandas"])
    results = {"python_torch_pandas_import_mib": round(baseline, 1), "kind": args.kind,
               **({} if images else {"dim": args.dim}), "rows": {}}
    print(f"imports alone: {baseline:.0f} MiB")
    for size in sizes:
        folder, manifest = manifests[size].parent, str(manifests[size])
        row = {}
        for name, command in [
            ("score --boundary head", irank("score", str(checkpoint), manifest, "-o", str(folder / "scores-head.csv"),
                                            "--boundary", "head", "--batch-size", batch)),
            ("score (default refit)", irank("score", str(checkpoint), manifest, "-o", str(folder / "scores.csv"),
                                            "--batch-size", batch)),
            ("score --memory-budget 0", irank("score", str(checkpoint), manifest, "-o", str(folder / "scores-disk.csv"),
                                              "--batch-size", batch, "--memory-budget", "0")),
            ("prune", irank("prune", str(folder / "scores.csv"), manifest, "--fraction", "0.2",
                            "-o", str(folder / "kept.csv"), "--removed", str(folder / "removed.csv"))),
            ("review --top 100", irank("review", str(folder / "scores.csv"), "-o", str(folder / "review"))),
        ]:
            row[name] = peak_rss(command, sample_tree=images)
        subprocess.run([sys.executable, "-c", "import sys, pandas as pd; reviewed = pd.read_csv(sys.argv[1], "
                        "usecols=['id'], nrows=int(sys.argv[2])); reviewed['decision'] = 'remove'; "
                        "reviewed.loc[::2, 'decision'] = 'keep'; reviewed.to_csv(sys.argv[3], index=False)",
                        str(folder / "scores.csv"), str(size // 10), str(folder / "reviewed.csv")], check=True)
        row["apply"] = peak_rss(irank("apply", str(folder / "reviewed.csv"), manifest, "-o", str(folder / "fixed.csv")),
                                sample_tree=images)
        results["rows"][size] = {name: {"peak_rss_mib": round(rss, 1), "seconds": round(sec, 1),
                                        **({"tree_peak_pss_mib": round(pss, 1)} if pss is not None else {})}
                                 for name, (rss, sec, pss) in row.items()}
        print(size, json.dumps(results["rows"][size]))
    results["this_process_peak_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"this process's own peak: {results['this_process_peak_mib']:.0f} MiB")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
