"""The template of ``report.html`` (:mod:`.report`): HTML skeleton, CSS and the page's script.

Plain HTML, CSS and vanilla JavaScript, no network: the script reads the rows from the
``<script type="application/json" id="report-data">`` element (``{"rows": [...], "statuses": [...],
"pageSize": n, "threshold": x}``) and renders one page of the filtered, sorted rows into
``<tbody id="case-rows">``. Its state lives in the URL hash (``sort``, ``dir``, ``page``, ``q``,
``status``, ``size``), so a link or a reload shows the same view. After each render it sets
``window.reportTimings`` (``first_render``: ``performance.now()`` at the end of the first render,
``last_render_ms``: how long the last render took) and ``data-rendered`` on the table.

:data:`PAGE_TEMPLATE` is filled with ``str.format``; the style and script are passed in as values,
so their braces need no escaping.
"""

PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="himatchad {version}">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>HiMatch-AD batch report</h1>
<p class="folder">Output folder: <a href="{folder_uri}"><code>{folder}</code></a> — <a href="summary.csv">summary.csv</a></p>
<p id="counts" data-counts="{counts_json}"><strong>{total}</strong> cases: {counts}</p>
<p class="muted">Written {when} by himatchad {version}.</p>
</header>
{banner}
<section id="scores-section">
<h2>Volume scores</h2>
{histogram}
</section>
<section id="cases-section">
<h2>Cases</h2>
<div class="controls">
<label>Search case or reason <input type="search" id="filter-text" placeholder="text in case or reason" autocomplete="off"></label>
<label>Status <select id="filter-status"><option value="">all</option></select></label>
<label>Rows per page <select id="page-size"><option>25</option><option>100</option><option>500</option></select></label>
<span id="showing" class="muted"></span>
</div>
<noscript><p class="banner">The table needs JavaScript; the same rows are in summary.csv.</p></noscript>
<div class="table-wrap">
<table id="cases">
<thead><tr id="case-head"></tr></thead>
<tbody id="case-rows"></tbody>
</table>
</div>
<nav class="pager" aria-label="pages">
<button type="button" id="page-first">« first</button>
<button type="button" id="page-prev">‹ previous</button>
<span id="page-info"></span>
<button type="button" id="page-next">next ›</button>
<button type="button" id="page-last">last »</button>
</nav>
</section>
<section id="run-section">
<h2>Settings and provenance</h2>
{run}
</section>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

PAGE_STYLE = r"""
:root { --fg: #1d2430; --muted: #5f6b7a; --line: #d5dbe3; --head: #eef2f6; --accent: #c2410c; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0 auto; padding: 1em 1.5em 3em; max-width: 1400px; }
h1 { font-size: 1.5em; margin: 0.2em 0; } h2 { font-size: 1.15em; margin: 1.4em 0 0.5em; border-bottom: 1px solid var(--line); }
code { font-size: 0.92em; } .muted { color: var(--muted); }
.banner { background: #fff1e6; border: 2px solid var(--accent); color: #7c2d12; padding: 0.7em 1em; border-radius: 6px; margin: 1em 0; font-size: 1.05em; }
.disagree { background: #fffbe6; border: 1px solid #e0b400; padding: 0.5em 1em; border-radius: 6px; margin-bottom: 0.8em; }
.controls { display: flex; gap: 1.2em; flex-wrap: wrap; align-items: center; margin: 0.5em 0; }
.controls input[type=search] { width: 18em; }
.table-wrap { overflow-x: auto; }
table#cases { border-collapse: collapse; width: 100%; }
#cases th, #cases td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: middle; }
#cases th { background: var(--head); position: sticky; top: 0; white-space: nowrap; user-select: none; }
#cases th.sortable { cursor: pointer; } #cases th.sortable:hover { background: #dde4ec; }
#cases th[aria-sort=ascending]::after { content: " ▲"; } #cases th[aria-sort=descending]::after { content: " ▼"; }
#cases td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
#cases td.case { overflow-wrap: anywhere; min-width: 12em; max-width: 28em; }
#cases td.reason { max-width: 32em; color: #7f1d1d; }
#cases img.thumb { height: 56px; width: auto; max-width: 160px; display: block; background: #000; }
.status { padding: 1px 6px; border-radius: 4px; white-space: nowrap; }
.status-ok { background: #dcfce7; } .status-done-earlier { background: #e0f2fe; }
.status-failed { background: #fee2e2; } .status-skipped { background: #f1f5f9; }
.links a { margin-right: 0.6em; }
.pager { margin: 0.7em 0; display: flex; gap: 0.6em; align-items: center; }
table.kv { border-collapse: collapse; } table.kv th, table.kv td { text-align: left; padding: 2px 10px 2px 0; vertical-align: top; }
table.kv th { color: var(--muted); font-weight: normal; white-space: nowrap; } table.kv td { word-break: break-all; }
#histogram .bar { fill: #2563eb; } #histogram .bar:hover { fill: #1e40af; }
#histogram .axis { stroke: #94a3b8; } #histogram .tick { font-size: 11px; fill: var(--muted); }
#histogram .threshold { stroke: var(--accent); stroke-width: 2; stroke-dasharray: 5 3; }
#histogram .threshold-label { fill: var(--accent); }
"""

