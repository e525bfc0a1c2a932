/* circuitdyn circuit explorer: draws the circuit of the step chosen on a slider, hides edges
 * weaker than a chosen fraction of the step's strongest edge, and highlights the edges of a
 * clicked node. The data is in graphDiv.layout.meta.circuitdyn (see plots.circuit_explorer);
 * the trace order (slots) is the one plots._graph_traces builds. No animation: nothing moves
 * unless the reader moves a control, and nodes keep their places. */
(function () {
  "use strict";
  if (window.circuitdynExplorer) return;

  function finite(v) { return v !== null && v !== undefined && isFinite(v); }

  function bytes(text) {
    var raw = atob(text), out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out.buffer;
  }

  // Decodes the compact arrays of the spec once: curves as arrays of points, per step the edge
  // indices and scores (NaN where an edge has no score).
  function decode(spec) {
    var P = spec.points, xs = new Float32Array(bytes(spec.px)), ys = new Float32Array(bytes(spec.py));
    spec.px = []; spec.py = [];
    for (var e = 0; e < spec.edges.length; e++) {
      spec.px.push(Array.prototype.slice.call(xs, e * P, (e + 1) * P));
      spec.py.push(Array.prototype.slice.call(ys, e * P, (e + 1) * P));
    }
    spec.frames.forEach(function (f) {
      var idx = new Uint16Array(bytes(f.e)), q = new Int16Array(bytes(f.q));
      f.e = Array.prototype.slice.call(idx);
      f.s = Array.prototype.map.call(q, function (v) { return v === -32768 ? NaN : v / 32767 * f.m; });
    });
  }

  function pct(v) { return finite(v) ? Math.round(100 * v) + "%" : "–"; }

  window.circuitdynExplorer = function (gd) {
    if (!gd || gd._cdExplorer || !window.Plotly) return;
    var meta = gd.layout && gd.layout.meta;
    var spec = meta && meta.circuitdyn;
    if (!spec || spec.widget !== "circuit_explorer") return;
    gd._cdExplorer = true;
    if (typeof spec.px === "string") decode(spec);
    var S = spec.slots, B = spec.bins;
    var state = { i: spec.start, t: spec.theta, sel: null };

    var bar = document.createElement("div");
    bar.className = "cd-explorer";
    bar.style.cssText = "font:13px system-ui,sans-serif;margin:4px 0 2px;display:flex;" +
      "flex-wrap:wrap;gap:6px 18px;align-items:center";
    var n = spec.steps.length;
    bar.innerHTML =
      '<label style="white-space:nowrap">step <input class="cd-step" type="range" min="0" max="' + (n - 1) +
      '" step="1" style="width:260px;vertical-align:middle"></label>' +
      '<span class="cd-step-text" style="min-width:18em"></span>' +
      '<label style="white-space:nowrap">hide edges weaker than <input class="cd-theta" type="range" min="0" max="' +
      (spec.thresholds.length - 1) + '" step="1" style="width:120px;vertical-align:middle">' +
      '</label><span class="cd-theta-text" style="white-space:nowrap"></span>' +
      '<span class="cd-keys" style="display:flex;gap:4px;flex-wrap:wrap"></span>' +
      '<span class="cd-hint" style="color:#666">click a node to highlight its edges; ' +
      'click it again to clear</span>';
    gd.parentNode.insertBefore(bar, gd);
    var stepInput = bar.querySelector(".cd-step");
    var thetaInput = bar.querySelector(".cd-theta");
    var keys = bar.querySelector(".cd-keys");
    spec.keys.forEach(function (k) {
      var b = document.createElement("button");
      b.type = "button";
      b.textContent = "t=" + k.step + ": " + k.label;
      b.style.cssText = "font:12px system-ui,sans-serif;padding:1px 6px;cursor:pointer";
      b.addEventListener("click", function () {
        state.i = Math.max(0, spec.steps.indexOf(k.step));
        render();
      });
      keys.appendChild(b);
    });
    stepInput.addEventListener("input", function () { state.i = +stepInput.value; render(); });
    thetaInput.addEventListener("input", function () { state.t = +thetaInput.value; render(); });
    // A click selects the node under the pointer: the clicked point when it is a node, else
    // the nearest node within 18 px (edge hover points may lie over a node).
    gd.on("plotly_click", function (ev) {
      var p = ev && ev.points && ev.points[0];
      var index = p && p.curveNumber === S.nodes ? p.pointNumber : nearestNode(ev && ev.event);
      if (index < 0) return;
      var name = spec.nodes[index];
      state.sel = state.sel === name ? null : name;
      render();
    });

    function nearestNode(event) {
      var full = gd._fullLayout;
      if (!event || !full || !full.xaxis || !full.yaxis) return -1;
      var box = gd.getBoundingClientRect();
      var px = event.clientX - box.left - full.xaxis._offset;
      var py = event.clientY - box.top - full.yaxis._offset;
      var best = -1, bestDistance = 18;
      for (var i = 0; i < spec.nx.length; i++) {
        var dx = full.xaxis.l2p(spec.nx[i]) - px, dy = full.yaxis.l2p(spec.ny[i]) - py;
        var d = Math.sqrt(dx * dx + dy * dy);
        if (d < bestDistance) { best = i; bestDistance = d; }
      }
      return best;
    }

    function render() {
      var f = spec.frames[state.i];
      var theta = spec.thresholds[state.t];
      var top = 0;
      f.s.forEach(function (v) { if (finite(v)) top = Math.max(top, Math.abs(v)); });
      var order = f.s.map(function (v, j) { return j; }).sort(function (a, b) {
        var va = finite(f.s[a]) ? Math.abs(f.s[a]) : -1, vb = finite(f.s[b]) ? Math.abs(f.s[b]) : -1;
        return vb - va || a - b;
      });
      var rank = []; order.forEach(function (j, r) { rank[j] = r + 1; });
      var lines = []; for (var k = 0; k < 2 * B; k++) lines.push({ x: [], y: [] });
      var faded = { x: [], y: [] }, unscored = { x: [], y: [] };
      var hover = { x: [], y: [], c: [] }, used = {}, shown = 0;
      var selIndex = state.sel === null ? -1 : spec.nodes.indexOf(state.sel);
      var mid = Math.floor(spec.px.length ? spec.px[0].length / 2 : 0);
      f.e.forEach(function (e, j) {
        var s = f.s[j], ok = finite(s);
        if (ok && top > 0 && Math.abs(s) < theta * top) return;
        shown += 1;
        var touches = selIndex < 0 || spec.src[e] === selIndex || spec.dst[e] === selIndex;
        var target;
        if (!touches) target = faded;
        else if (!ok) target = unscored;
        else {
          var b = top > 0 ? Math.min(Math.floor(Math.abs(s) / top * B), B - 1) : 0;
          target = lines[(s > 0 ? B : 0) + b];
        }
        Array.prototype.push.apply(target.x, spec.px[e]); target.x.push(null);
        Array.prototype.push.apply(target.y, spec.py[e]); target.y.push(null);
        if (touches) {
          hover.x.push(spec.px[e][mid]); hover.y.push(spec.py[e][mid]);
          hover.c.push([spec.edges[e], s, finite(f.T) && finite(s) ? s / f.T : null, rank[j]]);
          if (spec.port[e] >= 0) used[spec.port[e]] = true;
        }
      });
      var inside = {}; f.n.forEach(function (i) { inside[i] = true; });
      var data = gd.data.map(function (t) { return Object.assign({}, t); });
      S.lines.forEach(function (slot, k) { data[slot].x = lines[k].x; data[slot].y = lines[k].y; });
      data[S.faded].x = faded.x; data[S.faded].y = faded.y;
      data[S.unscored].x = unscored.x; data[S.unscored].y = unscored.y;
      data[S.hover].x = hover.x; data[S.hover].y = hover.y; data[S.hover].customdata = hover.c;
      var ports = data[S.ports];
      ports.marker = Object.assign({}, ports.marker, {
        color: spec.portNode.map(function (_, i) { return used[i] ? "#333333" : "#ffffff"; }),
        line: { width: 1, color: spec.portNode.map(function (node) { return inside[node] ? "#777" : "#ddd"; }) }
      });
      var inputs = ["q", "k", "v"];
      ports.text = spec.portNode.map(function (node, i) { return inside[node] ? inputs[i % 3] : ""; });
      var nodes = data[S.nodes];
      var custom = (nodes.customdata || []).map(function (row, i) {
        return [row[0], row[1], !!inside[i]];
      });
      nodes.customdata = custom;
      nodes.marker = Object.assign({}, nodes.marker, {
        color: spec.nodes.map(function (_, i) {
          return inside[i] ? spec.kindColours[spec.kinds[i]] || "#888" : spec.outColour;
        }),
        size: spec.nodes.map(function (_, i) { return inside[i] ? 20 : 12; }),
        line: {
          color: spec.nodes.map(function (_, i) { return inside[i] ? "#222222" : "#c8c8c8"; }),
          width: spec.nodes.map(function (_, i) { return i === selIndex ? 4 : inside[i] ? 1.2 : 1; })
        }
      });
      nodes.textfont = Object.assign({}, nodes.textfont, {
        color: spec.nodes.map(function (_, i) { return inside[i] ? "#111111" : "#aaaaaa"; })
      });
      var what = f.e.length + " edges, " + f.n.length + " nodes";
      if (shown < f.e.length) what += "; " + shown + " drawn";
      var layout = Object.assign({}, gd.layout, {
        title: Object.assign({}, gd.layout.title, {
          text: spec.title + ": step " + f.step + " (" + what + ")"
        })
      });
      stepInput.value = state.i;
      thetaInput.value = state.t;
      bar.querySelector(".cd-step-text").textContent =
        "t = " + f.step + (f.t ? " · " + f.t : "");
      bar.querySelector(".cd-theta-text").textContent =
        pct(theta) + " of the step's strongest (" + shown + " of " + f.e.length + " shown)";
      window.Plotly.react(gd, data, layout);
    }
    render();
  };
})();
