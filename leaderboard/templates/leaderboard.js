"use strict";
// Sortable columns and row filters for the qbench leaderboard. Plain DOM, no network.
(function () {
  function cellValue(row, index) {
    var cell = row.children[index];
    return cell ? (cell.getAttribute("data-v") || "") : "";
  }
  function sortBy(th) {
    var table = th.closest("table");
    var body = table.tBodies[0];
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.getAttribute("data-sort") === "num";
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (r, i) { if (!r.hasAttribute("data-i")) r.setAttribute("data-i", String(i)); });
    rows.sort(function (a, b) {
      var x = cellValue(a, index), y = cellValue(b, index);
      if (x === "" || y === "") {  // empty cells last, whatever the direction
        if (x === y) return Number(a.getAttribute("data-i")) - Number(b.getAttribute("data-i"));
        return x === "" ? 1 : -1;
      }
      var c = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return c !== 0 ? dir * c : Number(a.getAttribute("data-i")) - Number(b.getAttribute("data-i"));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
  }
  document.querySelectorAll("th[data-sort]").forEach(function (th) {
    var target = th.querySelector("button") || th;
    target.addEventListener("click", function () { sortBy(th); });
  });

  // The filters live in the query string (index.html?method=lsq&aw=2%2F2): a filtered view
  // is a link to share, and opening it restores the filters.
  var selects = document.querySelectorAll("select[data-filter]");
  function hasOption(select, value) {
    return Array.prototype.some.call(select.options, function (o) { return o.value === value; });
  }
  function readUrl() {
    var params = new URLSearchParams(window.location.search);
    selects.forEach(function (s) {
      var v = params.get(s.getAttribute("data-filter"));
      s.value = v !== null && hasOption(s, v) ? v : "";
    });
  }
  function writeUrl() {
    var params = new URLSearchParams(window.location.search);
    selects.forEach(function (s) {
      var key = s.getAttribute("data-filter");
      if (s.value !== "") params.set(key, s.value); else params.delete(key);
    });
    var query = params.toString();
    var url = window.location.pathname + (query ? "?" + query : "") + window.location.hash;
    try { history.replaceState(null, "", url); } catch (e) { /* a browser that refuses: filters still work */ }
  }
  function applyFilters() {
    var wanted = {};
    selects.forEach(function (s) { if (s.value !== "") wanted[s.getAttribute("data-filter")] = s.value; });
    var shown = 0, total = 0;
    document.querySelectorAll("section[data-section]").forEach(function (section) {
      var visible = 0;
      section.querySelectorAll("table.lb tbody tr").forEach(function (tr) {
        var ok = true;
        Object.keys(wanted).forEach(function (k) { if (tr.getAttribute("data-" + k) !== wanted[k]) ok = false; });
        tr.hidden = !ok;
        total += 1;
        if (ok) { shown += 1; visible += 1; }
      });
      var note = section.querySelector(".empty-note");
      if (note) note.hidden = visible > 0;
    });
    var count = document.getElementById("count");
    if (count) count.textContent = shown + " of " + total + " rows shown";
  }
  function changed() { applyFilters(); writeUrl(); }
  selects.forEach(function (s) { s.addEventListener("change", changed); });
  var reset = document.getElementById("reset");
  if (reset) reset.addEventListener("click", function () {
    selects.forEach(function (s) { s.value = ""; });
    changed();
  });
  if (selects.length) { readUrl(); applyFilters(); }
})();
