/* auditor report: sortable, filterable neuron tables. No dependencies, no network.
   Without JavaScript the tables are complete and readable; this only adds tools. */
(function () {
  "use strict";

  function cellKey(row, col, type) {
    var cell = row.cells[col];
    if (!cell) { return null; }
    if (type === "num") {
      var raw = cell.getAttribute("data-v");
      if (raw === null || raw === "") { return null; }
      var v = parseFloat(raw);
      return isNaN(v) ? null : v;
    }
    return (cell.textContent || "").trim().toLowerCase();
  }

  function sortTable(table, col, type, th) {
    var body = table.tBodies[0];
    // First click: numbers largest first, text A to Z; each further click reverses.
    var current = th.getAttribute("aria-sort");
    var ascending = current ? current !== "ascending" : type !== "num";
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (row, i) { return { row: row, key: cellKey(row, col, type), i: i }; });
    keyed.sort(function (a, b) {
      // missing values last in both directions; stable on the original order
      if (a.key === null && b.key === null) { return a.i - b.i; }
      if (a.key === null) { return 1; }
      if (b.key === null) { return -1; }
      var d = a.key < b.key ? -1 : (a.key > b.key ? 1 : 0);
      return (ascending ? d : -d) || a.i - b.i;
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k.row); });
    body.appendChild(frag);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) {
      if (c !== th) { c.removeAttribute("aria-sort"); }
    });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  function makeSortable(table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var type = th.getAttribute("data-type");
      if (!type) { return; }
      var button = document.createElement("button");
      button.type = "button";
      while (th.firstChild) { button.appendChild(th.firstChild); }
      th.appendChild(button);
      th.classList.add("sortable");
      button.addEventListener("click", function () { sortTable(table, col, type, th); });
    });
  }

  // A row matches a term when the term occurs in its neuron number, verdict or the
  // concepts its formula uses un-negated; "not NAME" matches negated use only.
  function rowMatches(row, terms) {
    var plain = (row.getAttribute("data-neuron") || "") + " " + (row.getAttribute("data-statuses") || "")
      .replace(/_/g, " ") + " " + (row.getAttribute("data-pos") || "").replace(/\|/g, " ");
    var negated = (row.getAttribute("data-neg") || "").replace(/\|/g, " ");
    for (var i = 0; i < terms.length; i++) {
      var t = terms[i];
      if ((t === "not" || t === "-") && i + 1 < terms.length) {
        i += 1;
        if (negated.indexOf(terms[i]) === -1) { return false; }
        continue;
      }
      if (t.charAt(0) === "-" && t.length > 1) {
        if (negated.indexOf(t.slice(1)) === -1) { return false; }
        continue;
      }
      if (plain.indexOf(t) === -1) { return false; }
    }
    return true;
  }

  function makeFilter(tools, table) {
    var input = tools.querySelector("input");
    var count = tools.querySelector(".count");
    var buttons = Array.prototype.slice.call(tools.querySelectorAll(".status-filters button"));
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var status = "";
    function apply() {
      var terms = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      rows.forEach(function (row) {
        var statuses = " " + (row.getAttribute("data-statuses") || "") + " ";
        var ok = (!status || statuses.indexOf(" " + status + " ") !== -1) && rowMatches(row, terms);
        row.hidden = !ok;
        if (ok) { shown += 1; }
      });
      count.textContent = shown + " of " + rows.length + " neurons";
    }
    buttons.forEach(function (b) {
      b.addEventListener("click", function () {
        status = b.getAttribute("data-status") || "";
        buttons.forEach(function (o) { o.setAttribute("aria-pressed", o === b ? "true" : "false"); });
        apply();
      });
    });
    input.addEventListener("input", apply);
    apply();
    tools.hidden = false;
  }

  // Printing from the browser: every card open on paper, as collapsed as before on screen.
  function printOpensCards() {
    var opened = [];
    window.addEventListener("beforeprint", function () {
      Array.prototype.forEach.call(document.querySelectorAll("details:not([open])"), function (d) {
        d.open = true;
        opened.push(d);
      });
    });
    window.addEventListener("afterprint", function () {
      opened.forEach(function (d) { d.open = false; });
      opened = [];
    });
  }

  function init() {
    printOpensCards();
    Array.prototype.forEach.call(document.querySelectorAll("table.neurons"), function (table) {
      if (!table.tHead || !table.tBodies.length) { return; }
      makeSortable(table);
      var tools = document.querySelector('.table-tools[data-table="' + table.id + '"]');
      if (tools) { makeFilter(tools, table); }
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
