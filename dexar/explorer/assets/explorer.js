/* dexar explorer: one explained image, its answer word by word, one map per word, several methods.
 * Reads the JSON payload in #dx-data (written by dexar/explorer/page.py), builds the page, and draws
 * maps on canvases: value v (0..255) -> colour LUT[v], alpha ALPHA[v] (transparent where low).
 * No network access: images and maps are data URIs. Exposes window.dexarExplorer for tests. */
(function () {
  "use strict";

  const ALPHA_LOW = 0.12;   // map values below this are fully transparent
  const ALPHA_HIGH = 0.6;   // ... and fully opaque (times the opacity slider) from this one up
  const CANVAS_LONG_SIDE = 256;
  const PIXELATED_UP_TO = 128;  // images this small are drawn with crisp pixels, not blurred

  const data = JSON.parse(document.getElementById("dx-data").textContent);
  const app = document.getElementById("dx-app");
  const LUT = parseLut(data.colormap);
  const ALPHA = new Uint8ClampedArray(256);
  for (let v = 0; v < 256; v++) {
    const t = Math.min(1, Math.max(0, (v / 255 - ALPHA_LOW) / (ALPHA_HIGH - ALPHA_LOW)));
    ALPHA[v] = Math.round(255 * t * t * (3 - 2 * t));  // smoothstep
  }

  const methods = data.methods;
  const words = methods[0].words;  // same texts in every method (checked by the writer)
  const state = {
    method: 0,            // active method (tints the words; the one shown when not side by side)
    side: false,          // side-by-side mode
    pieces: false,        // word or piece granularity
    selected: null,       // {w, p} pinned unit (p = null for a word) or null = sequence map
    hover: null,          // unit under the mouse, shown while hovering
    opacity: 0.8,
  };
  const decoded = new Map();  // map index -> HTMLImageElement (decoded)
  const els = {};

  function parseLut(hex) {
    const lut = new Uint8ClampedArray(768);
    for (let i = 0; i < 768; i++) lut[i] = parseInt(hex.substr(2 * i, 2), 16);
    return lut;
  }

  const h = dxH;
  const fmt = (x) => dxFmt(x, 0.01, 1000);

  // ---------- units: the things one can show (sequence, a word, a piece) ----------

  function units() {
    const out = [null];  // null = the sequence map
    words.forEach((word, w) => {
      if (state.pieces && word.pieces.length > 1) word.pieces.forEach((_, p) => out.push({ w, p }));
      else out.push({ w, p: null });
    });
    return out;
  }

  function sameUnit(a, b) {
    if (a === null || b === null) return a === b;
    return a.w === b.w && a.p === b.p;
  }

  function unitKey(u) { return u === null ? "sequence" : (u.p === null ? `w${u.w}` : `w${u.w}p${u.p}`); }

  function unitOf(m, u) {
    const method = methods[m];
    if (u === null) return { map: method.sequence, weight: null, empty: method.sequence_empty, text: null };
    const word = method.words[u.w];
    if (u.p === null) return { map: word.map, weight: word.weight, empty: word.empty, text: word.text };
    const piece = word.pieces[u.p];
    return { map: piece.map, weight: piece.weight, empty: piece.empty, text: piece.text };
  }

  function shown() { return state.hover !== null ? state.hover : state.selected; }

  // ---------- drawing ----------

  function decodeAll() {
    const jobs = data.maps.map((uri, i) => {
      const img = new Image();
      img.src = uri;
      decoded.set(i, img);
      return img.decode();
    });
    return Promise.all(jobs);
  }

  const scratch = document.createElement("canvas");
  function drawMap(canvas, mapIndex) {
    const img = decoded.get(mapIndex);
    const w = canvas.width, hgt = canvas.height;
    scratch.width = w; scratch.height = hgt;
    const sctx = scratch.getContext("2d", { willReadFrequently: true });
    sctx.imageSmoothingEnabled = true;
    sctx.imageSmoothingQuality = "medium";
    sctx.clearRect(0, 0, w, hgt);
    sctx.drawImage(img, 0, 0, w, hgt);
    const src = sctx.getImageData(0, 0, w, hgt).data;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const out = ctx.createImageData(w, hgt);
    const px = out.data;
    for (let i = 0; i < px.length; i += 4) {
      const v = src[i];
      px[i] = LUT[3 * v]; px[i + 1] = LUT[3 * v + 1]; px[i + 2] = LUT[3 * v + 2]; px[i + 3] = ALPHA[v];
    }
    ctx.putImageData(out, 0, 0);
    canvas.dataset.map = String(mapIndex);
  }

  function colourBar() {
    const canvas = h("canvas", { class: "dx-cbar-canvas", width: 256, height: 1, "aria-hidden": "true" });
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(256, 1);
    for (let v = 0; v < 256; v++) {
      img.data.set([LUT[3 * v], LUT[3 * v + 1], LUT[3 * v + 2], ALPHA[v]], 4 * v);
    }
    ctx.putImageData(img, 0, 0);
    return h("div", { class: "dx-cbar", role: "img",
      "aria-label": `Colour bar: map value from 0 (transparent) to 1; transparent below ${ALPHA_LOW}` },
      h("span", { class: "dx-cbar-end", text: "0" }),
      h("div", { class: "dx-cbar-track" }, canvas),
      h("span", { class: "dx-cbar-end", text: "1" }),
      h("span", { class: "dx-cbar-label", text: "map value (low → high)" }));
  }

  // ---------- building the page ----------

  function build() {
    const title = data.title;
    const head = h("header", { class: "dx-head" },
      h("div", { class: "dx-brand" }, h("span", { class: "dx-logo", "aria-hidden": "true" }), "dexar explorer"),
      h("h1", { class: "dx-title", text: title }),
      data.prompt ? h("p", { class: "dx-prompt" }, h("span", { class: "dx-k", text: "Prompt" }), data.prompt) : null);

    const tools = h("div", { class: "dx-toolbar", role: "toolbar", "aria-label": "View options" });
    if (methods.length > 1) {
      els.tabs = h("div", { class: "dx-tabs", role: "tablist", "aria-label": "Method" });
      methods.forEach((m, i) => {
        els.tabs.append(h("button", { class: "dx-tab", role: "tab", type: "button", "data-method": m.name,
          id: `dx-tab-${i}`, "aria-controls": "dx-panels", onclick: () => setMethod(i), onkeydown: tabKeys }, m.label));
      });
      els.side = h("button", { class: "dx-switch", type: "button", "aria-pressed": "false", id: "dx-side",
        title: "Show every method side by side (s)", onclick: () => setSide(!state.side) },
        h("span", { class: "dx-switch-knob", "aria-hidden": "true" }), "Side by side");
      tools.append(els.tabs, els.side);
    }
    if (words.some((w) => w.pieces.length > 1)) {
      els.pieces = h("button", { class: "dx-switch", type: "button", "aria-pressed": "false", id: "dx-pieces",
        title: "Show the tokens (pieces) of each word (p)", onclick: () => setPieces(!state.pieces) },
        h("span", { class: "dx-switch-knob", "aria-hidden": "true" }), "Pieces");
      tools.append(els.pieces);
    }
    els.opacity = h("input", { type: "range", min: "0", max: "100", value: String(state.opacity * 100),
      id: "dx-opacity", "aria-label": "Map opacity", oninput: (e) => setOpacity(e.target.value / 100) });
    els.opacityOut = h("output", { for: "dx-opacity", class: "dx-out", text: `${Math.round(state.opacity * 100)}%` });
    tools.append(h("label", { class: "dx-slider", for: "dx-opacity" }, h("span", { text: "Opacity" }),
      els.opacity, els.opacityOut));

    els.words = h("div", { class: "dx-words", role: "listbox", "aria-label": "Answer words: choose one to see its map",
      "aria-orientation": "horizontal", onkeydown: wordKeys, onmouseleave: () => setHover(null) });
    const answer = h("section", { class: "dx-card dx-answer", "aria-labelledby": "dx-answer-h" },
      h("div", { class: "dx-card-head" },
        h("h2", { id: "dx-answer-h", class: "dx-h2", text: "Answer" }),
        h("p", { class: "dx-legend" },
          h("span", { class: "dx-swatch dx-swatch-w", "aria-hidden": "true" }), "tint = word weight λ (of the largest)",
          h("span", { class: "dx-swatch dx-swatch-f", "aria-hidden": "true" }), "filler word",
          h("span", { class: "dx-keys", text: "hover or ← → to move · Esc: whole answer" }))),
      els.words);

    els.panels = h("div", { class: "dx-panels", id: "dx-panels" });
    els.caption = h("p", { class: "dx-status", "aria-live": "polite" });
    const [x0, y0, x1, y1] = data.grid_box;
    const cropNote = x0 > 0 || y0 > 0 || x1 < 1 || y1 < 1
      ? h("p", { class: "dx-crop-note" }, h("span", { class: "dx-swatch dx-swatch-crop", "aria-hidden": "true" }),
        "Darkened margins were cropped away by the model's processor: the model never saw them.")
      : null;
    const view = h("section", { class: "dx-card dx-view", "aria-label": "Maps over the image" },
      els.panels, h("div", { class: "dx-under" }, h("div", {}, els.caption, cropNote), colourBar()));

    const opts = h("details", { class: "dx-card dx-options" }, h("summary", { text: "Method options" }),
      h("div", { class: "dx-options-grid" }, methods.map((m) => h("div", {},
        h("h3", { class: "dx-h3", text: m.label }),
        h("dl", {}, Object.entries(m.options).flatMap(([k, v]) =>
          [h("dt", { text: k }), h("dd", { text: typeof v === "string" ? v : JSON.stringify(v) })]))))));

    const foot = h("footer", { class: "dx-foot" },
      "Written by dexar: a self-contained page that works offline. Each map is shown on its own [0, 1] scale; ",
      "the sequence map combines the answer's token maps (weighted by λ for DEX-AR).");
    app.replaceChildren(head, tools, answer, view, opts, foot);
    app.setAttribute("aria-busy", "false");
  }

  function buildWords() {
    const m = methods[state.method];
    const all = units();
    const maxWeight = Math.max(1e-12, ...m.words.map((w) => Math.max(0, w.weight)),
      ...(state.pieces ? m.words.flatMap((w) => w.pieces.map((p) => Math.max(0, p.weight))) : []));
    const current = state.selected;
    const focusWasInside = els.words.contains(document.activeElement);
    els.words.replaceChildren();
    const option = (u, label, attrs, cls) => h("span", Object.assign({
      class: cls, role: "option", id: `dx-u-${unitKey(u)}`, "data-unit": unitKey(u),
      "aria-selected": String(sameUnit(u, current)), tabindex: sameUnit(u, current) ? "0" : "-1",
      onclick: () => select(u, true), onmouseenter: () => setHover(u), onfocus: () => select(u, false),
    }, attrs), label);
    els.words.append(option(null, "Σ whole answer", { "aria-label": "Whole answer: sequence map" }, "dx-word dx-seq"));
    m.words.forEach((word, w) => {
      const fill = word.filler === true ? " dx-filler" : "";
      const tint = (x) => `--w:${(Math.max(0, x) / maxWeight).toFixed(3)}`;
      const kind = word.filler === true ? ", filler" : word.filler === false ? ", content" : "";
      const empty = word.empty ? ", no visual evidence" : "";
      if (state.pieces && word.pieces.length > 1) {
        const group = h("span", { class: "dx-group" + fill, role: "group", "aria-label": `word ${word.text}` });
        word.pieces.forEach((piece, p) => group.append(option({ w, p }, piece.text, {
          style: tint(piece.weight), title: `piece “${piece.text}” · λ = ${fmt(piece.weight)}`,
          "aria-label": `piece ${piece.text} of ${word.text}, weight ${fmt(piece.weight)}${kind}`,
        }, "dx-word dx-piece")));
        els.words.append(group);
      } else {
        els.words.append(option({ w, p: null }, word.text, {
          style: tint(word.weight), title: `“${word.text}” · λ = ${fmt(word.weight)}${kind}${empty}`,
          "aria-label": `${word.text}, weight ${fmt(word.weight)}${kind}${empty}`,
        }, "dx-word" + fill + (word.empty ? " dx-empty" : "")));
      }
    });
    if (!all.some((u) => sameUnit(u, current))) state.selected = null;
    if (focusWasInside) focusUnit(state.selected);
  }

  function buildPanels() {
    const list = state.side ? methods.map((_, i) => i) : [state.method];
    els.panels.classList.toggle("dx-side", state.side);
    els.panels.replaceChildren();
    els.figures = list.map((m) => {
      const img = h("img", { class: "dx-image", src: data.image.src, alt: `The explained image${data.sample_id ? " " + data.sample_id : ""}`,
        width: data.image.width, height: data.image.height, draggable: "false" });
      const [x0, y0, x1, y1] = data.grid_box;
      const aspect = ((x1 - x0) * data.image.width) / ((y1 - y0) * data.image.height);
      const canvas = h("canvas", { class: "dx-overlay", "aria-hidden": "true",
        width: aspect >= 1 ? CANVAS_LONG_SIDE : Math.round(CANVAS_LONG_SIDE * aspect),
        height: aspect >= 1 ? Math.round(CANVAS_LONG_SIDE / aspect) : CANVAS_LONG_SIDE,
        style: `left:${100 * x0}%;top:${100 * y0}%;width:${100 * (x1 - x0)}%;height:${100 * (y1 - y0)}%` });
      const cropped = x0 > 0 || y0 > 0 || x1 < 1 || y1 < 1;
      const veil = cropped ? h("div", { class: "dx-veil", title: "Outside the model's view (cropped away)",
        style: `left:${100 * x0}%;top:${100 * y0}%;width:${100 * (x1 - x0)}%;height:${100 * (y1 - y0)}%` }) : null;
      const stage = h("div", { class: "dx-stage", style: `aspect-ratio:${data.image.width}/${data.image.height}` },
        img, canvas, veil);
      const cap = h("figcaption", { class: "dx-figcap" });
      const fig = h("figure", { class: "dx-panel", "data-method": methods[m].name,
        onclick: () => { if (state.side) setMethod(m); } }, stage, cap);
      if (Math.max(data.image.width, data.image.height) <= PIXELATED_UP_TO) img.classList.add("dx-pixelated");
      els.panels.append(fig);
      return { m, fig, canvas, cap, img };
    });
  }

  // ---------- updates ----------

  function render() {
    const u = shown();
    const w = u === null ? null : words[u.w];
    for (const f of els.figures) {
      const info = unitOf(f.m, u);
      if (f.canvas.dataset.map !== String(info.map)) drawMap(f.canvas, info.map);
      f.fig.dataset.unit = unitKey(u);
      f.fig.classList.toggle("dx-active", f.m === state.method && state.side);
      const label = methods[f.m].label;
      const what = u === null ? "sequence map" : `“${info.text}” · λ = ${fmt(info.weight)}`;
      f.cap.replaceChildren(h("span", { class: "dx-mname", text: label }), h("span", { class: "dx-what", text: what }));
      if (info.empty) f.cap.append(h("span", { class: "dx-badge", text: "no visual evidence" }));
    }
    let status;
    if (u === null) status = "Showing the sequence map of the whole answer. Hover a word or use ← → to see its map.";
    else {
      const kind = w.filler === true ? " (filler word)" : w.filler === false ? " (content word)" : "";
      status = u.p === null ? `Showing word ${u.w + 1} of ${words.length}: “${w.text}”${kind}.`
        : `Showing piece ${u.p + 1} of ${w.pieces.length} of “${w.text}”: “${w.pieces[u.p].text}”${kind}.`;
    }
    els.caption.textContent = status;
    els.words.querySelectorAll("[role=option]").forEach((el) => {
      el.classList.toggle("dx-shown", el.dataset.unit === unitKey(u));
    });
  }

  function focusUnit(u) {
    const el = document.getElementById(`dx-u-${unitKey(u)}`);
    if (el) el.focus();
  }

  function select(u, focus) {
    state.selected = u;
    els.words.querySelectorAll("[role=option]").forEach((el) => {
      const on = el.dataset.unit === unitKey(u);
      el.setAttribute("aria-selected", String(on));
      el.tabIndex = on ? 0 : -1;
    });
    if (focus) focusUnit(u);
    render();
  }

  function setHover(u) {
    if (sameUnit(u, state.hover)) return;
    state.hover = u;
    render();
  }

  function setMethod(i) {
    state.method = i;
    if (els.tabs) els.tabs.querySelectorAll("[role=tab]").forEach((t, j) => {
      t.setAttribute("aria-selected", String(i === j));
      t.tabIndex = i === j ? 0 : -1;
    });
    if (!state.side || !els.figures) buildPanels();
    buildWords();
    render();
  }

  function setSide(on) {
    state.side = on && methods.length > 1;
    if (els.side) els.side.setAttribute("aria-pressed", String(state.side));
    buildPanels();
    render();
  }

  function setPieces(on) {
    state.pieces = on;
    if (els.pieces) els.pieces.setAttribute("aria-pressed", String(on));
    const sel = state.selected;
    if (!on && sel && sel.p !== null) state.selected = { w: sel.w, p: null };
    if (on && sel && sel.p === null && words[sel.w].pieces.length > 1) state.selected = { w: sel.w, p: 0 };
    state.hover = null;
    buildWords();
    render();
  }

  function setOpacity(x) {
    state.opacity = x;
    app.style.setProperty("--dx-opacity", String(x));
    if (els.opacityOut) els.opacityOut.textContent = `${Math.round(x * 100)}%`;
    if (els.opacity && els.opacity.value !== String(Math.round(x * 100))) els.opacity.value = String(Math.round(x * 100));
  }

  // ---------- keyboard ----------

  function wordKeys(e) {
    const all = units();
    let i = all.findIndex((u) => sameUnit(u, state.selected));
    if (e.key === "ArrowRight" || e.key === "ArrowDown") i = Math.min(all.length - 1, i + 1);
    else if (e.key === "ArrowLeft" || e.key === "ArrowUp") i = Math.max(0, i - 1);
    else if (e.key === "Home" || e.key === "Escape") i = 0;
    else if (e.key === "End") i = all.length - 1;
    else return;
    e.preventDefault();
    state.hover = null;
    select(all[i], true);
  }

  function tabKeys(e) {
    let i = state.method;
    if (e.key === "ArrowRight") i = (i + 1) % methods.length;
    else if (e.key === "ArrowLeft") i = (i - 1 + methods.length) % methods.length;
    else return;
    e.preventDefault();
    setMethod(i);
    els.tabs.querySelectorAll("[role=tab]")[i].focus();
  }

  function globalKeys(e) {
    if (e.target instanceof HTMLInputElement || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "s" && methods.length > 1) setSide(!state.side);
    else if (e.key === "p" && els.pieces) setPieces(!state.pieces);
    else if (/^[1-9]$/.test(e.key) && Number(e.key) <= methods.length) setMethod(Number(e.key) - 1);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const byName = methods.findIndex((m) => m.name === params.get("method"));
    return { side: params.has("side") || Boolean(data.side_by_side), pieces: params.has("pieces"), method: Math.max(0, byName) };
  }

  // ---------- start ----------

  function start() {
    if (window.parent !== window) app.classList.add("dx-embedded");
    build();
    const init = readHash();
    state.method = init.method;
    state.side = init.side && methods.length > 1;
    setOpacity(state.opacity);
    setMethod(state.method);
    setSide(state.side);
    if (init.pieces && els.pieces) setPieces(true);
    document.addEventListener("keydown", globalKeys);
    document.documentElement.dataset.ready = "1";
    window.dexarReadyAt = performance.now();
    if (window.parent !== window) {  // inside the run explorer: tell it we are ready and how tall we are
      const height = () => app.offsetTop + app.offsetHeight;  // not scrollHeight: it never drops below the frame
      window.parent.postMessage({ dexar: "ready", sample: data.sample_id, height: height() }, "*");
      new ResizeObserver(() => window.parent.postMessage({ dexar: "height", height: height() }, "*")).observe(app);
    }
  }

  window.dexarExplorer = {
    state,
    data,
    alpha: { low: ALPHA_LOW, high: ALPHA_HIGH },
    shownMap: () => els.figures.map((f) => ({ method: methods[f.m].name, unit: unitKey(shown()),
      map: Number(f.canvas.dataset.map) })),
    select: (w, p) => select(w === null ? null : { w, p: p === undefined ? null : p }, true),
    setMethod, setSide, setPieces, setOpacity,
  };

  decodeAll().then(start).catch((err) => {
    console.error("dexar explorer: could not start:", err);
    app.setAttribute("aria-busy", "false");
    app.replaceChildren(h("p", { class: "dx-note", text: `The explorer could not start: ${err}` }));
  });
})();
