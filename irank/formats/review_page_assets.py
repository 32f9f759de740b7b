"""The review page's inline style sheet and script (see `review_page`): the page is one offline file.

The script reads the pack's data from `<script type="application/json" id="irank-data">` and writes nothing
into the page as HTML: every text it shows goes in through `textContent` or an option's `text`.
Hooks for tests and people's own scripts: each card's `data-id` (the row's id), `data-row` (its row of
review.csv), `data-decision` (empty, keep, relabel or remove) and `data-new-label`; its buttons'
`data-decision`; `#download`, `#decided`, `#viewer`.
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; background: #fafafa; }
h1 { margin: .6em 0 .2em; font-size: 1.5em; } h2 { font-size: 1.05em; margin: .2em 0 .4em; }
h3 { font-size: .95em; margin: .6em 0 .2em; }
.lead { color: #555; margin: 0 0 1em; } .lead kbd, .help kbd { font-size: .85em; }
kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 .3em; background: #fff; font-family: inherit; }
.summary { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; margin-bottom: 1em; }
.panel { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6em .9em; }
.panel p { margin: .2em 0 .5em; max-width: 44em; } .caption { color: #555; font-size: .92em; }
table.classes, table.matrix { border-collapse: collapse; }
table.classes td, table.classes th, table.matrix td, table.matrix th { padding: .15em .6em; text-align: right; }
table.classes td:first-child, table.classes th:first-child, table.matrix th[scope=row] { text-align: left; }
table.classes tbody tr:nth-child(odd) { background: #f4f4f4; }
table.matrix thead th { font-weight: 600; max-width: 7em; overflow-wrap: anywhere; vertical-align: bottom; }
table.matrix td { border: 1px solid #eee; min-width: 2em; } table.matrix td.same { color: #bbb; }
ol.pairs { margin: .2em 0; padding-left: 1.6em; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .bar { fill: #d9534f; cursor: pointer; } svg .bar:hover { fill: #b52b27; }
svg .rest { fill: #bbb; } svg .flag { fill: #d9534f; } svg .cut { stroke: #222; stroke-width: 1.5; stroke-dasharray: 4 3; }
.controls { position: sticky; top: 0; background: #fafafa; padding: .5em 0; border-bottom: 1px solid #ddd;
            display: flex; gap: 1.2em; flex-wrap: wrap; align-items: center; z-index: 1; }
#decided { font-weight: 600; } #download { font-weight: 600; } .note { color: #b52b27; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: .8em; margin-top: .8em; }
.card { display: flex; gap: .7em; background: #fff; border: 2px solid #ddd; border-radius: 6px; padding: .6em;
        cursor: pointer; outline: none; scroll-margin: 4.5em 0 1em; }
.card[hidden] { display: none; }
.card.selected { border-color: #2566c4; box-shadow: 0 0 0 3px rgba(37, 102, 196, .25); }
.card[data-decision=keep] { background: #eef8f0; } .card[data-decision=relabel] { background: #fff7e6; }
.card[data-decision=remove] { background: #fbeaea; }
.card img { width: 128px; height: 128px; object-fit: contain; background: #eee; flex: none; cursor: zoom-in; }
.card img.pixelated, #viewer img.pixelated { image-rendering: pixelated; }
.card.missing { border-color: #c00; }
.meta { min-width: 0; flex: 1; } .meta div { overflow-wrap: anywhere; }
.rank { font-weight: 600; } .given b { color: #b52b27; } .suggested b { color: #1a7f37; }
.candidates, .id { color: #666; font-size: .92em; }
.decide { display: flex; flex-wrap: wrap; gap: .3em; margin-top: .4em; align-items: center; }
.decide button { font: inherit; padding: .1em .5em; border: 1px solid #aaa; border-radius: 4px; background: #f6f6f6;
                 cursor: pointer; }
.decide button[aria-pressed=true] { background: #2566c4; border-color: #2566c4; color: #fff; }
.decide select { font: inherit; max-width: 12em; }
.status { font-weight: 600; min-height: 1.2em; }
#viewer { position: fixed; inset: 0; background: rgba(0, 0, 0, .85); display: flex; flex-direction: column;
          align-items: center; justify-content: center; z-index: 5; color: #fff; cursor: zoom-out; }
#viewer[hidden] { display: none; }
#viewer img { max-width: 94vw; max-height: 84vh; min-width: min(512px, 94vw); min-height: min(512px, 84vh);
              object-fit: contain; background: #333; }
#viewer p { margin: .6em 0 0; overflow-wrap: anywhere; max-width: 94vw; }
"""

