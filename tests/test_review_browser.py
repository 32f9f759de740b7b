"""The review page in a real browser: headless Chromium loads it without console errors and runs its script.

Needs Debian's `chromium` (.ci/run installs it); skipped with a reason when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import irank

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test needs /usr/bin/chromium "
                                "(apt-get install chromium chromium-driver; .ci/run does this)")


def load_in_chromium(page: Path, tmp_path: Path, fragment: str = "") -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console message Chromium logged."""
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    completed = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    console = [line for line in completed.stderr.splitlines() if ":CONSOLE" in line]
    return completed.stdout, console


def cards(dom: str) -> list[str]:
    return re.findall(r'<article class="card[^"]*"[^>]*>', dom)


@pytest.fixture(scope="module")
def pack(tiny_data, tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("browser")
    scores = str(folder / "scores.csv")
    irank.score(tiny_model, tiny_data["train"], output=scores, run_options=irank.RunOptions(device="cpu"))
    irank.review(scores, output=str(folder / "review"), top=30)
    return folder / "review"


def test_page_loads_without_console_errors_and_shows_one_card_per_flagged_row(pack, tmp_path):
    dom, console = load_in_chromium(pack / "index.html", tmp_path)
    assert console == []
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-ready="1"' in body and "data-error" not in body  # the script ran to its end
    shown = cards(dom)
    assert len(shown) == 30 and not [card for card in shown if "hidden" in card]
    assert len(re.findall(r"<img ", dom)) == 30
    assert "30 of 30 cards shown" in dom
    flagged = pd.read_csv(pack / "review.csv")
    assert [re.search(r'data-id="([^"]+)"', card).group(1) for card in shown] == flagged["id"].tolist()


def test_page_filters_and_sorts_by_class(pack, tmp_path):
    flagged = pd.read_csv(pack / "review.csv")
    label = flagged["label"].value_counts().index[0]
    dom, console = load_in_chromium(pack / "index.html", tmp_path, f"#class={label}&sort=labelProb")
    assert console == []
    visible = [card for card in cards(dom) if "hidden" not in card]
    assert len(visible) == (flagged["label"] == label).sum()
    assert all(f'data-label="{label}"' in card for card in visible)
    probs = [float(re.search(r'data-label-prob="([^"]+)"', card).group(1)) for card in visible]
    assert probs == sorted(probs)
    assert f"{len(visible)} of 30 cards shown" in dom
