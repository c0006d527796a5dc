// The status page's live part: every 2 s it fetches the page again and swaps in the new
// tables (the server escaped them), then draws the rates of /history as SVG. It only reads.
"use strict";
(function () {
  const EVERY_MS = 2000;
  const WINDOW_MS = 10 * 60 * 1000;
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  const NS = "http://www.w3.org/2000/svg";
  const live = document.getElementById("live");

  function svg(name, attrs) {
    const el = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    return el;
  }

  // One chart: the service's total, and a line per backend.
  function chart(figure, history) {
    const service = figure.dataset.service;
    const metric = figure.dataset.metric;
    const series = new Map();
    for (const sample of history.samples) {
      for (const r of sample.rates) {
        if (r.service !== service) continue;
        const key = r.backend === null ? "total" : r.backend;
        if (!series.has(key)) series.set(key, []);
        series.get(key).push([sample.unix_ms, r[metric]]);
      }
    }
    const W = 480, H = 120, L = 44, B = 16;
    const now = history.samples.length ? history.samples[history.samples.length - 1].unix_ms : Date.now();
    let max = 1;
    for (const points of series.values()) for (const [, v] of points) max = Math.max(max, v);
    const x = (t) => L + ((t - (now - WINDOW_MS)) / WINDOW_MS) * (W - L - 4);
    const y = (v) => 4 + (1 - v / max) * (H - B - 8);
    const root = svg("svg", { width: W, height: H + 14 * (series.size + 1), viewBox: `0 0 ${W} ${H + 14 * (series.size + 1)}`, role: "img" });
    root.appendChild(svg("line", { x1: L, y1: y(0), x2: W - 4, y2: y(0), stroke: "#bbb" }));
    const top = svg("text", { x: 2, y: 12 });
    top.textContent = max >= 100 ? max.toFixed(0) : max.toPrecision(2);
    root.appendChild(top);
    const zero = svg("text", { x: 2, y: y(0) });
    zero.textContent = "0";
    root.appendChild(zero);
    const ago = svg("text", { x: L, y: H });
    ago.textContent = "-10 min";
    root.appendChild(ago);
    if (!series.size) {
      const none = svg("text", { x: L + 10, y: H / 2 });
      none.textContent = "no samples yet (one every " + history.interval_s + " s)";
      root.appendChild(none);
    }
    let i = 0;
    for (const [key, points] of series) {
      const color = key === "total" ? "#222" : COLORS[i++ % COLORS.length];
      root.appendChild(svg("polyline", {
        points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
        fill: "none", stroke: color, "stroke-width": key === "total" ? 2 : 1.3,
      }));
      const n = [...series.keys()].indexOf(key) + 1;
      const label = svg("text", { x: L, y: H + 14 * n });
      label.textContent = key;
      label.setAttribute("style", "fill:" + color);
      root.appendChild(label);
    }
    figure.querySelector("svg")?.remove();
    figure.appendChild(root);
  }

  async function refresh() {
    try {
      const page = await fetch("/", { cache: "no-store" });
      if (!page.ok) throw new Error("GET / answered " + page.status);
      const doc = new DOMParser().parseFromString(await page.text(), "text/html");
      const answer = await fetch("/history", { cache: "no-store" });
      const history = await answer.json();
      // Both answers in hand, the new tables go in and the charts are drawn at once: no
      // moment without charts (a flicker, and what a reader of the page in between saw).
      const fresh = doc.querySelector("main");
      if (fresh) document.querySelector("main").replaceChildren(...fresh.childNodes);
      for (const figure of document.querySelectorAll("figure.chart")) chart(figure, history);
      live.textContent = "live, updated " + new Date().toLocaleTimeString();
      live.className = "";
      document.body.dataset.updated = String(Date.now());
    } catch (e) {
      live.textContent = "not updating: " + e.message;
      live.className = "stale";
    }
  }

  refresh();
  setInterval(refresh, EVERY_MS);
})();
