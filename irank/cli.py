"""The `irank` command: a thin typer layer over the library functions. No math and no file formats here.

Exit codes: 0 success; 1 an internal error (a bug: please report it); 2 a command line that does not
parse (unknown flag, missing argument); 3 bad input (a file, row or flag named in the message);
4 the CI gate failed (`irank score --fail-over`): the outputs were written, the reason is one line on stderr;
130 interrupted (Ctrl-C), 143 or 129 terminated by SIGTERM or SIGHUP: no output was written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.table import Table

from irank._version import __version__
from irank.formats.files import is_stdio
from irank.options import REFINE, TRAIN, BoundaryOptions, ModelOptions, RunOptions
from irank.runtime.errors import IrankError, UsageError
from irank.runtime.launch import launched_by_torchrun
from irank.runtime.progress import RichReporter
from irank.runtime.signals import EXIT_INTERRUPTED, install_signal_handlers, interrupt_message, stopped_by
from irank.runtime.sizes import DEFAULT_MEMORY_BUDGET, parse_size

EXIT_INPUT_ERROR = 3
EXIT_GATE_FAILED = 4
MEASURE_NAMES = {"aum-loss": "area under the margin over the fine-tune and loss"}  # post-train's closing line
ESTIMATED_BUDGET = ("the budget was estimated: the share of rows whose label the model does not predict, which "
                    "under-shoots labels wrong the way people get them wrong (measured: "
                    "docs/benchmarks/posttrain-default.md#the-budget-on-human-like-noise); give --budget if you know "
                    "your noise rate")

app = typer.Typer(
    name="irank",
    help=(
        "Find mislabeled training samples by their influence on a trained classifier's decision boundary, "
        "remove them and refine the model.\n\n"
        "Stages read and write plain files: score → prune → refine, and score → review → apply for annotators. "
        "Exit codes: 0 ok, 2 bad command line, 3 bad input (named in the message), "
        "4 the CI gate of score --fail-over failed (outputs written), 130 interrupted (143 SIGTERM), 1 internal error."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
stdout = Console(highlight=False)


class Method(str, Enum):
    auto = "auto"
    influence = "influence"
    loss = "loss"
    margin = "margin"
    gradnorm = "gradnorm"
    joint_loss = "joint-loss"


class Measure(str, Enum):
    self_influence = "self-influence"
    boundary_shift = "boundary-shift"
    parameter_shift = "parameter-shift"


class Curvature(str, Enum):
    auto = "auto"
    exact = "exact"
    kfac = "kfac"


class Boundary(str, Enum):
    head = "head"
    refit = "refit"


class RejudgeBoundary(str, Enum):
    head = "head"
    same = "same"


class Strategy(str, Enum):
    unlearn = "unlearn"
    crossfit = "crossfit"
    rejudge = "rejudge"
    gradual = "gradual"


class Scope(str, Enum):
    head = "head"
    full = "full"
    refit = "refit"


class Augment(str, Enum):
    none = "none"
    flip = "flip"
    crop_flip = "crop-flip"
    auto = "auto"


class Loss(str, Enum):
    ce = "ce"
    gce = "gce"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ChannelsLast(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


MODEL = "Model and preprocessing: what a first run needs"
RANKING = "Ranking"
EXPERT = "Expert: influence and the probe"
RUN = "Running"
GATE = "CI gate"
# Options shared by the commands that load a checkpoint.
ArchOpt = Annotated[Optional[str], typer.Option(
    help="Architecture when the checkpoint has no irank metadata: a built-in (tiny-cnn, small-cnn; for tensor rows "
    "mlp-IN, mlp-IN-HIDDEN[-HIDDEN...] or linear-IN, e.g. mlp-64-128 for 64-value embeddings), a torchvision "
    "model name (resnet18, ...), 'module.path:factory' or 'file.py:factory' (called with num_classes=C).",
    rich_help_panel=MODEL)]
HeadOpt = Annotated[Optional[str], typer.Option(help="Name of the head module (default: the last nn.Linear).", rich_help_panel=MODEL)]
ClassesOpt = Annotated[Optional[Path], typer.Option(
    help="Class list, one name per line, when the checkpoint has none (default: sorted unique labels).", rich_help_panel=MODEL)]
PresetOpt = Annotated[Optional[str], typer.Option(
    "--preprocess", help="Preprocessing preset: imagenet (resize 256, crop 224) or cifar10 (32, CIFAR mean/std). "
    "Images only: tensor rows are fed as stored.", rich_help_panel=MODEL)]
ImageSizeOpt = Annotated[Optional[int], typer.Option(help="Centre-crop images to this size (after --resize).", rich_help_panel=MODEL)]
ResizeOpt = Annotated[Optional[int], typer.Option(help="Resize the shorter side of images to this size first.", rich_help_panel=MODEL)]
BadImageOpt = Annotated[str, typer.Option("--on-bad-image", help="fail: stop at the first unreadable image or tensor row (missing file, unknown key, index out of range), before any output (default); skip: leave such rows out and list them (row, path, reason) in the sidecar.", rich_help_panel=MODEL)]
AllowOutsideOpt = Annotated[bool, typer.Option("--allow-outside-root", help="Read images or tensor files whose paths resolve outside the manifest's folder (../, absolute paths, symlinks out): only for manifests you trust.", rich_help_panel=MODEL)]
MeanOpt = Annotated[Optional[str], typer.Option(help="Normalization mean per channel, e.g. 0.5 or 0.485,0.456,0.406.", rich_help_panel=MODEL)]
StdOpt = Annotated[Optional[str], typer.Option(help="Normalization std per channel, e.g. 0.5 or 0.229,0.224,0.225.", rich_help_panel=MODEL)]
DeviceOpt = Annotated[Device, typer.Option(help="Where to run the model: auto picks CUDA when present.", rich_help_panel=RUN)]
BatchOpt = Annotated[int, typer.Option(help="Samples (images or tensor rows) per batch.", rich_help_panel=RUN)]
ChannelsLastOpt = Annotated[ChannelsLast, typer.Option(
    help="Run convolutions in channels-last (NHWC) memory layout: auto (default) turns it on for models with a 2-d "
    "convolution of 64 or more channels, whose kernels are faster in it (small-cnn on CPU: 1.4x); the results "
    "agree to float rounding.",
    rich_help_panel=RUN)]
PrecisionOpt = Annotated[Precision, typer.Option(
    help="Autocast precision of the model's pass: auto (bf16 on a CUDA device that has it, full precision on CPU), "
    "fp32, bf16 or fp16. Features and logits are kept in float32 and scores in float64 whatever it is.", rich_help_panel=RUN)]
WorkersOpt = Annotated[str, typer.Option(
    help="DataLoader worker processes for decoding images or reading tensor rows: a number (0: in the main process), "
    "or auto: for images the usable CPUs (split among torchrun's processes on a node), at most 8, none on a single "
    "CPU; for tensor rows none (reading rows from a file is faster in-process).", metavar="N|auto", rich_help_panel=RUN)]
MemoryBudgetOpt = Annotated[str, typer.Option(
    help="Per-sample arrays (a layer's features, head inputs, logits) kept in memory up to this size, e.g. 512MiB or "
    "4GB; past it they go to a temporary file (under $TMPDIR) read a block at a time, so memory stays flat in "
    "the number of rows. 0: always on disk.", rich_help_panel=RUN)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages on stderr.", rich_help_panel=RUN)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.", rich_help_panel=RUN)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from OUTPUT.resume (saved after every epoch); same result as an uninterrupted run.", rich_help_panel=RUN)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace outputs that exist already (default: refuse).", rich_help_panel=RUN)]


def model_options(arch, head, classes, preprocess, image_size, resize, mean, std, allow_outside_root=False,
                  on_bad_image="fail") -> ModelOptions:
    return ModelOptions(arch=arch, head=head, classes=str(classes) if classes else None, preprocess=preprocess,
                        allow_outside_root=allow_outside_root, on_bad_image=on_bad_image,
                        image_size=image_size, resize=resize, mean=mean, std=std)


def run_options(device, batch_size, num_workers, channels_last, precision, memory_budget=None) -> RunOptions:
    """RunOptions from the Running flags every model command shares (`--memory-budget` where it has one)."""
    budget = {} if memory_budget is None else {"memory_budget": parse_size(memory_budget)}
    return RunOptions(device=device.value, batch_size=batch_size, num_workers=parse_workers(num_workers),
                      channels_last=channels_last.value, precision=precision.value, **budget)


def parse_workers(text: str) -> int | None:
    """--num-workers: a whole number of at least 0, or auto (None)."""
    if text.strip().lower() == "auto":
        return None
    if not text.strip().isdigit():
        raise UsageError(f"--num-workers {text}: a whole number of 0 or more, or auto")
    return int(text)


def show_issue_summary(summary: dict, boundary: str, reporter, shown_pairs: int = 5) -> None:
    """How bad is the data, on stderr: the estimated wrong labels overall and per class, the pairs most confused."""
    if not reporter.speaks or getattr(reporter, "quiet", False):
        return
    reporter.info(f"estimated wrong labels: {summary['estimated_issues']:,} of {summary['rows']:,} "
                  f"({summary['share']:.1%}): the rows whose given label the {boundary} boundary does not predict")
    pairs = summary["confused_pairs"][:shown_pairs]
    if pairs:
        reporter.info("most confused (given → suggested): " + ", ".join(
            f"{pair['given']} → {pair['suggested']} {pair['count']:,}" for pair in pairs))
    table = Table(title="estimated wrong labels per class")
    for column in ("class", "rows", "estimated wrong", "share"):
        table.add_column(column, justify="left" if column == "class" else "right")
    rows = list(summary["per_class"].items())
    if len(rows) > 20:  # the classes with most, not a screen of them
        rows = sorted(rows, key=lambda item: -item[1]["estimated_issues"])[:10]
        table.caption = f"the 10 of {len(summary['per_class'])} classes with the most; all of them under --json"
    for name, row in rows:
        share = f"{row['estimated_issues'] / row['rows']:.1%}" if row["rows"] else "-"
        table.add_row(name, f"{row['rows']:,}", f"{row['estimated_issues']:,}", share)
    Console(stderr=True, highlight=False).print(table)


def print_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


@app.command()
def score(
    checkpoint: Annotated[Path, typer.Argument(help="Trained model: .safetensors, or a .pt/.pth state dict.")],
    manifest: Annotated[Path, typer.Argument(help="Samples to score: CSV/TSV/JSONL/Parquet with path and label columns, or an ImageFolder (FOLDER/<class>/<image>).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Scores table (CSV); '-' writes it to stdout.")],
    arch: ArchOpt = None, preprocess: PresetOpt = None, mean: MeanOpt = None, std: StdOpt = None,
    image_size: ImageSizeOpt = None, resize: ResizeOpt = None, classes: ClassesOpt = None, head: HeadOpt = None,
    allow_outside_root: AllowOutsideOpt = False, on_bad_image: BadImageOpt = "fail",
    boundary: Annotated[Boundary, typer.Option(help="refit (default): an L2-regularized linear probe refit on --layer's pooled features, a boundary that cannot bend around memorized labels; head: the checkpoint's own head, the paper's boundary.", rich_help_panel=RANKING)] = Boundary.refit,
    layer: Annotated[str, typer.Option(help="With --boundary refit: auto (the deepest block whose probe did not memorize the given labels; docs/how-it-works.md), head-input, or a module name from `irank layers`.", rich_help_panel=RANKING)] = "auto",
    method: Annotated[Method, typer.Option(help="What ranks the rows. auto (default): on a refit probe the joint loss, influence on the head. joint-loss: the probe's loss and the head's, their ranks averaged (a share in (0, 1]; it held best over the benchmark suite: docs/how-it-works.md); influence: the sample's influence on the boundary; loss, margin, gradnorm: read off the same boundary.", rich_help_panel=RANKING)] = Method.auto,
    influence_measure: Annotated[Optional[Measure], typer.Option(help="The influence measure: self-influence (default; rise of its own loss "
                                                       "if left out), boundary-shift (mean squared change of all logits) "
                                                       "or parameter-shift (‖Δθ‖). Giving it with --method auto ranks by influence on a refit "
                                                       "probe too.", show_default=False, rich_help_panel=EXPERT)] = None,
    curvature: Annotated[Optional[Curvature], typer.Option(help="With --boundary head --method influence: the head's curvature, exact Gauss-Newton, Kronecker-factored (kfac), "
                                                 "or auto (exact when small; the default).", show_default=False, rich_help_panel=EXPERT)] = None,
    damping: Annotated[Optional[float], typer.Option(help="With --boundary head --method influence: damping, relative to the mean eigenvalue of the curvature (default 0.01).", show_default=False, rich_help_panel=EXPERT)] = None,
    l2: Annotated[Optional[float], typer.Option(help="With --boundary refit: the probe's L2 strength on standardized features (default 0.1); with influence, also the probe's curvature damping.", show_default=False, rich_help_panel=EXPERT)] = None,
    choice_rows: Annotated[Optional[int], typer.Option(help="With --layer auto: every candidate layer is read and compared on a seeded random sample of this many rows (default 4096); the other rows then run only up to the chosen layer.", show_default=False, rich_help_panel=EXPERT)] = None,
    val: Annotated[Optional[Path], typer.Option(help="With --layer auto: a small clean labelled manifest; the layer whose probe (fitted on the given labels) is most accurate on it is chosen, instead of by held-out loss on the given labels.", rich_help_panel=EXPERT)] = None,
    device: DeviceOpt = Device.auto, batch_size: BatchOpt = 128, num_workers: WorkersOpt = "auto",
    channels_last: ChannelsLastOpt = ChannelsLast.auto, precision: PrecisionOpt = Precision.auto,
    memory_budget: MemoryBudgetOpt = DEFAULT_MEMORY_BUDGET,
    quiet: QuietOpt = False, json_out: JsonOpt = False, overwrite: OverwriteOpt = False,
    fail_over: Annotated[Optional[float], typer.Option(
        help="CI gate: after writing the scores, exit with code 4 if the estimated share of mislabeled samples "
        "(given label ≠ prediction) exceeds this share (0..1).", rich_help_panel=GATE)] = None,
    fail_score: Annotated[Optional[float], typer.Option(
        help="With --fail-over: gate on the share of samples whose score is at least this value instead (a value with units: --method auto then ranks by the probe's loss, not the joint loss).",
        rich_help_panel=GATE)] = None,
) -> None:
    """Rank every sample by how likely its label is wrong (rank 1 = the first to suspect), and say how bad the data is.

    By default each sample is ranked by the joint loss: its loss on an L2 probe refit at the deepest layer that did not memorize the given labels, and its loss on the checkpoint's own head, their ranks averaged (docs/how-it-works.md); --boundary head --method influence ranks by the paper's influence on the checkpoint's own head. One forward pass over the manifest; the CSV is sorted by rank with the columns rank, id, path, label, predicted, label_prob, predicted_prob, loss, score, class_rank, candidate_2, candidate_2_prob, candidate_3, candidate_3_prob and then the manifest's own columns. A sidecar SCORES.json records what was computed, the sha256 of the inputs and a summary: the estimated wrong labels overall and per class, and the class pairs they confuse (also on screen, and under "summary" with --json).

    With --fail-over the command is a CI gate: exit code 4 and a one-line reason on stderr when the share is over it; the scores are written either way.

    Example (a checkpoint irank wrote: it records its architecture and preprocessing): irank score model.safetensors train.csv -o scores.csv

    Example (a torchvision model's state dict, an ImageFolder): irank score model.pt data/train -o scores.csv --arch resnet18 --preprocess imagenet

    Example (a CI gate, docs/guides/ci-gate.md): irank score model.safetensors train.csv -o scores.csv --boundary head --fail-over 0.05
    """
    from irank.runtime.distributed import is_main
    from irank.stages.gate import check_gate, validate_gate
    from irank.stages.score import score as run_score

    if json_out and is_stdio(output):
        raise UsageError("--json and -o - both write to stdout; pick one")
    validate_gate(fail_over, fail_score, boundary.value)
    reporter = RichReporter(quiet)
    result = run_score(
        str(checkpoint), str(manifest), output=output, method=method.value,
        influence_measure=influence_measure.value if influence_measure else None,
        curvature=curvature.value if curvature else None, damping=damping,
        boundary=BoundaryOptions(kind=boundary.value, layer=layer, l2=l2, choice_rows=choice_rows,
                                 val=str(val) if val else None),
        model_options=model_options(arch, head, classes, preprocess, image_size, resize, mean, std, allow_outside_root, on_bad_image),
        run_options=run_options(device, batch_size, num_workers, channels_last, precision, memory_budget),
        reporter=reporter, overwrite=overwrite, with_units=fail_score is not None,
    )
    if not is_stdio(output):
        reporter.info(f"wrote {output} ({len(result.ranked)} rows) and {output}.json")
    show_issue_summary(result.sidecar["summary"], result.sidecar["parameters"]["boundary"], reporter)
    verdict = check_gate(result.ranked.verdict_columns(), fail_over=fail_over, fail_score=fail_score) if fail_over is not None else None
    if json_out:
        print_json({**result.sidecar, "output": output, "gate": verdict.to_dict() if verdict else None})
    if verdict is None:
        return
    if verdict.failed:
        if is_main():
            Console(stderr=True, highlight=False).print(f"irank: gate failed: {verdict.reason}", markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_GATE_FAILED)
    reporter.info(f"gate passed: {verdict.reason}")


@app.command()
def prune(
    scores: Annotated[str, typer.Argument(help="Scores table from irank score; '-' reads it from stdin.")],
    manifest: Annotated[Path, typer.Argument(help="The manifest that was scored.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Kept manifest: the input's rows, columns and order minus the removed rows.")],
    fraction: Annotated[Optional[float], typer.Option(help="Remove this share of the rows (0 < F < 1), from rank 1 down.")] = None,
    count: Annotated[Optional[int], typer.Option(help="Remove this many rows (per class with --per-class).")] = None,
    min_score: Annotated[Optional[float], typer.Option(help="Remove every row whose score is at least this.")] = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="Take the same fraction (or count) from each class, by class_rank.")] = False,
    min_per_class: Annotated[int, typer.Option(help="Never keep fewer than this many rows of a class.")] = 1,
    removed: Annotated[Optional[str], typer.Option(help="Also write the removed rows (with rank, class_rank, score) here.")] = None,
    quiet: QuietOpt = False, json_out: JsonOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """Remove the rows ranked first (the most suspect of a wrong label) from a manifest. Needs no model.

    Example: irank score ck.safetensors train.csv -o - | irank prune - train.csv --fraction 0.1 -o clean.csv
    """
    from irank.stages.prune import prune as run_prune

    if json_out and is_stdio(output):
        raise UsageError("--json and -o - both write to stdout; pick one")
    reporter = RichReporter(quiet)
    result = run_prune(scores, str(manifest), output=output, removed_output=removed, fraction=fraction, count=count,
                       min_score=min_score, per_class=per_class, min_per_class=min_per_class, overwrite=overwrite)
    summary = result.summary
    reporter.info(f"kept {summary['kept_rows']} of {summary['input_rows']} rows, removed {summary['removed_rows']}")
    if summary["unscored_rows_kept"]:
        reporter.warn(f"{summary['unscored_rows_kept']} manifest rows had no score and were kept")
    if json_out:
        print_json({**summary, "output": output, "removed_output": removed})


@app.command()
def review(
    scores: Annotated[str, typer.Argument(help="Scores table from irank score ('-' reads it from stdin).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write the review pack into (created; "
                                         "an earlier pack with no decisions filled in is replaced with --overwrite).")],
    top: Annotated[Optional[int], typer.Option(help="Flag this many rows, from rank 1 down (per class with "
                                               "--per-class). Default: 100 when --fraction is not given.")] = None,
    fraction: Annotated[Optional[float], typer.Option(help="Flag this share of the rows (0 < F ≤ 1) instead.")] = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="Take --top rows (or --fraction) from each class, by class_rank.")] = False,
    image_root: Annotated[Optional[Path], typer.Option(help="Folder that relative image paths resolve against "
                                                       "(default: the scored manifest's folder, from SCORES.json).")] = None,
    label_studio_root: Annotated[Optional[Path], typer.Option(help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: "
                                                              "task image URLs are relative to it (default: the image root).")] = None,
    image_url_prefix: Annotated[Optional[str], typer.Option(help="Serve the images yourself: Label Studio task image URLs "
                                                            "become this prefix (http://, https:// or /) and the image's "
                                                            "path under the image root, URL-quoted, instead of local-files URLs.")] = None,
    allow_outside_root: Annotated[bool, typer.Option("--allow-outside-root", help="Show images whose paths resolve "
                                                     "outside the image folder (../, absolute paths, symlinks out); "
                                                     "refused by default, as by every command.")] = False,
    quiet: QuietOpt = False, json_out: JsonOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """Write a review pack for annotators: index.html (decide on each card, download review.csv), review.csv (decision and new_label to fill in), label-studio.json and label-studio.xml.

    Example: irank review scores.csv -o review/ --top 200, then open review/index.html, decide, and download review.csv.
    """
    from irank.stages.review import review as run_review

    reporter = RichReporter(quiet)
    result = run_review(scores, output=str(output), top=top, fraction=fraction, per_class=per_class,
                        image_root_dir=str(image_root) if image_root else None,
                        label_studio_root=str(label_studio_root) if label_studio_root else None, overwrite=overwrite,
                        allow_outside_root=allow_outside_root, image_url_prefix=image_url_prefix)
    summary = result.summary
    if result.missing_images:
        reporter.warn(f"{len(result.missing_images)} of {summary['flagged_rows']} images not found or unreadable "
                      f"(first: {result.missing_images[0]}: {result.image_problems[0]}); their cards show a "
                      "placeholder. Pass --image-root DIR if they moved.")
    if summary["label_studio_images_outside_root"]:
        where = (f"the image root {summary['image_root']}; their URLs append their absolute paths to --image-url-prefix"
                 if summary["image_url_prefix"] else
                 f"--label-studio-root {summary['label_studio_root']}; their Label Studio URLs are relative to /")
        reporter.warn(f"{summary['label_studio_images_outside_root']} images lie outside {where}")
    reporter.info(f"wrote {output}/ with {summary['flagged_rows']} flagged rows: index.html, review.csv, "
                  f"label-studio.json (images resolved against {summary['image_root_source']})")
    if json_out:
        print_json({**summary, "output": str(output)})


@app.command("apply")
def apply_command(
    reviewed: Annotated[str, typer.Argument(help="review.csv with decision and new_label filled in, or a Label Studio "
                                            "JSON export of the tasks irank review wrote.")],
    manifest: Annotated[Path, typer.Argument(help="The manifest that was scored.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Fixed manifest: the input's columns and row order, "
                                        "relabeled rows changed, removed rows dropped.")],
    audit: Annotated[Optional[str], typer.Option(help="Audit log to write: id, old_label, new_label, decision per reviewed row.")] = None,
    classes: Annotated[Optional[Path], typer.Option(help="Class list, one name per line, that new_label must be in "
                                                    "(default: review.json beside REVIEWED, else the manifest's labels).")] = None,
    quiet: QuietOpt = False, json_out: JsonOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """Apply annotators' decisions to a manifest: relabel → new_label, remove → dropped, keep or empty → unchanged.

    Example: irank apply review/review.csv train.csv -o train-fixed.csv --audit audit.csv
    """
    from irank.stages.apply import apply_review

    if json_out and is_stdio(output):
        raise UsageError("--json and -o - both write to stdout; pick one")
    reporter = RichReporter(quiet)
    result = apply_review(reviewed, str(manifest), output=output, audit_output=audit,
                          classes_file=str(classes) if classes else None, overwrite=overwrite)
    summary = result.summary
    reporter.info(f"classes from {summary['class_source']}")
    reporter.info(f"{summary['reviewed_rows']} reviewed rows: {summary['relabeled']} relabeled, {summary['removed']} "
                  f"removed, {summary['kept']} kept; {summary['output_rows']} of {summary['input_rows']} rows written")
    if json_out:
        print_json({**summary, "output": output, "audit_output": audit})


def train_options(scope=None, epochs=None, lr=None, weight_decay=None, augment=None, seed=None, l2=None, loss=None,
                  layer=None):
    """TrainOptions from the training flags, None where a flag was not given (the library fills in the command's
    defaults where they act, and refuses a flag that would do nothing)."""
    from irank.options import TrainOptions

    return TrainOptions(scope=scope.value if scope else None, epochs=epochs, lr=lr, weight_decay=weight_decay,
                        augment=augment.value if augment else None, seed=seed, l2=l2,
                        loss=loss.value if loss else None, layer=layer)


@app.command()
def refine(
    checkpoint: Annotated[Path, typer.Argument(help="The model to fine-tune.")],
    manifest: Annotated[Path, typer.Argument(help="The (cleaned) manifest to fine-tune on, or an ImageFolder.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Refined checkpoint (.safetensors, with irank metadata).")],
    scope: Annotated[Optional[Scope], typer.Option(help="head (default): fine-tune the last linear layer only, on features computed once; full: the whole network; refit: refit the head from scratch as an L2-regularized softmax regression on the frozen features (convex, deterministic; see --l2).", show_default=False)] = None,
    l2: Annotated[Optional[float], typer.Option(help=f"With --scope refit: L2 strength on standardized features (default {REFINE.l2:g}).", show_default=False)] = None,
    layer: Annotated[Optional[str], typer.Option(help="With --scope refit: refit on this layer's pooled output (see `irank layers`); the written model is the network cut at that layer plus the refit head.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Passes over the manifest (head and full scopes; default {REFINE.epochs}).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate of SGD with momentum 0.9, cosine decay (default {REFINE.lr:g}).", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=f"L2 weight decay (default {REFINE.weight_decay:g}).", show_default=False)] = None,
    augment: Annotated[Optional[Augment], typer.Option(help="Training augmentation (default none); auto: random crops and flips on images of a known size, flips on other images, none on tensor rows.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for shuffling and augmentation (default 0).", show_default=False)] = None,
    loss: Annotated[Optional[Loss], typer.Option(help="Training loss (head and full scopes): ce (cross-entropy, the default) or gce (generalized cross-entropy, q=0.7: a noise-robust loss).", show_default=False)] = None,
    val: Annotated[Optional[Path], typer.Option(help="Clean labelled manifest: accuracy after every epoch, the best epoch is kept.")] = None,
    arch: ArchOpt = None, head: HeadOpt = None, classes: ClassesOpt = None, preprocess: PresetOpt = None,
    image_size: ImageSizeOpt = None, resize: ResizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
    allow_outside_root: AllowOutsideOpt = False, on_bad_image: BadImageOpt = "fail",
    device: DeviceOpt = Device.auto, batch_size: BatchOpt = 128, num_workers: WorkersOpt = "auto",
    channels_last: ChannelsLastOpt = ChannelsLast.auto, precision: PrecisionOpt = Precision.auto,
    quiet: QuietOpt = False, json_out: JsonOpt = False, overwrite: OverwriteOpt = False, resume: ResumeOpt = False,
) -> None:
    """Fine-tune a checkpoint on a manifest and save it as safetensors that score and eval load with no flags.

    Example: irank refine model.safetensors clean.csv -o refined.safetensors --scope full --epochs 3
    """
    from irank.stages.refine import refine as run_refine

    reporter = RichReporter(quiet)
    options = train_options(scope, epochs, lr, weight_decay, augment, seed, l2, loss, layer)
    result = run_refine(
        str(checkpoint), str(manifest), output=output, train_options=options,
        val=str(val) if val else None, model_options=model_options(arch, head, classes, preprocess, image_size, resize, mean, std, allow_outside_root, on_bad_image),
        run_options=run_options(device, batch_size, num_workers, channels_last, precision), reporter=reporter,
        overwrite=overwrite, resume=resume,
    )
    reporter.info(f"wrote {output} (best epoch {result.best_epoch})")
    if json_out:
        print_json({"output": output, "best_epoch": result.best_epoch, "history": result.history})


@app.command()
def train(
    arch: Annotated[str, typer.Argument(help="Architecture to build from random weights (tiny-cnn, small-cnn, resnet18, module:factory, ...; for tensor rows of IN values mlp-IN-HIDDEN[-HIDDEN...] or linear-IN, e.g. mlp-64-128).")],
    manifest: Annotated[Path, typer.Argument(help="Labelled manifest to train on, or an ImageFolder (FOLDER/<class>/<image>).")],
    output: Annotated[str, typer.Option("-o", "--output", help="Trained checkpoint (.safetensors).")],
    epochs: Annotated[Optional[int], typer.Option(help=f"Passes over the manifest (default {TRAIN.epochs}).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate of SGD with momentum 0.9, cosine decay (default {TRAIN.lr:g}).", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=f"L2 weight decay (default {TRAIN.weight_decay:g}).", show_default=False)] = None,
    augment: Annotated[Optional[Augment], typer.Option(help="Training augmentation (default none); auto: random crops and flips on images of a known size, flips on other images, none on tensor rows.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for initialization, shuffling and augmentation (default 0).", show_default=False)] = None,
    val: Annotated[Optional[Path], typer.Option(help="Labelled manifest scored after every epoch; the best epoch is kept.")] = None,
    loss: Annotated[Optional[Loss], typer.Option(help="ce (cross-entropy, the default) or gce (generalized cross-entropy, q=0.7: a noise-robust loss).", show_default=False)] = None,
    classes: ClassesOpt = None, preprocess: PresetOpt = None,
    image_size: ImageSizeOpt = None, resize: ResizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
    allow_outside_root: AllowOutsideOpt = False, on_bad_image: BadImageOpt = "fail",
    device: DeviceOpt = Device.auto, batch_size: BatchOpt = 128, num_workers: WorkersOpt = "auto",
    channels_last: ChannelsLastOpt = ChannelsLast.auto, precision: PrecisionOpt = Precision.auto,
    quiet: QuietOpt = False, json_out: JsonOpt = False, overwrite: OverwriteOpt = False, resume: ResumeOpt = False,
) -> None:
    """Train a classifier from scratch (all layers), e.g. to get a base model for the demo or a benchmark."""
    from irank.stages.refine import train as run_train

    reporter = RichReporter(quiet)
    result = run_train(
        arch, str(manifest), output=output, train_options=train_options(None, epochs, lr, weight_decay, augment, seed, loss=loss),
        val=str(val) if val else None, model_options=model_options(None, None, classes, preprocess, image_size, resize, mean, std, allow_outside_root, on_bad_image),
        run_options=run_options(device, batch_size, num_workers, channels_last, precision), reporter=reporter,
        overwrite=overwrite, resume=resume,
    )
    reporter.info(f"wrote {output}")
    if json_out:
        print_json({"output": output, "best_epoch": result.best_epoch, "history": result.history})


@app.command("post-train")
def post_train(
    checkpoint: Annotated[Path, typer.Argument(help="The trained model to post-train.")],
    manifest: Annotated[Path, typer.Argument(help="Its (noisy) training manifest, or an ImageFolder.")],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for final.safetensors, scores.csv, kept.csv, removed.csv, summary.json (and round-NN/ of gradual and rejudge); run the same command again to resume, or pass --overwrite to start afresh.")],
    arch: ArchOpt = None, head: HeadOpt = None, classes: ClassesOpt = None, preprocess: PresetOpt = None,
    image_size: ImageSizeOpt = None, resize: ResizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
    allow_outside_root: AllowOutsideOpt = False, on_bad_image: BadImageOpt = "fail",
    strategy: Annotated[Optional[Strategy], typer.Option(help="unlearn (the default): fine-tune the whole network once on every row with the noise-robust GCE loss, then rank every row by how hard the fine-tune fought its label (its area under the margin) and by the fine-tuned model's own loss; the best ranking measured on the benchmark suite (docs/benchmarks/posttrain-default.md). crossfit: that fine-tune once on each half of the rows, every row ranked by its loss under the model that trained on it and under the one that did not, then the fine-tune on the rows kept; twice the training. rejudge: rounds of rank every row, remove the top --budget, fine-tune on the rest (= --rejudge). gradual: the paper's loop, removing --step per round (the default when --rounds or --step is given).", show_default=False)] = None,
    rounds: Annotated[Optional[int], typer.Option(help=f"gradual and rejudge: number of rounds (gradual: default {5} when only a budget is known; rejudge: 3).")] = None,
    step: Annotated[Optional[float], typer.Option(help="gradual: share of the ORIGINAL size removed per round.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Share of the rows to remove (gradual: over all rounds). Default: estimated as the share whose label the model disagrees with (unlearn: the fine-tuned model; gradual: the input); rejudge needs it.")] = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="Remove the same share from each class in every round.")] = False,
    min_per_class: Annotated[int, typer.Option(help="Never keep fewer than this many rows of a class.")] = 1,
    scope: Annotated[Optional[Scope], typer.Option(help="How the model is refined: full (the whole network; the default of unlearn and rejudge), head (fine-tune the head) or refit (the head refit from scratch on frozen features, convex; the default of gradual).", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of each fine-tune (head and full scopes). Default: unlearn 30, rejudge 10 per round, gradual 2 per round.", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (head and full scopes). Default 0.1; gradual 0.01.", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="L2 weight decay (head and full scopes; default 5e-4).", show_default=False)] = None,
    l2: Annotated[Optional[float], typer.Option(help="L2 strength of the refit (scope refit; default 0.001).", show_default=False)] = None,
    augment: Annotated[Optional[Augment], typer.Option(help="Training augmentation (full scope); auto: random crops and flips on images of a known size, flips on other images, none on tensor rows. Default auto; gradual none.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for shuffling and augmentation (default 0).", show_default=False)] = None,
    loss: Annotated[Optional[Loss], typer.Option(help="Training loss of the fine-tunes (head and full scopes): ce (cross-entropy) or gce (generalized cross-entropy, q=0.7: a noise-robust loss). Default gce; gradual ce.", show_default=False)] = None,
    val: Annotated[Optional[Path], typer.Option(help="Clean labelled manifest: unlearn keeps the fine-tune's best epoch on it; gradual and rejudge stop when its accuracy stops improving and keep the best round (with --boundary refit --layer auto, round 1 also chooses the layer by the probes' accuracy on it).")] = None,
    patience: Annotated[Optional[int], typer.Option(help="gradual and rejudge, with --val: rounds without improvement before stopping (default 1).", show_default=False)] = None,
    method: Annotated[Method, typer.Option(help="Score used to rank; auto (default): unlearn: the fine-tune's area under the margin and the fine-tuned model's loss, ranks averaged (aum-loss); the loss on a fine-tuned model's own head (crossfit; rejudge's rounds 2 on) and on a refit probe; influence on the input's head (gradual). Another method ranks by it alone.")] = Method.auto,
    influence_measure: Annotated[Optional[Measure], typer.Option(help="The influence measure (default self-influence); giving it with --method auto ranks by influence on a refit probe too.", show_default=False, rich_help_panel=EXPERT)] = None,
    curvature: Annotated[Optional[Curvature], typer.Option(help="With influence on a head: its curvature, exact, kfac or auto (the default).", show_default=False, rich_help_panel=EXPERT)] = None,
    damping: Annotated[Optional[float], typer.Option(help="With influence on a head: damping relative to the mean eigenvalue of the curvature (default 0.01).", show_default=False, rich_help_panel=EXPERT)] = None,
    boundary: Annotated[Optional[Boundary], typer.Option(help="head: rank on the model's own head (the default of unlearn and gradual); refit: on an L2 probe refit at --layer (the default of rejudge's round 1, at --layer auto).", show_default=False)] = None,
    layer: Annotated[Optional[str], typer.Option(help="With --boundary refit: the probe's layer, or auto (chosen in round 1). With --scope refit the refined model is the network cut there plus the probe.")] = None,
    probe_l2: Annotated[Optional[float], typer.Option(help="With --boundary refit: the scoring probe's L2 strength (default 0.1).", show_default=False, rich_help_panel=EXPERT)] = None,
    rejudge: Annotated[bool, typer.Option("--rejudge", help="= --strategy rejudge. Rank EVERY input row again each round under the last round's model (rounds 2 on: its own head, see --rejudge-boundary), remove the top --budget of them and refine that model on the rest: a row removed once comes back when the refined model no longer suspects it. The answer: every row ranked once more under the final model. Default 3 rounds. Needs --budget. Its defaults are the recipe that ranked best on the benchmark: --boundary refit --layer auto for round 1, --scope full --augment auto --lr 0.1 --epochs 10 --loss gce for the fine-tunes (docs/benchmarks/posttrain-default.md); any of them given explicitly wins.")] = False,
    rejudge_boundary: Annotated[Optional[RejudgeBoundary], typer.Option(help="With --rejudge, what rounds 2 on rank on: head (default), the refined model's own head, trained without the last round's suspects (by its loss with --method auto; it ranked best on the benchmark); or same, --boundary and --method as in round 1.", show_default=False)] = None,
    device: DeviceOpt = Device.auto, batch_size: BatchOpt = 128, num_workers: WorkersOpt = "auto",
    channels_last: ChannelsLastOpt = ChannelsLast.auto, precision: PrecisionOpt = Precision.auto,
    memory_budget: MemoryBudgetOpt = DEFAULT_MEMORY_BUDGET,
    quiet: QuietOpt = False, json_out: JsonOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """Post-train: refine a model trained on noisy labels, rank every row under the refined model, remove the top.

    Default (--strategy unlearn): fine-tune the whole network once on every row for 30 epochs with the noise-robust GCE loss, random crops and flips and learning rate 0.1, which unlearns the labels it memorized; then rank every row by its area under the margin over the fine-tune (how long the fine-tune kept preferring another class) and the fine-tuned model's own loss, their ranks averaged, and remove the top --budget (without one: the share whose label the fine-tuned model disagrees with). It ranked best on the benchmark suite and gave the best model on checkpoints that memorized their labels; on checkpoints trained with augmentation the model gained nothing (docs/benchmarks/posttrain-default.md). Writes DIR/final.safetensors (the fine-tuned model), DIR/scores.csv (every row ranked), DIR/margins.safetensors (each row's area under the margin), DIR/kept.csv, DIR/removed.csv and DIR/summary.json. The same command run again resumes after the fine-tune's last finished epoch.

    --strategy crossfit: the same fine-tune once on each half of the rows (DIR/fold0.csv, DIR/fold1.csv), every row ranked by its loss under the model that trained on it and under the one that did not (their rank shares averaged), the top --budget removed (without one: the share whose label the model that trained on it disagrees with), then the checkpoint fine-tuned on the rows kept into DIR/final.safetensors: twice the training of the default; on human-like noise it ranked above the default's loss alone, below the default's margins and loss (docs/benchmarks/posttrain-default.md). Each fine-tune resumes from its last finished epoch. One process only.

    --rejudge: rounds that each rank every input row under the last round's model, remove the top --budget and refine on the rest; then every row is ranked once more under the final model and its top --budget is the answer (the same DIR files, and DIR/round-NN/). --strategy gradual (the default when --rounds or --step is given), the paper's loop: round by round, score the kept samples under the current model, remove the top --step share (of the original size), refine on the rest; DIR/removed.csv holds every removed row with its round and rank, DIR/final.safetensors the best round with --val, else the last. Both resume after the last finished round.

    Example: irank post-train model.safetensors train.csv --out-dir post

    Example: irank post-train model.safetensors train.csv --out-dir post --strategy crossfit

    Example: irank post-train model.safetensors train.csv --out-dir post --budget 0.3 --rejudge

    Example: irank post-train model.safetensors train.csv --out-dir post --budget 0.3 --rounds 6 --val val.csv
    """
    from irank.options import LoopOptions, resolve_strategy
    from irank.workflows.post_train import post_train as run_post_train

    reporter = RichReporter(quiet)
    if rejudge and strategy not in (None, Strategy.rejudge):
        raise UsageError(f"--rejudge is --strategy rejudge; it cannot go with --strategy {strategy.value}")
    chosen = resolve_strategy("rejudge" if rejudge else strategy.value if strategy else None, rounds, step)
    if strategy is None and not rejudge:
        reporter.info(f"strategy: {chosen}" + (" (--rounds or --step given)" if chosen == "gradual" else
                                               " (the default; --strategy gradual is the paper's loop)"))
    table = Table(title="post-train rounds")
    for column in ("round", "removed", "kept", "val accuracy", "seconds"):
        table.add_column(column, justify="right")

    def show(record: dict) -> None:
        accuracy = f"{record['val_accuracy']:.4f}" if "val_accuracy" in record else "-"
        seconds = f"{sum(record['seconds'].values()):.1f}"
        table.add_row(str(record["round"]), str(record["removed"]), str(record["kept"]), accuracy, seconds)
        reporter.info(f"round {record['round']}: removed {record['removed']}, kept {record['kept']}, val accuracy {accuracy}")

    result = run_post_train(
        str(checkpoint), str(manifest), out_dir=str(out_dir),
        loop=LoopOptions(rounds=rounds, step=step, budget=budget, per_class=per_class, min_per_class=min_per_class,
                         patience=patience, method=method.value,
                         influence_measure=influence_measure.value if influence_measure else None,
                         curvature=curvature.value if curvature else None, damping=damping,
                         boundary=boundary.value if boundary else None, layer=layer, probe_l2=probe_l2, strategy=chosen,
                         rejudge_boundary=rejudge_boundary.value if rejudge_boundary else None),
        train_options=train_options(scope, epochs, lr, weight_decay, augment, seed, l2, loss),
        val=str(val) if val else None,
        model_options=model_options(arch, head, classes, preprocess, image_size, resize, mean, std, allow_outside_root, on_bad_image),
        run_options=run_options(device, batch_size, num_workers, channels_last, precision, memory_budget),
        reporter=reporter, on_round=show, overwrite=overwrite,
    )
    summary = result.summary
    if json_out:
        print_json(summary)
        return
    if chosen in ("unlearn", "crossfit"):
        judgement = summary["judgement"]
        trained_on, judged = ("every row", "") if chosen == "unlearn" else ("the rows kept", " in and out of sample")
        measure = MEASURE_NAMES.get(judgement["method"], judgement["method"])
        reporter.info(f"final model: {result.final_model} (fine-tuned on {trained_on}); ranked every row by its "
                      f"{measure}{judged} into {out_dir / 'scores.csv'}; removed {judgement['removed']} "
                      f"({judgement['budget']:.1%}, {summary['plan']['budget_source']}) into {out_dir / 'removed.csv'}, "
                      f"kept {judgement['kept']} in {out_dir / 'kept.csv'}")
        if summary["plan"]["budget_source"] == "estimated":
            reporter.info(ESTIMATED_BUDGET)
        return
    if not quiet and reporter.speaks:
        Console(stderr=True).print(table)
    reporter.info(f"{summary.get('stopped_because', 'done')}; final model: {result.final_model} (round {summary['final_round']})")


@app.command("eval")
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="The model to evaluate.")],
    manifest: Annotated[Path, typer.Argument(help="Labelled manifest (ideally clean labels), or an ImageFolder.")],
    arch: ArchOpt = None, head: HeadOpt = None, classes: ClassesOpt = None, preprocess: PresetOpt = None,
    image_size: ImageSizeOpt = None, resize: ResizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
    allow_outside_root: AllowOutsideOpt = False, on_bad_image: BadImageOpt = "fail",
    device: DeviceOpt = Device.auto, batch_size: BatchOpt = 128, num_workers: WorkersOpt = "auto",
    channels_last: ChannelsLastOpt = ChannelsLast.auto, precision: PrecisionOpt = Precision.auto,
    quiet: QuietOpt = False, json_out: JsonOpt = False,
) -> None:
    """Accuracy of a checkpoint on a manifest, overall and per class.

    Example: irank eval refined.safetensors test.csv --json
    """
    from irank.stages.evaluate import evaluate as run_evaluate

    report = run_evaluate(
        str(checkpoint), str(manifest), model_options=model_options(arch, head, classes, preprocess, image_size, resize, mean, std, allow_outside_root, on_bad_image),
        run_options=run_options(device, batch_size, num_workers, channels_last, precision), reporter=RichReporter(quiet),
    )
    if json_out:
        print_json(report)
        return
    table = Table(title=f"{checkpoint} on {manifest}")
    table.add_column("class")
    table.add_column("samples", justify="right")
    table.add_column("accuracy", justify="right")
    for name, row in report["per_class"].items():
        table.add_row(name, str(row["count"]), f"{row['accuracy']:.4f}")
    table.add_row("[bold]all", str(report["num_samples"]), f"[bold]{report['accuracy']:.4f}")
    stdout.print(table)


@app.command()
def manifest(
    image_dir: Annotated[Path, typer.Argument(help="An ImageFolder tree: IMAGE_DIR/<class>/<image>.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Manifest to write (CSV/TSV/JSONL/Parquet by extension; '-' for stdout).")],
    quiet: QuietOpt = False, overwrite: OverwriteOpt = False,
) -> None:
    """Write a manifest (path, label) for an ImageFolder tree; paths are relative to the manifest's folder.

    Written outside the images' folder, its rows point back into it: a sidecar MANIFEST.json records that folder,
    sealed, so every irank command reads it with no flag (docs/guides/manifests.md).

    Example: irank manifest data/train -o train.csv
    """
    from irank.stages.manifest import write_manifest

    summary = write_manifest(str(image_dir), output, overwrite=overwrite)
    if not is_stdio(output):
        RichReporter(quiet).info(f"wrote {output}: {summary['rows']} images in {summary['classes']} classes")


@app.command()
def demo(
    folder: Annotated[Path, typer.Argument(help="Where to write the demo's data, models and tables.")] = Path("irank-demo"),
    noise: Annotated[float, typer.Option(help="Share of training labels flipped to a wrong class.")] = 0.25,
    seed: Annotated[int, typer.Option(help="Seed for the data and the training.")] = 0,
    quiet: QuietOpt = False, json_out: JsonOpt = False,
) -> None:
    """Run the whole pipeline offline on a small generated image set with flipped labels (about a minute on 2 CPU cores).

    Makes the data, trains a small CNN on the noisy labels, then score → prune → refine, and reports how many flipped labels the influential rank caught and the test accuracy before and after.
    """
    from irank.workflows.demo import run_demo

    reporter = RichReporter(quiet)
    summary = run_demo(folder, noise=noise, seed=seed, reporter=reporter)
    if json_out:
        print_json(summary)
        return
    table = Table(title="irank demo")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("flipped training labels", f"{summary['flipped_labels']} of {summary['train_rows']}"),
        ("removed (first in the rank)", str(summary["removed"])),
        ("flipped labels among them", f"{summary['flipped_among_removed']} ({summary['precision_at_k']:.1%})"),
        ("AUROC of the rank for flipped labels", f"{summary['auroc']:.3f}"),
        ("model's fit to the noisy labels", f"{summary['train_accuracy_on_noisy_labels']:.1%}"),
        ("test accuracy before", f"{summary['test_accuracy_before']:.1%}"),
        ("test accuracy after refine", f"{summary['test_accuracy_after']:.1%}"),
        ("files", f"{folder}/ (scores.csv, clean.csv, removed.csv, refined.safetensors)"),
        ("time", f"{summary['seconds']:.0f} s"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    stdout.print(table)


@app.command()
def layers(
    checkpoint: Annotated[Path, typer.Argument(help="The model whose layers to list.")],
    arch: ArchOpt = None, head: HeadOpt = None, classes: ClassesOpt = None,
    image_size: Annotated[int, typer.Option(help="Side of the square dummy input used to trace shapes (default: the checkpoint's, else 224).")] = 0,
    input_shape: Annotated[Optional[str], typer.Option(help="Shape of one tensor row for the dummy input, e.g. 64 or 1,40,100 (default: what the checkpoint was trained on; an mlp-IN's width).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the layers --layer can name, with their output shapes and pooled feature sizes; marks the ones --layer auto tries."""
    from irank.model.layers import list_layers, parse_input_shape

    rows = list_layers(str(checkpoint), ModelOptions(arch=arch, head=head, classes=str(classes) if classes else None),
                       image_size or None, parse_input_shape(input_shape))
    if json_out:
        print_json({"layers": rows})
        return
    table = Table(title=f"layers of {checkpoint}")
    for column in ("layer", "type", "output shape", "pooled features", "auto candidate"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["type"], "×".join(map(str, row["shape"])), str(row["pooled"]), "yes" if row["candidate"] else "")
    stdout.print(table)