SCRIPT = r"""
window.addEventListener("error", function () { document.body.setAttribute("data-error", "1"); });
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("irank-data").textContent);
  var sheet = data.sheet;
  var container = document.getElementById("cards");
  var cards = Array.prototype.slice.call(container.querySelectorAll(".card"));
  var byId = new Map(cards.map(function (card) { return [card.getAttribute("data-id"), card]; }));
  var classFilter = document.getElementById("class-filter");
  var classField = document.getElementById("class-field");
  var decisionFilter = document.getElementById("decision-filter");
  var sortKey = document.getElementById("sort-key");
  var shown = document.getElementById("shown");
  var counter = document.getElementById("decided");
  var download = document.getElementById("download");
  var note = document.getElementById("note");
  var viewer = document.getElementById("viewer");
  var viewerImage = document.getElementById("viewer-image");
  var viewerCaption = document.getElementById("viewer-caption");
  var decisions = new Map();  // review.csv row -> {decision, label: the new label's class index (relabel)}
  var selected = null;
  var storageKey = "irank-review:" + data.key;
  var storage = null;
  var numeric = { rank: 1, classRank: 1, labelProb: 1 };

  function rowOf(card) { return parseInt(card.dataset.row, 10); }

  // --- filter and sort -----------------------------------------------------------------------------------
  function compare(key) {
    return function (a, b) {
      var order;
      if (key in numeric) {
        order = numeric[key] * (parseFloat(a.dataset[key]) - parseFloat(b.dataset[key]));
      } else {
        order = a.dataset[key].localeCompare(b.dataset[key]);
      }
      return order || (parseInt(a.dataset.rank, 10) - parseInt(b.dataset.rank, 10));
    };
  }
  function wantedDecision(card) {
    var wanted = decisionFilter.value;
    return wanted === "all" || (card.dataset.decision || "undecided") === wanted;
  }
  function update() {
    var wanted = classFilter.value, field = classField.value, visible = 0;
    cards.slice().sort(compare(sortKey.value)).forEach(function (card) {
      var show = (wanted === "" || card.dataset[field] === wanted) && wantedDecision(card);
      card.hidden = !show;
      if (show) { visible += 1; }
      container.appendChild(card);
    });
    shown.textContent = visible + " of " + cards.length + " cards shown";
  }
  [classFilter, classField, decisionFilter, sortKey].forEach(function (control) {
    control.addEventListener("change", update);
  });
  Array.prototype.forEach.call(document.querySelectorAll("[data-filter-class]"), function (bar) {
    bar.addEventListener("click", function () {
      classField.value = "label";
      classFilter.value = bar.getAttribute("data-filter-class");
      update();
    });
  });

  // --- decisions -------------------------------------------------------------------------------------------
  function classOrder(card) {  // the suggested class first, then the others in the pack's order
    var suggested = data.classes.indexOf(card.dataset.predicted), order = suggested >= 0 ? [suggested] : [];
    data.classes.forEach(function (name, index) { if (index !== suggested) { order.push(index); } });
    return order;
  }
  function fillChoices(card) {
    var select = card.querySelector("select.new-label");
    if (select.options.length === data.classes.length) { return select; }
    var current = select.value;
    while (select.options.length) { select.remove(0); }
    classOrder(card).forEach(function (index, place) {
      var option = document.createElement("option");
      option.value = String(index);
      option.text = (place < 9 ? (place + 1) + " · " : "") + data.classes[index];
      select.add(option);
    });
    if (current !== "") { select.value = current; }
    return select;
  }
  function show(card) {
    var chosen = decisions.get(rowOf(card)), decision = chosen ? chosen.decision : "";
    card.dataset.decision = decision;
    card.dataset.newLabel = decision === "relabel" ? data.classes[chosen.label] : "";
    Array.prototype.forEach.call(card.querySelectorAll("button[data-decision]"), function (button) {
      button.setAttribute("aria-pressed", String(button.getAttribute("data-decision") === decision));
    });
    if (decision === "relabel") { fillChoices(card).value = String(chosen.label); }
    card.querySelector(".status").textContent =
      decision === "relabel" ? "relabel as " + data.classes[chosen.label] : decision;
  }
  function count() {
    counter.textContent = decisions.size + " of " + cards.length + " decided";
  }
  function save() {
    if (!storage) { return; }
    var entries = [];
    decisions.forEach(function (chosen, row) {
      var card = cards[row];
      entries.push([card.getAttribute("data-id"), chosen.decision,
                    chosen.decision === "relabel" ? data.classes[chosen.label] : ""]);
    });
    try {
      storage.setItem(storageKey, JSON.stringify({ version: 1, decisions: entries }));
    } catch (error) {
      note.textContent = "Decisions could not be saved in this browser (" + error.name + "): download review.csv often.";
    }
  }
  function decide(card, decision, label) {
    var row = rowOf(card);
    if (decision === "relabel" && data.classes[label] === card.dataset.label) { decision = "keep"; }
    if (decision === "") { decisions.delete(row); }
    else { decisions.set(row, { decision: decision, label: decision === "relabel" ? label : -1 }); }
    show(card);
    count();
    save();
    if (decisionFilter.value !== "all") { update(); }
  }
  function restore() {
    var stored = null;
    try {
      storage = window.localStorage;
      stored = JSON.parse(storage.getItem(storageKey) || "null");
    } catch (error) {
      storage = null;
      note.textContent = "This browser keeps no decisions for this page (" + error.name + "): download review.csv before you close it.";
    }
    if (!stored || !Array.isArray(stored.decisions)) { return; }
    stored.decisions.forEach(function (entry) {
      var card = Array.isArray(entry) ? byId.get(entry[0]) : undefined;
      var label = Array.isArray(entry) ? data.classes.indexOf(entry[2]) : -1;
      if (!card || ["keep", "relabel", "remove"].indexOf(entry[1]) < 0) { return; }
      if (entry[1] === "relabel" && label < 0) { return; }
      decisions.set(rowOf(card), { decision: entry[1], label: label });
    });
  }

  // --- review.csv, written as irank writes it, with the decisions filled in ---------------------------
  function field(value, alone) {
    if (sheet.quote_all || /[",\r\n]/.test(value) || (alone && value === "")) {
      return '"' + value.replace(/"/g, '""') + '"';
    }
    return value;
  }
  function line(fields) {
    return fields.map(function (value) { return field(value, fields.length === 1); }).join(",") + sheet.newline;
  }
  function exportText() {
    var parts = [line(sheet.header)];
    sheet.rows.forEach(function (fields, row) {
      var copy = fields.slice(), chosen = decisions.get(row);
      if (chosen) {
        copy[sheet.decision_at] = chosen.decision;
        copy[sheet.decision_at + 1] = chosen.decision === "relabel" ? data.marked_classes[chosen.label] : "";
      }
      parts.push(line(copy));
    });
    return parts.join("");
  }
  function downloadSheet() {
    var blob = new Blob([exportText()], { type: "text/csv;charset=utf-8" });
    var link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "review.csv";
    document.body.appendChild(link);
    link.click();
    document.body.removeChild(link);
    setTimeout(function () { URL.revokeObjectURL(link.href); }, 60000);
  }
  if (sheet.exact) {
    download.addEventListener("click", downloadSheet);
  } else {
    download.disabled = true;
    note.textContent = "This pack's review.csv cannot be rebuilt in the browser: write the decisions into review.csv.";
  }

  // --- selection, keys and the full-size view ------------------------------------------------------------
  function visibleCards() {  // in the order shown: update() puts the cards in place
    return Array.prototype.filter.call(container.children, function (card) { return !card.hidden; });
  }
  function select(card) {
    if (selected) { selected.classList.remove("selected"); selected.setAttribute("aria-selected", "false"); }
    selected = card;
    if (!card) { return; }
    card.classList.add("selected");
    card.setAttribute("aria-selected", "true");
    card.scrollIntoView({ block: "nearest" });
    if (!viewer.hidden) { openViewer(card); }
  }
  function columns(visible) {
    var top = visible.length ? visible[0].offsetTop : 0, across = 0;
    while (across < visible.length && visible[across].offsetTop === top) { across += 1; }
    return Math.max(1, across);
  }
  function move(step) {
    var visible = visibleCards(), at = selected ? visible.indexOf(selected) : -1;
    if (!visible.length) { return; }
    if (step === "down" || step === "up") { step = (step === "down" ? 1 : -1) * columns(visible); }
    if (at < 0) { select(visible[0]); return; }
    select(visible[Math.min(visible.length - 1, Math.max(0, at + step))]);
  }
  function openViewer(card) {
    var image = card.querySelector("img");
    viewerImage.src = image.getAttribute("data-full") || image.src;
    viewerImage.classList.toggle("pixelated", image.classList.contains("pixelated") && !image.getAttribute("data-full"));
    viewerCaption.textContent = [".rank", ".given", ".suggested", ".id", ".status"].map(function (part) {
      return card.querySelector(part).textContent;
    }).filter(Boolean).join(" · ");
    viewer.hidden = false;
  }
  function closeViewer() { viewer.hidden = true; viewerImage.removeAttribute("src"); }
  function byKey(decision, label) {
    if (!selected) { return; }
    decide(selected, decision, label);
    if (decision !== "") { move(1); }
  }
  var moves = { ArrowRight: 1, l: 1, ArrowLeft: -1, j: -1, ArrowDown: "down", ArrowUp: "up" };
  document.addEventListener("keydown", function (event) {
    var tag = event.target && event.target.tagName, key = event.key;
    if (event.ctrlKey || event.metaKey || event.altKey || tag === "SELECT" || tag === "INPUT" || tag === "TEXTAREA") { return; }
    if (tag === "BUTTON" && (key === "Enter" || key === " ")) { return; }
    if (key in moves) { move(moves[key]); }
    else if (key === "k") { byKey("keep"); }
    else if (key === "r") { byKey("remove"); }
    else if (key === "u" || key === "Backspace" || key === "Delete") { byKey(""); }
    else if (/^[1-9]$/.test(key)) {
      var order = selected ? classOrder(selected) : [];
      if (order.length >= parseInt(key, 10)) { byKey("relabel", order[parseInt(key, 10) - 1]); }
    }
    else if (key === "Enter") { if (!viewer.hidden) { closeViewer(); } else if (selected) { openViewer(selected); } }
    else if (key === "Escape") { closeViewer(); }
    else { return; }
    event.preventDefault();
  });
  viewer.addEventListener("click", closeViewer);
  cards.forEach(function (card) {
    var image = card.querySelector("img"), choices = card.querySelector("select.new-label");
    function sharpen() { if (image.naturalWidth && image.naturalWidth < 96) { image.classList.add("pixelated"); } }
    if (image.complete) { sharpen(); } else { image.addEventListener("load", sharpen); }
    card.addEventListener("click", function () { if (selected !== card) { select(card); } });
    image.addEventListener("click", function () { select(card); openViewer(card); });
    Array.prototype.forEach.call(card.querySelectorAll("button[data-decision]"), function (button) {
      button.addEventListener("click", function () {
        var decision = button.getAttribute("data-decision");
        var pressed = button.getAttribute("aria-pressed") === "true";
        select(card);
        decide(card, pressed ? "" : decision, decision === "relabel" ? parseInt(fillChoices(card).value, 10) : -1);
        card.focus({ preventScroll: true });  // Enter then opens the picture, not this button again
      });
    });
    choices.addEventListener("focus", function () { fillChoices(card); });
    choices.addEventListener("mousedown", function () { fillChoices(card); });
    choices.addEventListener("change", function () {
      decide(card, "relabel", parseInt(choices.value, 10));
      card.focus({ preventScroll: true });  // so that the keys act on the cards again
    });
  });

  // A link can preselect the view: index.html#class=cat&by=predicted&sort=labelProb&decision=undecided
  var asked = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (pair) {
    var at = pair.indexOf("=");
    if (at > 0) { asked[decodeURIComponent(pair.slice(0, at))] = decodeURIComponent(pair.slice(at + 1)); }
  });
  function choose(select, value) {
    var known = Array.prototype.some.call(select.options, function (option) { return option.value === value; });
    if (value !== undefined && known) { select.value = value; }
  }
  choose(classFilter, asked["class"]);
  choose(classField, asked.by);
  choose(sortKey, asked.sort);
  choose(decisionFilter, asked.decision);
  restore();
  cards.forEach(show);
  count();
  update();
  document.body.setAttribute("data-ready", "1");
}());
"""
