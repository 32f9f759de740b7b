"""`irank manifest`: an ImageFolder tree → a manifest (path, label), paths relative to the manifest's folder.

A manifest written outside the images' folder (`irank manifest ../images -o train.csv`) points back into it; its
sidecar records that folder under a seal (irank.formats.seal), so every irank command reads it with no flag.
"""

from __future__ import annotations

import os

from irank._version import __version__
from irank.formats.files import check_outputs_clear_of_inputs, check_overwrite, is_stdio, output_set, write_json_atomic
from irank.formats.manifest import first_outside, manifest_from_folder, table_format, write_table
from irank.formats.seal import seal_written


def write_manifest(image_dir: str, output: str, *, overwrite: bool = False) -> dict:
    """Write the manifest of `image_dir` to `output` ('-': stdout); returns what its sidecar (if any) says."""
    table_format(output)
    sidecar = None if is_stdio(output) else f"{output}.json"
    check_outputs_clear_of_inputs({"-o": output, "the sidecar": sidecar}, {})
    check_overwrite({"-o": output, "the sidecar": sidecar}, overwrite)
    table = manifest_from_folder(image_dir, output)
    summary = {"irank_version": __version__, "command": "manifest", "image_dir": os.path.realpath(image_dir),
               "rows": len(table), "classes": int(table["label"].nunique())}
    with output_set(overwrite) as outputs:
        write_table(table, output)
        if sidecar is not None and _points_out(table, output):
            summary.update(seal_written(outputs, output, image_dir))
            write_json_atomic(sidecar, summary)
    return summary


def _points_out(table, output: str) -> bool:
    """Whether some row resolves outside the manifest's own folder (so reading it needs the recorded root)."""
    folder = os.path.dirname(os.path.abspath(output))
    return first_outside(folder, enumerate(table["path"].astype(str), start=1)) is not None
