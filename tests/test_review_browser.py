"""The review page in a real browser: headless Chromium, driven by Playwright with clicks and keys. Annotators
decide on the page, the decisions outlive a reload, the page downloads review.csv, and `irank apply` takes that
file as it is.

Needs Debian's `chromium` (.ci/run installs it) and the `playwright` package (the test extra; its own browser
download is not used); skipped with the reason when either is absent.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import irank

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="the browser test needs /usr/bin/chromium "
                                "(apt-get install chromium; .ci/run does this)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with the playwright "
                               "package (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


def css_string(text: str) -> str:
    """A CSS string of `text`: every character but letters and digits as a hex escape."""
    return '"' + "".join(character if character.isascii() and character.isalnum() else f"\\{ord(character):x} "
                         for character in text) + '"'


class Page:
    """A page of a pack opened in a fresh browser context, with every console message and page error kept."""

    def __init__(self, context, html: Path, fragment: str = ""):
        self.context, self.messages, self.dialogs = context, [], []
        self.page = context.new_page()
        self.page.on("console", lambda message: self.messages.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.messages.append(f"error: {error}"))
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.goto(html.resolve().as_uri() + fragment)
        self.ready()

    def ready(self):
        self.page.wait_for_selector("body[data-ready='1']", timeout=30000)
        assert self.page.get_attribute("body", "data-error") is None, self.messages

    def card(self, sample_id: str):
        return self.page.locator(f"article.card[data-id={css_string(sample_id)}]")

    def state(self, sample_id: str) -> tuple[str, str]:
        card = self.card(sample_id)
        return card.get_attribute("data-decision"), card.get_attribute("data-new-label")

    def selected(self) -> str:
        return self.page.locator("article.card.selected").get_attribute("data-id")

    def download(self, into: Path) -> bytes:
        with self.page.expect_download() as started:
            self.page.click("#download")
        started.value.save_as(into)
        assert started.value.suggested_filename == "review.csv"
        return into.read_bytes()


def class_order(classes: list[str], row: pd.Series) -> list[str]:
    """A card's classes in the page's order: the suggested one first, then the pack's order."""
    return [row["predicted"]] + [name for name in classes if name != row["predicted"]]


def with_decisions(review_csv: bytes, decisions: dict[str, tuple[str, str]]) -> bytes:
    """review.csv as irank wrote it with these cells filled in (the csv module writing irank's minimal quoting)."""
    rows = list(csv.reader(io.StringIO(review_csv.decode("utf-8"), newline="")))
    at = rows[0].index("decision")
    for fields in rows[1:]:
        sample_id = fields[1][1:] if fields[1].startswith("'") else fields[1]
        if sample_id in decisions:
            fields[at:at + 2] = decisions[sample_id]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue().encode("utf-8")


def run_apply(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "irank", "apply", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.fixture(scope="module")
def scored(tiny_data, tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("browser")
    scores = folder / "scores.csv"
    irank.score(tiny_model, tiny_data["train"], output=str(scores), run_options=irank.RunOptions(device="cpu"))
    return scores


@pytest.fixture(scope="module")
def pack(scored) -> Path:
    irank.review(str(scored), output=str(scored.parent / "review"), top=30)
    return scored.parent / "review"


def test_page_loads_without_console_errors_and_shows_one_card_per_flagged_row(browser, pack):
    page = Page(browser.new_context(), pack / "index.html")
    flagged = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)
    ids = page.page.eval_on_selector_all("article.card", "cards => cards.map(card => card.dataset.id)")
    assert ids == flagged["id"].tolist()
    assert page.page.locator("article.card:visible").count() == 30
    assert page.page.inner_text("#shown") == "30 of 30 cards shown"
    assert page.page.inner_text("#decided") == "0 of 30 decided"
    loaded = page.page.eval_on_selector_all("article.card img", "images => images.filter(i => i.naturalWidth > 0).length")
    assert loaded == 30
    assert page.messages == [] and page.dialogs == []


def test_page_filters_and_sorts_by_class_from_its_address(browser, pack):
    flagged = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)
    label = flagged["label"].value_counts().index[0]
    page = Page(browser.new_context(), pack / "index.html", f"#class={label}&sort=labelProb")
    visible = page.page.locator("article.card:visible")
    assert visible.count() == (flagged["label"] == label).sum()
    assert set(visible.evaluate_all("cards => cards.map(card => card.dataset.label)")) == {label}
    probs = visible.evaluate_all("cards => cards.map(card => parseFloat(card.dataset.labelProb))")
    assert probs == sorted(probs)
    assert page.messages == []


