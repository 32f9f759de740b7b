"""`irank review`: a scores table → a review pack for annotators (HTML page, review.csv, Label Studio tasks).

The pack is a folder: `index.html` (self-contained: pictures embedded as data URIs, no network; annotators
decide on it and download review.csv with their decisions), `review.csv` (the flagged rows with empty
`decision` and `new_label` columns), `label-studio.json` (image-classification tasks with irank's suggestion
as a pre-annotation) plus the matching `label-studio.xml` labeling config, and `review.json` (provenance, the
class list `irank apply` reads, and the estimated issues of every scored row).
It is built in a temporary sibling folder and renamed into place, so it appears whole or not at all.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from irank._version import __version__
from irank.core.estimate import issue_summary, merge_issue_summaries
from irank.core.selection import removal_mask
from irank.formats.files import is_stdio, output_set, sha256_bytes
from irank.formats.images import ImageRefused, decode_error, open_image
from irank.formats.jsontext import kind
from irank.formats.manifest import TableSource, first_outside
from irank.formats.review_pack import (
    check_url_prefix,
    class_names,
    json_field,
    label_studio_tasks,
    pack_changes,
    pack_contents,
    read_json_file,
    review_sheet,
    review_table,
)
from irank.formats.review_page import Measure, PageData, describe_measure, render_page, tensor_placeholder
from irank.formats.scores_table import ScoreColumns, flagged_rows, read_score_columns
from irank.formats.tensor_rows import is_tensor_path
from irank.runtime.errors import ManifestError, UsageError

DEFAULT_TOP = 100
THUMBNAIL_SIZE = 160
FULL_SIZE = 512  # the full-size view's picture: the image, shrunk to at most this many pixels a side


@dataclass
class ReviewResult:
    flagged: pd.DataFrame  # the review.csv rows, sorted by rank (values unmarked: as in the scores)
    summary: dict  # as written to review.json (less the files' hashes)
    missing_images: list[str]  # images that could not be shown: not found, refused or undecodable
    image_problems: list[str] = None  # why, for each of them


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
    """The JSON sidecar irank score wrote beside the scores (checked where review reads it), or {} when there is none."""
    if is_stdio(scores):
        return {}
    sidecar = Path(scores + ".json")
    if not sidecar.is_file():
        return {}
    document = read_json_file(sidecar, "scores sidecar")
    where = f"scores sidecar {sidecar}"
    if not isinstance(document, dict):
        raise ManifestError(f"{where}: holds {kind(document)}, not the JSON object irank score writes")
    json_field(document, ("inputs", "manifest", "path"), (str,), where)
    class_names(document.get("classes"), where)
    return document


def image_root(scores: str, sidecar: dict, override: str | None) -> tuple[Path, str]:
    """The folder relative image paths resolve against, and a phrase saying why."""
    if override is not None:
        if not Path(override).is_dir():
            raise UsageError(f"--image-root {override}: not a folder")
        return Path(override).resolve(), f"--image-root {override}"
    manifest_path = json_field(sidecar, ("inputs", "manifest", "path"), (str,), "scores sidecar")
    if manifest_path and not is_stdio(manifest_path) and Path(manifest_path).is_file():
        return Path(manifest_path).resolve().parent, f"the scored manifest's folder ({manifest_path})"
    if is_stdio(scores):
        return Path.cwd(), "the current folder (scores read from stdin)"
    return Path(scores).resolve().parent, f"the scores file's folder ({scores})"


def resolve_image(path: str, root: Path) -> Path:
    return Path(path) if os.path.isabs(path) else root / path


def pictures_of(image_path: Path, size: int = THUMBNAIL_SIZE,
                full_size: int = FULL_SIZE) -> tuple[str | None, str | None, str | None]:
    """The card's picture (at most `size` pixels a side), the full-size view's (at most `full_size`; None when the
    image is no larger than the card's), as data URIs, from one opening of the image under the rule every
    command follows (`images.open_image`); else (None, None, why not)."""
    from PIL import Image

    try:
        with open_image(image_path) as image:
            image.thumbnail((full_size, full_size))
            has_alpha = image.mode in ("RGBA", "LA", "P")
            large = image.convert("RGBA" if has_alpha else "RGB")
    except ImageRefused as exc:
        return None, None, exc.reason
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, None, decode_error(exc)
    small = large.copy()
    small.thumbnail((size, size))
    full = data_uri(large, has_alpha) if max(large.size) > max(small.size) else None
    return data_uri(small, has_alpha), full, None


def data_uri(picture, has_alpha: bool) -> str:
    """A PIL image as a data URI: PNG for small pictures and those with transparency, else JPEG."""
    buffer = io.BytesIO()
    small = picture.width * picture.height <= 64 * 64
    if small or has_alpha:
        picture.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        picture.save(buffer, format="JPEG", quality=85)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def check_images_inside(scores: str, paths: list[str], is_tensor_row: list[bool], ranks: list[int], root: Path,
                        root_reason: str) -> None:
    """Refuse an image path that resolves outside the image root, as every command refuses one outside the
    manifest's folder unless --allow-outside-root: a review pack embeds the images it shows."""
    outside = first_outside(root, ((rank, path) for rank, path, tensor in zip(ranks, paths, is_tensor_row) if not tensor))
    if outside is not None:
        rank, written = outside
        raise ManifestError(f"scores {scores}: rank {rank}: path {written!r} resolves outside the image folder "
                            f"{os.path.realpath(root)} ({root_reason}); pass --allow-outside-root if you trust "
                            "these scores, or --image-root DIR")


def check_review_dir(output: Path, inputs: dict[str, str | None], overwrite: bool = False) -> None:
    """Refuse an output folder that holds an input, someone else's files, or an annotator's work; an earlier
    pack is replaced only with `overwrite`, and only while it holds exactly the files irank wrote, unchanged."""
    if os.path.lexists(output) and not output.is_dir():
        raise UsageError(f"-o {output}: exists and is not a folder")
    real_output = os.path.realpath(output)
    for name, path in inputs.items():
        if path and not is_stdio(path):
            real = os.path.realpath(path)
            if real == real_output or real.startswith(real_output + os.sep):
                raise UsageError(f"-o {output}: the {name} {path} lies inside it; refusing to replace an input")
    if not output.is_dir() or not any(output.iterdir()):
        return
    problem = pack_changes(output)
    if problem:
        raise UsageError(f"-o {output}: {problem}; refusing to overwrite it, --overwrite or not "
                         "(move the folder or pick another -o)")
    if not overwrite:
        raise UsageError(f"-o {output} already holds a review pack; pass --overwrite to replace it")


@contextlib.contextmanager
def building_folder(output: Path, overwrite: bool = False):
    """A temporary sibling folder to fill, published as `output` once complete, as an output set (files.OutputSet:
    Ctrl-C and SIGTERM held back during the rename; without `overwrite`, only where nothing is at that moment);
    removed on any failure. An earlier pack is checked once more just before it is replaced: an annotator may have
    opened it while this one was being built."""
    output.parent.mkdir(parents=True, exist_ok=True)
    replace = overwrite or (output.is_dir() and not any(output.iterdir()))  # an empty folder is no one's work
    with output_set(overwrite=replace) as outputs:
        built = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
        outputs.add(built, output)  # removed with the set if anything fails from here on
        yield built
        built.chmod(0o755)
        if output.is_dir() and any(output.iterdir()):
            problem = pack_changes(output)
            if problem:
                raise UsageError(f"-o {output}: {problem}; refusing to overwrite it, --overwrite or not "
                                 "(move the folder or pick another -o)")


def class_list(labels: list[str], predicted: set[str], sidecar: dict) -> tuple[list[str], str]:
    if sidecar.get("classes"):
        return [str(name) for name in sidecar["classes"]], "the scores' sidecar"
    return sorted(set(labels) | predicted), "the labels and predictions in the scores"


@dataclass
class Flagged:
    """What review reads of the scores: `columns` (compact: every row's label, rank, class rank and score), `mask`
    (the flagged rows), `rows` (those rows whole, sorted by rank), `predicted` (every predicted class name),
    `digest` (the scores' sha256; None from stdin) and `issues` (`estimate.issue_summary` of every row, per class
    in the class list's order once `review` knows it)."""

    columns: ScoreColumns
    mask: np.ndarray
    rows: pd.DataFrame
    predicted: set[str]
    digest: str | None
    issues: list[dict]  # one summary per block of rows, merged by `review`


def read_flagged(scores: str, top: int | None, fraction: float | None, per_class: bool) -> Flagged:
    """The scores, read in two passes, so that only the id, label, rank, class rank and score of every row are held
    (compactly, as prune holds them), and the flagged rows whole (every column of every row in pandas took about
    680 bytes a row); the second pass also sums up every row's given and predicted labels a block at a time."""
    source = TableSource(scores, "scores")
    columns = read_score_columns(scores, source)
    mask = flagged_mask(columns, top=top, fraction=fraction, per_class=per_class)
    issues: list[dict] = []

    def summed(block: pd.DataFrame) -> None:
        if "predicted" in block.columns:
            issues.append(issue_summary(block["label"].astype(str), block["predicted"].astype(str)))

    flagged, predicted = flagged_rows(scores, source, mask, each_block=summed)
    if "predicted" not in flagged.columns or "predicted_prob" not in flagged.columns:
        raise ManifestError(f"scores {scores}: missing column predicted or predicted_prob; is this the output of irank score?")
    for column in ("predicted_prob", "label_prob", "candidate_2_prob", "candidate_3_prob"):
        if column in flagged.columns:
            flagged[column] = pd.to_numeric(flagged[column], errors="coerce")
    digest = None if is_stdio(scores) else source.sha256()
    return Flagged(columns, mask, flagged.sort_values("rank", kind="mergesort").reset_index(drop=True), predicted,
                   digest, issues)


@dataclass
class PackImages:
    """Each flagged row's image path, card picture (None: not shown), full-size picture (None: the card's), why it
    is not shown, and whether it is a tensor row (a card with its file and index, nothing read)."""

    paths: list[Path]
    pictures: list[str | None]
    fulls: list[str | None]
    problems: list[str | None]
    is_tensor_row: list[bool]


def pack_images(scores: str, flagged: pd.DataFrame, root: Path, root_reason: str, allow_outside_root: bool) -> PackImages:
    """The flagged rows' images (see `PackImages`), each image opened once; refused outside `root` unless allowed."""
    written = [str(p) for p in flagged["path"]]
    paths = [resolve_image(p, root) for p in written]
    is_tensor_row = [is_tensor_path(p) for p in written]
    if not allow_outside_root:
        check_images_inside(scores, written, is_tensor_row, flagged["rank"].astype(int).tolist(), root, root_reason)
    images = PackImages(paths, [], [], [], is_tensor_row)
    for (_, row), path, tensor_row in zip(flagged.iterrows(), paths, is_tensor_row):
        picture, full, problem = (tensor_placeholder(row), None, None) if tensor_row else pictures_of(path)
        images.pictures.append(picture)
        images.fulls.append(full)
        images.problems.append(problem)
    return images


def review_inputs(scores: str, output: str, overwrite: bool) -> tuple[Path, dict, str | None]:
    """The output folder (checked: see `check_review_dir`), the scores' sidecar, and the scored manifest it names."""
    if is_stdio(output):
        raise UsageError("-o -: irank review writes a folder; name one")
    out_dir = Path(output)
    sidecar = read_scores_sidecar(scores)
    manifest_path = json_field(sidecar, ("inputs", "manifest", "path"), (str,), "scores sidecar")
    check_review_dir(out_dir, {"scores": scores, "scores' sidecar": None if is_stdio(scores) else scores + ".json",
                               "scored manifest": manifest_path}, overwrite)
    return out_dir, sidecar, manifest_path


def scores_measure(sidecar: dict) -> Measure:
    """What the scores measure, from their sidecar (see `review_page.describe_measure`); "score" without one."""
    where = "scores sidecar"
    layer = json_field(sidecar, ("parameters", "layer"), (str, int), where)
    return describe_measure(json_field(sidecar, ("method",), (str,), where),
                            json_field(sidecar, ("parameters", "boundary"), (str,), where),
                            json_field(sidecar, ("parameters", "influence_measure"), (str,), where),
                            None if layer is None else str(layer))


def check_url_options(label_studio_root: str | None, image_url_prefix: str | None) -> None:
    if image_url_prefix is None:
        return
    check_url_prefix(image_url_prefix)
    if label_studio_root is not None:
        raise UsageError("--label-studio-root applies to Label Studio's local-files URLs; with --image-url-prefix "
                         "the URLs are the prefix and the path under the image folder (--image-root)")


def write_pack(out_dir: Path, overwrite: bool, read: Flagged, images: PackImages, tasks: list[dict],
               summary: dict, measure: Measure) -> None:
    """The pack's files, built in a temporary sibling folder and published whole (see `building_folder`)."""
    flagged, classes = read.rows, summary["classes"]
    sheet_text, sheet = review_sheet(flagged)
    page = render_page(PageData(
        flagged, rows_per_class(read.columns), read.columns.score, read.mask, classes, summary, images.pictures,
        sheet=sheet, key=sha256_bytes(sheet_text.encode("utf-8")), issues=summary["summary"], fulls=images.fulls,
        problems=images.problems, measure=measure))
    with building_folder(out_dir, overwrite) as folder:
        for name, data in pack_contents(flagged, page, tasks, classes, summary, sheet_text).items():
            (folder / name).write_bytes(data)


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
    allow_outside_root: bool = False,
    image_url_prefix: str | None = None,
) -> ReviewResult:
    """Write the review pack for the rows ranked first in `scores` into the folder `output`.

    `top` (default 100) or `fraction` of the rows, from rank 1 down, from each class with
    `per_class`. Relative image paths resolve against `image_root_dir`, else the scored manifest's
    folder (from the scores' sidecar), else the scores file's folder; an image outside that folder is
    refused unless `allow_outside_root`. Label Studio URLs are relative to `label_studio_root` (default:
    that same image folder), which is the LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT to serve them from; with
    `image_url_prefix` (http://, https:// or /) they are that prefix and the image's path under the image
    folder, each segment URL-quoted, for a server of your own.
    """
    validate_selection(top, fraction)
    check_url_options(label_studio_root, image_url_prefix)
    out_dir, sidecar, manifest_path = review_inputs(scores, output, overwrite)
    measure = scores_measure(sidecar)
    read = read_flagged(scores, top, fraction, per_class)
    flagged = read.rows
    root, root_reason = image_root(scores, sidecar, image_root_dir)
    ls_root = Path(label_studio_root).resolve() if label_studio_root else root
    classes, class_source = class_list(list(read.columns.labels.values), read.predicted, sidecar)
    images = pack_images(scores, flagged, root, root_reason, allow_outside_root)
    unshown = [place for place, picture in enumerate(images.pictures) if picture is None]
    tasks, outside_root = label_studio_tasks(flagged, images.paths, ls_root, image_url_prefix)
    summary = {
        "irank_version": __version__,
        "command": "review",
        "parameters": {"top": top if fraction is None else None, "fraction": fraction, "per_class": per_class},
        "classes": classes,
        "class_source": class_source,
        "scored_rows": len(read.columns),
        "score_measure": measure.text,
        "flagged_rows": len(flagged),
        "flagged_per_class": {str(k): int(v) for k, v in flagged["label"].value_counts().sort_index().items()},
        "cut_score": float(flagged["score"].min()) if len(flagged) else None,
        "image_root": str(root),
        "image_root_source": root_reason,
        "label_studio_root": str(ls_root),
        "image_url_prefix": image_url_prefix,
        "label_studio_images_outside_root": outside_root,
        "missing_images": len(unshown),
        "tensor_rows": int(sum(images.is_tensor_row)),
        "summary": merge_issue_summaries(read.issues, classes),
        "inputs": {"scores": {"path": scores, "sha256": read.digest},
                   "manifest": {"path": manifest_path} if manifest_path else None},
    }
    write_pack(out_dir, overwrite, read, images, tasks, summary, measure)
    return ReviewResult(flagged=review_table(flagged), summary=summary,
                        missing_images=[str(images.paths[p]) for p in unshown],
                        image_problems=[images.problems[p] for p in unshown])