PAGE_SCRIPT = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var ROWS = DATA.rows;
  var SIZES = [25, 100, 500];
  var COLUMNS = [
    { key: "picture", label: "picture" },
    { key: "case", label: "case", type: "text" },
    { key: "status", label: "status", type: "text" },
    { key: "message", label: "reason", type: "text" },
    { key: "volume_score", label: "volume score", type: "num" },
    { key: "anomalous_volume_mm3", label: "anomalous size", type: "num" },
    { key: "most_anomalous_slice", label: "most anomalous slice", type: "num" },
    { key: "seconds", label: "seconds", type: "num" },
    { key: "links", label: "outputs" }
  ];
  var BY_KEY = {};
  COLUMNS.forEach(function (c) { BY_KEY[c.key] = c; });
  var collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  for (var i = 0; i < ROWS.length; i++) {
    var r = ROWS[i];
    r._i = i;
    r._text = (r.case + "\n" + r.message + "\n" + (r.note || "")).toLowerCase();
  }
  var $ = function (id) { return document.getElementById(id); };
  var tbody = $("case-rows"), table = $("cases");
  var state = null, cacheKey = null, cached = null, firstDone = false;
  window.reportTimings = window.reportTimings || {};

  function parseHash() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    var s = {
      sort: p.get("sort") || "", dir: p.get("dir") === "desc" ? "desc" : "asc",
      page: parseInt(p.get("page"), 10) || 1, q: p.get("q") || "", status: p.get("status") || "",
      size: parseInt(p.get("size"), 10) || DATA.pageSize
    };
    if (!BY_KEY[s.sort] || !BY_KEY[s.sort].type) s.sort = "";
    if (s.size < 1) s.size = DATA.pageSize;
    return s;
  }
  function hashOf(s) {
    var p = new URLSearchParams();
    if (s.sort) { p.set("sort", s.sort); p.set("dir", s.dir); }
    if (s.q) p.set("q", s.q);
    if (s.status) p.set("status", s.status);
    if (s.size !== DATA.pageSize) p.set("size", String(s.size));
    if (s.page > 1) p.set("page", String(s.page));
    return p.toString();
  }
  function go(s, replace) {
    var h = hashOf(s);
    if (h === location.hash.replace(/^#/, "")) { state = s; render(); return; }
    if (replace) location.replace("#" + h); else location.hash = h;
  }
  function change(edit, replace) {
    var s = Object.assign({}, state);
    edit(s);
    go(s, replace);
  }

  function compare(col, dir) {
    var sign = dir === "desc" ? -1 : 1, key = col.key;
    if (col.type === "num") {
      return function (a, b) {
        var x = a[key], y = b[key];
        if (x === null || x === undefined) return (y === null || y === undefined) ? a._i - b._i : 1;
        if (y === null || y === undefined) return -1;
        return x === y ? a._i - b._i : (x < y ? -sign : sign);
      };
    }
    return function (a, b) {
      var x = a[key] || "", y = b[key] || "";
      if (!x) return y ? 1 : a._i - b._i;
      if (!y) return -1;
      return (collator.compare(x, y) * sign) || (a._i - b._i);
    };
  }
  function selected(s) {
    var key = [s.q.toLowerCase(), s.status, s.sort, s.dir].join("\u0000");
    if (key === cacheKey) return cached;
    var q = s.q.toLowerCase(), list = ROWS;
    if (q || s.status) {
      list = ROWS.filter(function (r) {
        return (!s.status || r.status === s.status) && (!q || r._text.indexOf(q) !== -1);
      });
    }
    if (s.sort) list = list.slice().sort(compare(BY_KEY[s.sort], s.dir));
    cacheKey = key; cached = list;
    return list;
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    if (cls) td.className = cls;
    if (text !== undefined && text !== null) td.textContent = text;
    tr.appendChild(td);
    return td;
  }
  function link(parent, href, text) {
    var a = document.createElement("a");
    a.href = href; a.textContent = text;
    parent.appendChild(a);
    return a;
  }
  function num(v, digits) {
    if (v === null || v === undefined) return "";
    return digits === undefined ? String(+v.toPrecision(5)) : v.toFixed(digits);
  }
  function rowElement(r) {
    var tr = document.createElement("tr");
    tr.className = "row-" + r.status.replace(/\s+/g, "-");
    var pic = cell(tr, null, "picture");
    if (r.picture) {
      var a = document.createElement("a");
      a.href = r.picture; a.target = "_blank"; a.rel = "noopener";
      var img = document.createElement("img");
      img.loading = "lazy"; img.className = "thumb"; img.alt = "overview of " + r.case; img.src = r.picture;
      a.appendChild(img); pic.appendChild(a);
    } else {
      pic.textContent = "—"; pic.className += " muted";
    }
    cell(tr, r.case, "case");
    var st = cell(tr, null, "status-cell");
    var span = document.createElement("span");
    span.className = "status status-" + r.status.replace(/\s+/g, "-"); span.textContent = r.status;
    st.appendChild(span);
    cell(tr, r.message + (r.note ? (r.message ? "; " : "") + r.note : ""), "reason");
    cell(tr, num(r.volume_score), "num score");
    var size = cell(tr, r.size || "", "num size");
    if (r.anomalous_volume_mm3 !== null) size.title = r.anomalous_volume_mm3 + " mm\u00b3 (" + (r.anomalous_voxels === null ? "?" : r.anomalous_voxels) + " voxels)";
    cell(tr, r.most_anomalous_slice === null ? "" : String(r.most_anomalous_slice), "num slice");
    cell(tr, num(r.seconds, 2), "num seconds");
    var links = cell(tr, null, "links");
    ["heatmap", "labelmap", "scores"].forEach(function (k) { if (r.links[k]) link(links, r.links[k], k); });
    return tr;
  }

  function renderHead() {
    var head = $("case-head");
    COLUMNS.forEach(function (c) {
      var th = document.createElement("th");
      th.textContent = c.label; th.dataset.key = c.key; th.scope = "col";
      if (c.type) {
        th.className = "sortable"; th.tabIndex = 0; th.title = "sort by " + c.label;
        var act = function () {
          change(function (s) {
            if (s.sort === c.key) s.dir = s.dir === "asc" ? "desc" : "asc";
            else { s.sort = c.key; s.dir = c.type === "num" ? "desc" : "asc"; }
            s.page = 1;
          });
        };
        th.addEventListener("click", act);
        th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); act(); } });
      }
      head.appendChild(th);
    });
  }

  function render() {
    var t = performance.now();
    var s = state, list = selected(s);
    var pages = Math.max(1, Math.ceil(list.length / s.size));
    if (s.page > pages) s.page = pages;
    if (s.page < 1) s.page = 1;
    var start = (s.page - 1) * s.size, end = Math.min(list.length, start + s.size);
    var frag = document.createDocumentFragment();
    for (var i = start; i < end; i++) frag.appendChild(rowElement(list[i]));
    tbody.textContent = "";
    tbody.appendChild(frag);
    Array.prototype.forEach.call($("case-head").children, function (th) {
      if (th.dataset.key === s.sort) th.setAttribute("aria-sort", s.dir === "desc" ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
    $("page-info").textContent = "page " + s.page + " of " + pages;
    $("page-first").disabled = $("page-prev").disabled = s.page <= 1;
    $("page-next").disabled = $("page-last").disabled = s.page >= pages;
    $("showing").textContent = list.length ? ("rows " + (start + 1) + "\u2013" + end + " of " + list.length +
      (list.length !== ROWS.length ? " matching (" + ROWS.length + " cases)" : "")) : "no case matches";
    var text = $("filter-text");
    if (document.activeElement !== text && text.value !== s.q) text.value = s.q;
    $("filter-status").value = s.status;
    var sizeSel = $("page-size");
    if (SIZES.indexOf(s.size) === -1) {
      var o = document.createElement("option"); o.textContent = String(s.size); sizeSel.appendChild(o); SIZES.push(s.size);
    }
    sizeSel.value = String(s.size);
    table.dataset.page = String(s.page); table.dataset.pages = String(pages);
    table.dataset.matching = String(list.length); table.dataset.rendered = String(end - start);
    var now = performance.now();
    window.reportTimings.last_render_ms = now - t;
    if (!firstDone) { firstDone = true; window.reportTimings.first_render = now; document.documentElement.dataset.firstRender = String(now); }
  }

  var sel = $("filter-status");
  DATA.statuses.forEach(function (st) { var o = document.createElement("option"); o.value = st; o.textContent = st; sel.appendChild(o); });
  sel.addEventListener("change", function () { change(function (s) { s.status = sel.value; s.page = 1; }); });
  $("filter-text").addEventListener("input", function (e) { change(function (s) { s.q = e.target.value; s.page = 1; }, true); });
  $("page-size").addEventListener("change", function (e) { change(function (s) { s.size = parseInt(e.target.value, 10); s.page = 1; }); });
  $("page-first").addEventListener("click", function () { change(function (s) { s.page = 1; }); });
  $("page-prev").addEventListener("click", function () { change(function (s) { s.page -= 1; }); });
  $("page-next").addEventListener("click", function () { change(function (s) { s.page += 1; }); });
  $("page-last").addEventListener("click", function () { change(function (s) { s.page = Math.max(1, Math.ceil(selected(s).length / s.size)); }); });
  window.addEventListener("hashchange", function () { state = parseHash(); render(); });
  renderHead();
  state = parseHash();
  render();
})();
"""
