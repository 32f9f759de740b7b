"""The command starts instantly: `irank --help`, a command's --help and `irank version` import no torch (nor numpy
or pandas), through the real entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from irank.entry import main
sys.argv = ["irank", *sys.argv[1:]]
try:
    main()
except SystemExit as exit_:
    assert not exit_.code, exit_.code
heavy = sorted(name for name in ("torch", "torchvision", "numpy", "pandas", "PIL") if name in sys.modules)
sys.stderr.write("imported: " + ",".join(heavy) + "\\n")
"""


@pytest.mark.parametrize("args", [["version"], ["--help"], ["score", "--help"], ["post-train", "--help"]])
def test_help_and_version_import_no_torch(args):
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "imported: ", done.stderr
    assert done.stdout.strip()  # it printed its answer
