/* dexar run explorer: a sortable sample list; the chosen sample's page (samples/<id>.html) in a frame.
 * Reads #dx-run-data (written by dexar/explorer/run.py). Exposes window.dexarRun for tests. */
(function () {
  "use strict";

  const run = JSON.parse(document.getElementById("dx-run-data").textContent);
  const root = document.getElementById("dx-run");
  const frame = document.getElementById("dx-frame");
  const samples = run.samples.map((s, i) => Object.assign({ index: i }, s));
  const metricByName = new Map(run.metrics.map((m) => [m.name, m]));
  const state = {
    metric: run.metrics.length ? run.metrics[0].name : null,
    sort: { key: "index", dir: 1 },  // key: "index" | "id" | method name (value of state.metric)
    selected: 0,                     // index into samples
    order: samples.map((_, i) => i),
  };
  const timing = { indexReadyAt: null, firstSampleReadyAt: null, sampleReadyAt: null, sampleReady: null };
  let tbody = null;

  const h = dxH;
  const fmt = (x) => dxFmt(x, 0.001, 10000);

  function value(sample, method) {
    const v = ((sample.metrics || {})[method] || {})[state.metric];
    return v === null || v === undefined || !isFinite(v) ? null : v;
  }

  // ---------- sorting ----------

  function sortRows() {
    const { key, dir } = state.sort;
    const cmp = (a, b) => {
      if (key === "index") return dir * (a.index - b.index);
      if (key === "id") return dir * a.id.localeCompare(b.id, undefined, { numeric: true });
      const va = value(a, key), vb = value(b, key);
      if (va === null && vb === null) return a.index - b.index;
      if (va === null) return 1;   // missing values last, whatever the direction
      if (vb === null) return -1;
      return dir * (va - vb) || a.index - b.index;
    };
    state.order = samples.slice().sort(cmp).map((s) => s.index);
  }

  function worstFirst() {
    const spec = metricByName.get(state.metric);
    const current = run.methods.find((m) => m.name === state.sort.key);
    const method = (current || run.methods[0] || {}).name;
    if (!spec || spec.higher_is_better === null || !method) return;
    setSort(method, spec.higher_is_better ? 1 : -1);
    choose(state.order[0], true);  // open the worst sample
  }

  function setSort(key, dir) {
    state.sort = { key, dir };
    sortRows();
    buildTable();
  }

  // ---------- building ----------

  function buildTools() {
    const tools = document.getElementById("dx-list-tools");
    if (!run.metrics.length) return;
    const select = h("select", { id: "dx-metric", "aria-label": "Metric shown per method",
      onchange: (e) => { state.metric = e.target.value; sortRows(); buildTable(); updateWorst(); } },
      run.metrics.map((m) => h("option", { value: m.name, text: m.label + (m.higher_is_better === null ? "" : m.higher_is_better ? " ↑" : " ↓") })));
    const worst = h("button", { type: "button", id: "dx-worst", class: "dx-button", onclick: worstFirst });
    tools.append(h("label", { class: "dx-select" }, h("span", { text: "Metric" }), select), worst);
    updateWorst();
  }

  function updateWorst() {
    const button = document.getElementById("dx-worst");
    if (!button) return;
    const spec = metricByName.get(state.metric);
    const known = spec && spec.higher_is_better !== null;
    button.disabled = !known;
    button.textContent = known ? `Worst ${spec.label} first` : "Worst first";
    button.title = known ? `Sort the chosen method's column, ${spec.higher_is_better ? "lowest" : "highest"} ${spec.label} first`
      : "Direction unknown";
  }

  function header(key, label, numeric) {
    const active = state.sort.key === key;
    const sortAttr = active ? (state.sort.dir > 0 ? "ascending" : "descending") : "none";
    const next = active ? -state.sort.dir : 1;
    return h("th", { scope: "col", "aria-sort": sortAttr, class: numeric ? "dx-num" : null },
      h("button", { type: "button", class: "dx-sort", "data-key": key, onclick: () => setSort(key, next) },
        label, h("span", { class: "dx-sort-mark", "aria-hidden": "true", text: active ? (state.sort.dir > 0 ? "▲" : "▼") : "" })));
  }

  function buildTable() {
    const wrap = document.getElementById("dx-table-wrap");
    const methodCols = state.metric ? run.methods : [];
    const ranges = new Map(methodCols.map((m) => {
      const vals = samples.map((s) => value(s, m.name)).filter((v) => v !== null);
      return [m.name, vals.length ? [Math.min(...vals), Math.max(...vals)] : [0, 1]];
    }));
    const thead = h("thead", {}, h("tr", {},
      header("index", "#", true), header("id", "Sample · answer", false),
      methodCols.map((m) => header(m.name, m.label, true))));
    tbody = h("tbody", { onkeydown: rowKeys });
    state.order.forEach((i) => {
      const s = samples[i];
      const on = i === state.selected;
      const cells = methodCols.map((m) => {
        const v = value(s, m.name);
        const [lo, hi] = ranges.get(m.name);
        const frac = v === null ? 0 : hi > lo ? (v - lo) / (hi - lo) : 1;
        return h("td", { class: "dx-num", style: `--f:${frac.toFixed(3)}` }, h("span", { class: "dx-val", text: fmt(v) }));
      });
      tbody.append(h("tr", { "data-index": String(i), "aria-current": on ? "true" : null, tabindex: on ? "0" : "-1",
        onclick: () => choose(i, true) },
        h("td", { class: "dx-num dx-idx", text: String(i + 1) }),
        h("td", { class: "dx-sample", title: s.answer }, h("img", { class: "dx-thumb", src: s.thumb, alt: "" }),
          h("span", { class: "dx-sample-text" }, h("span", { class: "dx-id", text: s.id }),
            h("span", { class: "dx-ans", text: s.answer }))),
        cells));
    });
    const table = h("table", { class: "dx-table",
      "aria-label": "Samples: click a row or move with the up and down arrow keys to see its explanation" },
      thead, tbody);
    wrap.replaceChildren(table);
  }

  // ---------- choosing a sample ----------

  function choose(i, focus) {
    state.selected = i;
    tbody.querySelectorAll("tr").forEach((tr) => {
      const on = Number(tr.dataset.index) === i;
      if (on) tr.setAttribute("aria-current", "true");
      else tr.removeAttribute("aria-current");
      tr.tabIndex = on ? 0 : -1;
      if (on && focus) { tr.focus(); tr.scrollIntoView({ block: "nearest" }); }
    });
    const s = samples[i];
    timing.sampleReady = null;
    frame.title = `Explanation of sample ${s.id}`;
    frame.src = `${s.href}#side`;
  }

  function rowKeys(e) {
    const pos = state.order.indexOf(state.selected);
    let next = pos;
    if (e.key === "ArrowDown") next = Math.min(state.order.length - 1, pos + 1);
    else if (e.key === "ArrowUp") next = Math.max(0, pos - 1);
    else if (e.key === "Home") next = 0;
    else if (e.key === "End") next = state.order.length - 1;
    else return;
    e.preventDefault();
    choose(state.order[next], true);
  }

  window.addEventListener("message", (e) => {
    const msg = e.data || {};
    if (msg.dexar === "ready" || msg.dexar === "height") {
      if (msg.height) frame.style.height = `${Math.ceil(msg.height) + 4}px`;
    }
    if (msg.dexar === "ready") {
      const now = performance.now();
      if (timing.firstSampleReadyAt === null) timing.firstSampleReadyAt = now;
      timing.sampleReadyAt = now;
      timing.sampleReady = msg.sample;
    }
  });

  buildTools();
  sortRows();
  buildTable();
  choose(0, false);
  root.setAttribute("aria-busy", "false");
  timing.indexReadyAt = performance.now();
  window.dexarRun = { state, timing, choose, setSort, worstFirst, samples };
})();
