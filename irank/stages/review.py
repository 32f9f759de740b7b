"""`irank review`: a scores table → a review pack for annotators (HTML page, review.csv, Label Studio tasks).

The pack is a folder: `index.html` (self-contained: thumbnails embedded as data URIs, no network),
`review.csv` (the flagged rows with empty `decision` and `new_label` columns), `label-studio.json`
(image-classification tasks with irank's suggestion as a pre-annotation) plus the matching
`label-studio.xml` labeling config, and `review.json` (provenance and the class list `irank apply` reads).
It is built in a temporary sibling folder and renamed into place, so it appears whole or not at all.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from irank._version import __version__
from irank.core.selection import removal_mask
from irank.formats.files import is_stdio, sha256_file
from irank.formats.manifest import TableSource, read_table
from irank.formats.review_page import render_page, tensor_placeholder
from irank.formats.scores_table import ScoreColumns, flagged_rows, read_score_columns
from irank.formats.tensor_rows import is_tensor_path
from irank.runtime.errors import ManifestError, UsageError

DEFAULT_TOP = 100
THUMBNAIL_SIZE = 160
REVIEW_COLUMNS = ("decision", "new_label")
DECISIONS = ("keep", "relabel", "remove")
LABEL_STUDIO_LABEL = "label"  # from_name of the class choice in label-studio.xml
LABEL_STUDIO_DECISION = "irank_decision"  # from_name of the optional "remove" choice
LABEL_STUDIO_REMOVE = "remove from the data set"


@dataclass
class ReviewResult:
    flagged: pd.DataFrame  # the review.csv rows, sorted by rank
    summary: dict  # as written to review.json
    missing_images: list[str]


def validate_selection(top: int | None, fraction: float | None) -> None:
    if top is not None and fraction is not None:
        raise UsageError("give --top or --fraction, not both")
    if top is not None and top < 1:
        raise UsageError(f"--top {top}: must be 1 or more")
    if fraction is not None and not 0 < fraction <= 1:
        raise UsageError(f"--fraction {fraction}: must be greater than 0 and at most 1")


def flagged_mask(columns: ScoreColumns, *, top: int | None = None, fraction: float | None = None,
                 per_class: bool = False) -> np.ndarray:
    """The rows to hand to annotators: the first `top` in the rank (per class with per_class) or a fraction of them."""
    validate_selection(top, fraction)
    if top is None and fraction is None:
        top = DEFAULT_TOP
    if fraction == 1:
        return np.ones(len(columns), dtype=bool)
    return removal_mask(columns.score, columns.rank, columns.class_rank, columns.labels.codes, count=top,
                        fraction=fraction, per_class=per_class, min_per_class=0)


def rows_per_class(columns: ScoreColumns) -> pd.Series:
    """How many scored rows each label has (indexed by the label)."""
    counts = np.bincount(columns.labels.codes, minlength=len(columns.labels.values))
    return pd.Series(counts, index=pd.Index(list(columns.labels.values), name="label"), dtype=np.int64)


def read_scores_sidecar(scores: str) -> dict:
    """The JSON sidecar irank score wrote beside the scores, or {} when there is none."""
    if is_stdio(scores):
        return {}
    sidecar = Path(scores + ".json")
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"scores sidecar {sidecar}: cannot read it as JSON: {exc}") from None


def image_root(scores: str, sidecar: dict, override: str | None) -> tuple[Path, str]:
    """The folder relative image paths resolve against, and a phrase saying why."""
    if override is not None:
        if not Path(override).is_dir():
            raise UsageError(f"--image-root {override}: not a folder")
        return Path(override).resolve(), f"--image-root {override}"
    manifest_path = sidecar.get("inputs", {}).get("manifest", {}).get("path")
    if manifest_path and not is_stdio(manifest_path) and Path(manifest_path).is_file():
        return Path(manifest_path).resolve().parent, f"the scored manifest's folder ({manifest_path})"
    if is_stdio(scores):
        return Path.cwd(), "the current folder (scores read from stdin)"
    return Path(scores).resolve().parent, f"the scores file's folder ({scores})"


def resolve_image(path: str, root: Path) -> Path:
    return Path(path) if os.path.isabs(path) else root / path


def thumbnail_data_uri(image_path: Path, size: int = THUMBNAIL_SIZE) -> str | None:
    """A small PNG (or JPEG for large photos) of the image as a data URI; None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(image_path) as image:
            image.thumbnail((size, size))
            has_alpha = image.mode in ("RGBA", "LA", "P")
            picture = image.convert("RGBA" if has_alpha else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    small = picture.width * picture.height <= 64 * 64
    if small or has_alpha:
        picture.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        picture.save(buffer, format="JPEG", quality=85)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def review_table(flagged: pd.DataFrame) -> pd.DataFrame:
    """The flagged rows with empty decision and new_label columns right after id, for spreadsheets."""
    table = flagged.copy()
    clashes = [column for column in REVIEW_COLUMNS if column in table.columns]
    table = table.rename(columns={column: f"{column}_input" for column in clashes})
    at = list(table.columns).index("id") + 1
    for offset, column in enumerate(REVIEW_COLUMNS):
        table.insert(at + offset, column, "")
    return table


def label_studio_url(image_path: Path, document_root: Path) -> str | None:
    """Label Studio's local-files URL for an image under its document root; None when it lies outside."""
    try:
        relative = image_path.resolve().relative_to(document_root.resolve())
    except ValueError:
        return None
    return "/data/local-files/?d=" + quote(relative.as_posix())


def label_studio_tasks(flagged: pd.DataFrame, image_paths: list[Path], document_root: Path) -> tuple[list[dict], int]:
    """Image-classification tasks with irank's suggestion as a prediction; also how many images lie outside the root."""
    tasks, outside = [], 0
    for (_, row), image_path in zip(flagged.iterrows(), image_paths):
        url = label_studio_url(image_path, document_root)
        if url is None:
            outside += 1
            url = "/data/local-files/?d=" + quote(image_path.resolve().as_posix().lstrip("/"))
        tasks.append({
            "data": {
                "image": url, "irank_id": str(row["id"]), "given_label": str(row["label"]),
                "rank": int(row["rank"]), "score": float(row["score"]),
            },
            "predictions": [{
                "model_version": f"irank {__version__}",
                "score": float(row["predicted_prob"]),
                "result": [{
                    "from_name": LABEL_STUDIO_LABEL, "to_name": "image", "type": "choices",
                    "value": {"choices": [str(row["predicted"])]},
                }],
            }],
        })
    return tasks, outside


def label_studio_config(classes: list[str]) -> str:
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (
        "<View>\n"
        '  <Image name="image" value="$image"/>\n'
        '  <Header value="Given label: $given_label (irank rank $rank)"/>\n'
        f'  <Choices name="{LABEL_STUDIO_LABEL}" toName="image" choice="single" showInLine="true">\n{choices}\n  </Choices>\n'
        f'  <Choices name="{LABEL_STUDIO_DECISION}" toName="image" choice="single">\n'
        f'    <Choice value="{LABEL_STUDIO_REMOVE}"/>\n  </Choices>\n'
        "</View>\n"
    )


def filled_decisions(review_csv: Path) -> int:
    """How many rows of an existing review.csv an annotator has filled in (0 when unreadable)."""
    try:
        table = read_table(review_csv, what="review")
    except ManifestError:
        return 0
    filled = 0
    for column in REVIEW_COLUMNS:
        if column in table.columns:
            filled = max(filled, int((table[column].astype(str).str.strip() != "").sum()))
    return filled


def check_review_dir(output: Path, inputs: dict[str, str | None], overwrite: bool = False) -> None:
    """Refuse an output folder that holds an input, someone else's files, or an annotator's work;
    an earlier pack with no decisions filled in is replaced only with `overwrite`."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output}: exists and is not a folder")
    real_output = os.path.realpath(output)
    for name, path in inputs.items():
        if path and not is_stdio(path):
            real = os.path.realpath(path)
            if real == real_output or real.startswith(real_output + os.sep):
                raise UsageError(f"-o {output}: the {name} {path} lies inside it; refusing to replace an input")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not (output / "review.json").is_file():
        raise UsageError(f"-o {output}: a folder that is not empty and not an irank review pack; refusing to overwrite it")
    filled = filled_decisions(output / "review.csv")
    if filled:
        raise UsageError(f"-o {output}: its review.csv has {filled} rows filled in by an annotator; "
                         "refusing to overwrite them (move the folder or pick another -o)")
    if not overwrite:
        raise UsageError(f"-o {output} already holds a review pack; pass --overwrite to replace it")


def replace_folder(built: Path, output: Path) -> None:
    """Rename `built` to `output`; an existing `output` (already checked to be replaceable) is moved aside first."""
    if not output.exists():
        os.replace(built, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
    old.rmdir()
    os.replace(output, old)
    try:
        os.replace(built, output)
    except BaseException:
        os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building_folder(output: Path):
    """A temporary sibling folder to fill; renamed to `output` on success, removed on any failure."""
    output.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield built
        built.chmod(0o755)
        replace_folder(built, output)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise


def class_list(labels: list[str], predicted: set[str], sidecar: dict) -> tuple[list[str], str]:
    if sidecar.get("classes"):
        return [str(name) for name in sidecar["classes"]], "the scores' sidecar"
    return sorted(set(labels) | predicted), "the labels and predictions in the scores"


def review(
    scores: str,
    *,
    output: str,
    top: int | None = None,
    fraction: float | None = None,
    per_class: bool = False,
    image_root_dir: str | None = None,
    label_studio_root: str | None = None,
    overwrite: bool = False,
) -> ReviewResult:
    """Write the review pack for the rows ranked first in `scores` into the folder `output`.

    `top` (default 100) or `fraction` of the rows, from rank 1 down, from each class with
    `per_class`. Relative image paths resolve against `image_root_dir`, else the scored manifest's
    folder (from the scores' sidecar), else the scores file's folder. Label Studio URLs are relative to
    `label_studio_root` (default: that same image folder), which is the LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    to serve them from.
    """
    validate_selection(top, fraction)
    if is_stdio(output):
        raise UsageError("-o -: irank review writes a folder; name one")
    out_dir = Path(output)
    sidecar = read_scores_sidecar(scores)
    manifest_path = sidecar.get("inputs", {}).get("manifest", {}).get("path")
    check_review_dir(out_dir, {"scores": scores, "scores' sidecar": None if is_stdio(scores) else scores + ".json",
                               "scored manifest": manifest_path}, overwrite)
    # Two passes over the scores, so that only the id, label, rank, class rank and score of every row are held
    # (compactly, as prune holds them), and the flagged rows whole (every column of every row in pandas took
    # about 680 bytes a row).
    source = TableSource(scores, "scores")
    columns = read_score_columns(scores, source)
    mask = flagged_mask(columns, top=top, fraction=fraction, per_class=per_class)
    flagged, predicted = flagged_rows(scores, source, mask)
    if "predicted" not in flagged.columns or "predicted_prob" not in flagged.columns:
        raise ManifestError(f"scores {scores}: missing column predicted or predicted_prob; is this the output of irank score?")
    for column in ("predicted_prob", "label_prob", "candidate_2_prob", "candidate_3_prob"):
        if column in flagged.columns:
            flagged[column] = pd.to_numeric(flagged[column], errors="coerce")
    root, root_reason = image_root(scores, sidecar, image_root_dir)
    ls_root = Path(label_studio_root).resolve() if label_studio_root else root
    classes, class_source = class_list(list(columns.labels.values), predicted, sidecar)

    flagged = flagged.sort_values("rank", kind="mergesort").reset_index(drop=True)
    paths = [resolve_image(str(p), root) for p in flagged["path"]]
    is_tensor_row = [is_tensor_path(p) for p in flagged["path"].astype(str)]
    thumbnails = [tensor_placeholder(row) if tensor_row else thumbnail_data_uri(p)
                  for (_, row), p, tensor_row in zip(flagged.iterrows(), paths, is_tensor_row)]
    missing = [str(p) for p, uri in zip(paths, thumbnails) if uri is None]
    cut_score = float(flagged["score"].min()) if len(flagged) else None
    tasks, outside_root = label_studio_tasks(flagged, paths, ls_root)
    summary = {
        "irank_version": __version__,
        "command": "review",
        "parameters": {"top": top if fraction is None else None, "fraction": fraction, "per_class": per_class},
        "classes": classes,
        "class_source": class_source,
        "scored_rows": len(columns),
        "flagged_rows": len(flagged),
        "flagged_per_class": {str(k): int(v) for k, v in flagged["label"].value_counts().sort_index().items()},
        "cut_score": cut_score,
        "image_root": str(root),
        "image_root_source": root_reason,
        "label_studio_root": str(ls_root),
        "label_studio_images_outside_root": outside_root,
        "missing_images": len(missing),
        "tensor_rows": int(sum(is_tensor_row)),
        "inputs": {
            "scores": {"path": scores, "sha256": None if is_stdio(scores) else sha256_file(scores)},
            "manifest": {"path": manifest_path} if manifest_path else None,
        },
    }
    page = render_page(flagged, rows_per_class(columns), columns.score, thumbnails, mask=mask, classes=classes,
                       summary=summary)
    reviewed = review_table(flagged)
    with building_folder(out_dir) as folder:
        (folder / "index.html").write_text(page, encoding="utf-8")
        reviewed.to_csv(folder / "review.csv", index=False)
        (folder / "label-studio.json").write_text(json.dumps(tasks, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "label-studio.xml").write_text(label_studio_config(classes), encoding="utf-8")
        (folder / "review.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return ReviewResult(flagged=reviewed, summary=summary, missing_images=missing)