@app.command()
def version() -> None:
    """Print irank's version."""
    sys.stdout.write(f"irank {__version__}\n")


class _OneProcess:
    """What `_main` asks of the process group when there is none: this process is the whole group (and the
    command's --help, or `irank version`, imports no torch)."""

    @staticmethod
    def is_main() -> bool:
        return True

    @staticmethod
    def settle() -> None:
        pass

    @staticmethod
    def reports_here(error: BaseException) -> bool:
        return True

    @staticmethod
    def active() -> bool:
        return False


def main() -> None:
    """Entry point: turns IrankError into one line on stderr and exit code 3, Ctrl-C into 130.

    Under torchrun every process runs the command on its share of the rows. Only rank 0 writes to stdout
    and stderr; an error is printed once, by the process that saw it.
    """
    install_signal_handlers()
    if not launched_by_torchrun():
        _main(_OneProcess)
        return
    from irank.runtime import distributed

    try:
        with distributed.process_group():
            if distributed.is_main():
                _main(distributed)
                return
            report_to = sys.stderr  # the real stderr: an error this process saw is its to print
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                _main(distributed, report_to=report_to)
    except SystemExit as exit_:
        _leave(exit_.code)


def _leave(code) -> None:
    """End a torchrun process now that it has left the process group, without the interpreter's teardown:
    gloo's threads can still hold tensors then, and freeing them while Python shuts down aborts the
    process ("terminate called without an active exception", exit -6) after its work was done and written."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        with contextlib.suppress(Exception):
            sys.__stderr__.write(f"{code}\n")
            sys.__stderr__.flush()
        code = 1
    os._exit(code)


def _main(distributed, report_to=None) -> None:
    """Run the command; `distributed`: the process group (irank.runtime.distributed, or `_OneProcess`)."""
    errors = Console(stderr=True, highlight=False) if report_to is None else Console(file=report_to, highlight=False)

    def interrupted(interrupt: BaseException) -> NoReturn:
        line, code = interrupt_message(interrupt)
        if distributed.is_main():
            errors.print(line, markup=False, soft_wrap=True)
        sys.exit(code)

    try:
        app()
    except SystemExit as exit_:
        # typer turns Ctrl-C (and SIGTERM, raised as a KeyboardInterrupt) into a silent exit 130: say what happened
        cause = getattr(exit_.__context__, "__cause__", None)
        if exit_.code == EXIT_INTERRUPTED and isinstance(cause, KeyboardInterrupt):
            interrupted(cause)
        # success too: every process reaches the end before any leaves the group (gloo can abort a
        # process whose peer tore its connections down first: "terminate called without an active exception")
        distributed.settle()
        raise
    except IrankError as error:
        if distributed.reports_here(error):
            errors.print(f"irank: error: {error}", markup=False, soft_wrap=True)
        distributed.settle()
        sys.exit(error.exit_code)
    except OSError as error:  # a file the user named cannot be read or written (permissions, full disk)
        where = f": {error.filename}" if error.filename else ""
        if distributed.reports_here(error):
            errors.print(f"irank: error: {error.strerror or error}{where}", markup=False, soft_wrap=True)
        distributed.settle()
        sys.exit(EXIT_INPUT_ERROR)
    except KeyboardInterrupt as interrupt:
        interrupted(interrupt)
    except Exception as error:
        if stopped_by:  # a DataLoader worker killed by the same SIGTERM: the signal is the news, not the worker
            interrupted(error)
        if not distributed.active():
            raise
        # A bug: its traceback from every process that hit it (better twice than never), then stop with the others.
        traceback.print_exc(file=report_to or sys.stderr)
        distributed.settle()
        sys.exit(1)
