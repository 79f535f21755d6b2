/* pisnoop dashboard: the overview's and the fleet's live refresh, the flags' charts, sortable tables. No inline
   script anywhere: the page's CSP allows this file and uPlot only. Values are put in with textContent, never as markup. */
"use strict";
(function () {
  var page = document.body.getAttribute("data-page");

  function getJSON(url, done) {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}).then(function (r) {
      if (r.status === 401) { window.location.href = "/login"; return null; }
      return r.ok ? r.json() : null;
    }).then(function (j) { if (j) done(j); }).catch(function () { /* the next refresh tries again */ });
  }

  function refreshOverview() {
    getJSON("/api/overview", function (j) {
      Object.keys(j.counters).forEach(function (k) {
        var el = document.getElementById("c-" + k);
        if (el) el.textContent = String(j.counters[k]);
      });
      replaceInside("status", j.facts_html);
    });
  }

  /* html is built by the server with every value escaped (webui/pages.py) */
  function replaceInside(id, html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var box = document.getElementById(id);
    box.replaceChildren.apply(box, Array.prototype.slice.call(doc.body.childNodes));
  }

  function refreshFleet() {
    getJSON("/api/fleet", function (j) { replaceInside("fleet-box", j.html); });
  }

  function drawChart(el) {
    getJSON("/api/flags/" + encodeURIComponent(el.getAttribute("data-flag")) + "/chart", function (c) {
      if (!c.t.length) {
        var p = document.createElement("p");
        p.className = "muted";
        p.textContent = c.note || "no stored frames of this client in the window";
        el.appendChild(p);
        return;
      }
      var limit = c.t.map(function () { return c.threshold; });
      var opts = {
        width: Math.min(el.clientWidth || 800, 900), height: 220,
        series: [{}, {label: c.client + " " + c.unit, stroke: "#1f6fb2", width: 1.5},
                 {label: "threshold " + c.threshold, stroke: "#c0392b", dash: [6, 4], width: 1}],
        axes: [{}, {label: c.unit}],
        scales: {x: {time: true}}
      };
      new uPlot(opts, [c.t, c.y, limit], el);
      el.setAttribute("data-drawn", String(c.t.length));
    });
  }

  function sortable(table) {
    var heads = table.querySelectorAll("th");
    heads.forEach(function (th) {
      th.addEventListener("click", function () {
        var col = Number(th.getAttribute("data-col")), num = th.hasAttribute("data-num");
        var down = th.getAttribute("data-sort") !== "down";
        heads.forEach(function (h) { h.removeAttribute("data-sort"); });
        th.setAttribute("data-sort", down ? "down" : "up");
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].textContent, y = b.cells[col].textContent;
          var d = num ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
          return down ? -d : d;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  if (page === "overview") window.setInterval(refreshOverview, 2000);
  if (page === "fleet") window.setInterval(refreshFleet, 2000);
  if (page === "flags" && window.uPlot) document.querySelectorAll(".chart").forEach(drawChart);
  document.querySelectorAll("table.sortable").forEach(sortable);
})();