def decide_by_keys(page: Page, rows: list[pd.Series], classes: list[str]) -> None:
    """Rows 0-2 decided by keys: click, k, r, 2; then the moving keys."""
    ids, keys = [row["id"] for row in rows], page.page.keyboard
    page.card(ids[0]).click()  # clicking a card selects it; k keeps it and moves on to the next
    assert page.selected() == ids[0]
    keys.press("k")
    assert page.state(ids[0]) == ("keep", "") and page.selected() == ids[1]
    keys.press("r")  # r removes
    assert page.state(ids[1]) == ("remove", "") and page.selected() == ids[2]
    second = class_order(classes, rows[2])[1]  # 2 relabels as the card's second class (the suggested one is 1)
    keys.press("2")
    assert page.state(ids[2]) == (("relabel", second) if second != rows[2]["label"] else ("keep", ""))
    keys.press("j")  # j (and ←) go back, l (and →) forward
    assert page.selected() == ids[2]
    keys.press("ArrowLeft")
    keys.press("l")
    keys.press("ArrowRight")
    assert page.selected() == ids[3]


def decide_by_buttons(page: Page, rows: list[pd.Series], classes: list[str]) -> None:
    """Rows 3-5 decided by the cards' buttons and class list; u takes a decision back."""
    ids = [row["id"] for row in rows]
    other = next(name for name in classes if name not in (rows[3]["label"], rows[3]["predicted"]))
    page.card(ids[3]).locator("button[data-decision=relabel]").click()  # relabel: the suggested class first
    suggested = rows[3]["predicted"]
    assert page.state(ids[3]) == (("relabel", suggested) if suggested != rows[3]["label"] else ("keep", ""))
    page.card(ids[3]).locator("select.new-label").select_option(value=str(classes.index(other)))
    assert page.state(ids[3]) == ("relabel", other)
    page.card(ids[4]).locator("button[data-decision=remove]").click()  # a button decides its card ...
    assert page.state(ids[4]) == ("remove", "") and page.selected() == ids[4]
    page.page.keyboard.press("u")  # ... and u takes the selected card's decision back
    assert page.state(ids[4]) == ("", "")
    page.card(ids[5]).locator("button[data-decision=keep]").click()
    page.card(ids[5]).locator("button[data-decision=remove]").click()  # the last button pressed decides
    assert page.state(ids[5]) == ("remove", "")


def look_full_size(page: Page, selected: str, other: str) -> None:
    """Enter opens the selected card's full-size view, Escape closes it; a click on a picture opens it too."""
    keys = page.page.keyboard
    keys.press("Enter")
    assert page.page.is_visible("#viewer")
    picture = page.card(selected).locator("img")
    assert page.page.get_attribute("#viewer-image", "src") == (picture.get_attribute("data-full")
                                                               or picture.get_attribute("src"))
    assert selected in page.page.inner_text("#viewer-caption")
    keys.press("Escape")
    assert not page.page.is_visible("#viewer")
    page.card(other).locator("img").click()
    assert page.page.is_visible("#viewer") and page.selected() == other
    keys.press("Escape")


