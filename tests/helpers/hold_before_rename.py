"""Run the irank CLI, but pause just before the rename that publishes a file named NAME.

Usage: python hold_before_rename.py NAME[#K] READY_FILE irank-args...   (#K: the K-th file of that name)
Once the temporary file for NAME is fully written, READY_FILE is created and the process sleeps, so a
test can interrupt it at the worst moment: the new output complete on disk but not yet in place.
"""

import contextlib
import importlib
import sys
import time
from pathlib import Path

import irank.formats.files

# every module that holds a reference to atomic_path (irank/__init__ imports none of them before first use)
for name in ("stages.apply", "model.checkpoint", "formats.manifest", "workflows.post_train.rounds", "workflows.post_train.sharing", "stages.prune",
             "stages.refine", "formats.resume", "stages.review", "stages.score"):
    importlib.import_module(f"irank.{name}")

name, _, occurrence = sys.argv[1].partition("#")
ready = Path(sys.argv[2])
seen = [0]
real_atomic_path = irank.formats.files.atomic_path


@contextlib.contextmanager
def holding_atomic_path(path):
    with real_atomic_path(path) as tmp:
        yield tmp
        if Path(path).name == name:
            seen[0] += 1
        if Path(path).name == name and seen[0] == int(occurrence or 1):
            ready.write_text(str(tmp))
            time.sleep(120)


for module in list(sys.modules.values()):
    if getattr(module, "__name__", "").startswith("irank") and getattr(module, "atomic_path", None) is real_atomic_path:
        module.atomic_path = holding_atomic_path

from irank.cli import main  # noqa: E402

sys.argv = ["irank", *sys.argv[3:]]
main()
