/* circuitdyn report: draws each figure when it scrolls into view (its JSON sits in a
 * <script type="application/json"> beside its div), opens a run's collapsed section when a
 * link points into it, and records on <body> what was drawn so a headless check can read it:
 * data-figures (total), data-figures-drawn, data-figures-empty (drawn without a finite point),
 * data-js-errors. window.circuitdynRenderAll() draws every figure at once (also on #render-all). */
(function () {
  "use strict";
  var body = document.body;
  var template = JSON.parse(document.getElementById("cd-template").textContent);
  var config = { responsive: true, displaylogo: false };
  var divs = Array.prototype.slice.call(document.querySelectorAll("div.cd-plot"));
  var drawn = 0, empty = 0;
  body.setAttribute("data-figures", String(divs.length));
  body.setAttribute("data-figures-drawn", "0");
  body.setAttribute("data-figures-empty", "0");

  function finiteIn(values) {
    if (!values) return 0;
    var n = 0;
    for (var i = 0; i < values.length; i++) {
      var v = values[i];
      if (v && typeof v === "object" && v.length !== undefined) n += finiteIn(v);
      else if (v !== null && v !== "" && v !== undefined && (typeof v !== "number" || isFinite(v))) n += 1;
    }
    return n;
  }

  function points(gd) {
    var n = 0;
    (gd._fullData || []).forEach(function (t) {
      if (t.visible !== true) return;
      if (t.type === "heatmap") n += finiteIn(t.z);
      else if (t.type === "sankey") n += finiteIn(t.link && t.link.value);
      else if (t.type === "bar") n += finiteIn(t.y);
      else n += Math.min(finiteIn(t.x), finiteIn(t.y));
    });
    return n;
  }

  function draw(div) {
    if (div.getAttribute("data-state")) return;
    div.setAttribute("data-state", "drawing");
    var fig = JSON.parse(document.getElementById(div.id + "-json").textContent);
    var layout = fig.layout || {};
    layout.template = template;
    window.Plotly.newPlot(div, fig.data || [], layout, config).then(function (gd) {
      if (layout.meta && layout.meta.circuitdyn && window.circuitdynExplorer) {
        window.circuitdynExplorer(gd);
      }
      var n = points(gd);
      div.setAttribute("data-points", String(n));
      div.setAttribute("data-state", "drawn");
      drawn += 1;
      if (n === 0) empty += 1;
      body.setAttribute("data-figures-drawn", String(drawn));
      body.setAttribute("data-figures-empty", String(empty));
    });
  }

  window.circuitdynRenderAll = function () {
    document.querySelectorAll("details").forEach(function (d) { d.open = true; });
    divs.forEach(draw);
  };

  if ("IntersectionObserver" in window) {
    var observer = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (entry.isIntersecting) {
          observer.unobserve(entry.target);
          draw(entry.target);
        }
      });
    }, { rootMargin: "300px 0px" });
    divs.forEach(function (div) { observer.observe(div); });
  } else {
    divs.forEach(draw);
  }

  // A link (or the address) pointing into a closed run section opens it first.
  function reveal(hash) {
    if (!hash || hash === "#") return;
    if (hash === "#render-all") { window.circuitdynRenderAll(); return; }
    var target = document.getElementById(decodeURIComponent(hash.slice(1)));
    if (!target) return;
    for (var node = target; node; node = node.parentElement) {
      if (node.tagName === "DETAILS") node.open = true;
    }
    target.scrollIntoView();
  }
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a[href^='#']");
    if (link) { event.preventDefault(); history.replaceState(null, "", link.getAttribute("href")); reveal(link.getAttribute("href")); }
  });
  window.addEventListener("hashchange", function () { reveal(location.hash); });
  reveal(location.hash);
})();