def test_decisions_by_click_and_key_survive_a_reload_download_and_apply(browser, pack, tiny_data, tmp_path):
    flagged = pd.read_csv(pack / "review.csv", dtype=str, keep_default_na=False)
    classes = json.loads((pack / "review.json").read_text())["classes"]
    rows = [flagged.iloc[place] for place in range(6)]
    ids = [row["id"] for row in rows]
    page = Page(browser.new_context(accept_downloads=True), pack / "index.html")
    decide_by_keys(page, rows, classes)
    decide_by_buttons(page, rows, classes)
    assert page.page.inner_text("#decided") == "5 of 30 decided"
    look_full_size(page, ids[5], ids[0])

    decided = {sample_id: page.state(sample_id) for sample_id in ids}
    page.page.reload()
    page.ready()
    assert {sample_id: page.state(sample_id) for sample_id in ids} == decided
    assert page.page.inner_text("#decided") == "5 of 30 decided"
    page.page.select_option("#decision-filter", "remove")  # show only the removed cards
    assert page.page.locator("article.card:visible").evaluate_all("cards => cards.map(c => c.dataset.id)") == [ids[1], ids[5]]
    page.page.select_option("#decision-filter", "undecided")
    assert page.page.inner_text("#shown") == "25 of 30 cards shown"

    exported = page.download(tmp_path / "review.csv")
    original = (pack / "review.csv").read_bytes()
    cells = {sample_id: [decision, new_label] for sample_id, (decision, new_label) in decided.items() if decision}
    assert exported == with_decisions(original, cells)  # irank's review.csv, byte for byte, with the decisions
    assert page.messages == [] and page.dialogs == []

    manifest = tmp_path / "train.csv"
    shutil.copyfile(tiny_data["train"], manifest)
    applied = run_apply(tmp_path / "review.csv", manifest, "-o", tmp_path / "fixed.csv", "--audit", tmp_path / "audit.csv")
    assert applied.returncode == 0, applied.stderr
    before = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    after = pd.read_csv(tmp_path / "fixed.csv", dtype=str, keep_default_na=False)
    assert set(before["path"]) - set(after["path"]) == {ids[1], ids[5]}
    labels = dict(zip(after["path"], after["label"]))
    for sample_id, (decision, new_label) in decided.items():
        if decision == "relabel":
            assert labels[sample_id] == new_label
        elif decision != "remove":
            assert labels[sample_id] == before.set_index("path").loc[sample_id, "label"]


def test_two_packs_keep_their_own_decisions(browser, pack, scored):
    other = scored.parent / "review-10"
    irank.review(str(scored), output=str(other), top=10)
    context = browser.new_context()  # one browser profile: both pages share file://'s storage
    first = Page(context, pack / "index.html")
    sample_id = first.page.locator("article.card").first.get_attribute("data-id")
    first.card(sample_id).click()
    first.page.keyboard.press("r")
    assert first.state(sample_id) == ("remove", "")
    second = Page(context, other / "index.html")
    assert second.state(sample_id) == ("", "") and second.page.inner_text("#decided") == "0 of 10 decided"
    again = Page(context, pack / "index.html")
    assert again.state(sample_id) == ("remove", "") and again.page.inner_text("#decided") == "1 of 30 decided"


HOSTILE_IDS = ["</script><script>alert('id')</script>", "=HYPERLINK(\"http://x\",\"y\")", "-2+3", "'quoted",
               "line\u2028break & <b>", "a,b\"c"]
HOSTILE_CLASS = "=cross,\"1\""


