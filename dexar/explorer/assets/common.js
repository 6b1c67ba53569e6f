/* dexar explorer: helpers shared by explorer.js and run.js (inlined before them). */
"use strict";

/** An element: dx.h("button", {class, text, onclick, "aria-x": ...}, ...children); null/false attrs are skipped. */
function dxH(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

/** A number for people: "–" when missing, 3 significant digits, exponent outside [small, large). */
function dxFmt(x, small, large) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < small || a >= large)) return x.toExponential(2);
  return x.toPrecision(3);
}