def hostile_copy(tiny_data, scored: Path, folder: Path) -> tuple[Path, Path, dict[str, str]]:
    """The scored manifest and its scores with some ids, and the class "cross", as text that breaks markup, scripts,
    CSV and spreadsheets; images beside them, as before."""
    folder.mkdir()
    shutil.copytree(Path(tiny_data["train"]).parent / "images", folder / "images")
    scores = pd.read_csv(scored, dtype=str, keep_default_na=False)
    renamed = dict(zip(scores["id"][:len(HOSTILE_IDS)], HOSTILE_IDS))
    manifest = pd.read_csv(tiny_data["train"], dtype=str, keep_default_na=False)
    manifest.insert(0, "id", manifest["path"].map(lambda path: renamed.get(path, path)))
    scores["id"] = scores["id"].map(lambda sample_id: renamed.get(sample_id, sample_id))
    for table, columns in ((manifest, ("label",)), (scores, ("label", "predicted", "candidate_2", "candidate_3"))):
        for column in columns:
            table[column] = table[column].replace("cross", HOSTILE_CLASS)
    manifest.to_csv(folder / "train.csv", index=False)
    scores.to_csv(folder / "scores.csv", index=False)
    return folder / "train.csv", folder / "scores.csv", renamed


def test_hostile_ids_and_class_names_stay_text_and_reach_apply_exactly(browser, tiny_data, scored, tmp_path):
    manifest, scores, renamed = hostile_copy(tiny_data, scored, tmp_path / "hostile")
    irank.review(str(scores), output=str(tmp_path / "r"), top=len(HOSTILE_IDS))
    page = Page(browser.new_context(accept_downloads=True), tmp_path / "r" / "index.html")
    ids = page.page.eval_on_selector_all("article.card", "cards => cards.map(card => card.dataset.id)")
    assert ids == HOSTILE_IDS and page.dialogs == [] and page.messages == []
    assert page.page.locator("article.card script, article.card b b").count() == 0
    flagged = pd.read_csv(tmp_path / "r" / "review.csv", dtype=str, keep_default_na=False)
    assert flagged["id"].str.startswith("'").sum() == 3  # the formula-like ids and the one with an apostrophe: marked
    flagged = flagged.map(lambda cell: cell[1:] if cell.startswith("'") else cell)  # as apply reads them
    relabel_to = {}
    for sample_id in HOSTILE_IDS[:4]:
        row = flagged[flagged["id"] == sample_id].iloc[0]
        page.card(sample_id).click()
        if row["label"] != HOSTILE_CLASS:
            place = class_order(json.loads((tmp_path / "r" / "review.json").read_text())["classes"], row).index(HOSTILE_CLASS)
            page.page.keyboard.press(str(place + 1))
            relabel_to[sample_id] = HOSTILE_CLASS
        else:
            page.page.keyboard.press("r")
    page.card(HOSTILE_IDS[4]).locator("button[data-decision=remove]").click()
    page.download(tmp_path / "decided.csv")
    decided = pd.read_csv(tmp_path / "decided.csv", dtype=str, keep_default_na=False)
    written = pd.read_csv(tmp_path / "r" / "review.csv", dtype=str, keep_default_na=False)
    assert decided.drop(columns=["decision", "new_label"]).equals(written.drop(columns=["decision", "new_label"]))
    assert set(decided["new_label"]) == {"", "'" + HOSTILE_CLASS}  # marked as review.csv marks a formula-like cell
    applied = run_apply(tmp_path / "decided.csv", manifest, "-o", tmp_path / "fixed.csv", "--audit", tmp_path / "audit.csv")
    assert applied.returncode == 0, applied.stderr
    audit = pd.read_csv(tmp_path / "audit.csv", dtype=str, keep_default_na=False).set_index("id")
    for sample_id, new_label in relabel_to.items():
        assert audit.loc[sample_id, "decision"] == "relabel" and audit.loc[sample_id, "new_label"] == new_label
    assert audit.loc[HOSTILE_IDS[4], "decision"] == "remove"
    fixed = pd.read_csv(tmp_path / "fixed.csv", dtype=str, keep_default_na=False)
    assert HOSTILE_IDS[4] not in set(fixed["id"]) and set(HOSTILE_IDS[5:]) <= set(fixed["id"])
    assert relabel_to and all(fixed.set_index("id").loc[sample_id, "label"] == HOSTILE_CLASS for sample_id in relabel_to)
