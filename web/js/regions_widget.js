// Region canvas for the "Regions (boxes + prompts)" node: draw, select, move, resize and delete boxes,
// and give each a prompt, negative prompt and label. The widget's value is one JSON string (box
// coordinates as fractions of the image size), saved in the workflow and sent with API prompts.
import { app } from "../../../scripts/app.js";

const NODE_ID = "MultiConceptRegions";
const WIDGET_TYPE = "MC_REGIONS_EDITOR";
const MAX_BOXES = 16;
const HANDLE = 7; // px, corner handles
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#000075"];

const CSS = `
.mc-regions { display: flex; flex-direction: column; gap: 4px; font: 12px sans-serif; color: var(--input-text, #ddd); }
.mc-regions .mc-bar { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.mc-regions button { font: inherit; padding: 1px 6px; cursor: pointer; }
.mc-regions canvas { width: 100%; background: #444; cursor: crosshair; touch-action: none; border-radius: 3px; }
.mc-regions .mc-edit { display: grid; grid-template-columns: auto 1fr; gap: 3px 6px; align-items: center; }
.mc-regions .mc-edit textarea, .mc-regions .mc-edit input, .mc-regions .mc-json {
  font: inherit; background: var(--comfy-input-bg, #222); color: inherit; border: 1px solid #666; border-radius: 3px; }
.mc-regions .mc-json { min-height: 80px; font-family: monospace; }
.mc-regions .mc-error { color: #f66; }
.mc-regions [hidden] { display: none !important; }
`;

function emptyState() {
  return { version: 1, units: "fraction", boxes: [] };
}

// Parse a value; returns a normalised state or throws with a message (the caller keeps the last good state).
function parseState(text, size) {
  const data = typeof text === "string" ? (text.trim() ? JSON.parse(text) : emptyState()) : text;
  const boxesIn = Array.isArray(data) ? data : data && data.boxes;
  if (!Array.isArray(boxesIn)) throw new Error('needs a "boxes" list');
  if (boxesIn.length > MAX_BOXES) throw new Error(`at most ${MAX_BOXES} boxes`);
  const px = data.units === "px";
  const boxes = boxesIn.map((b, i) => {
    const out = {};
    for (const k of ["x", "y", "w", "h"]) {
      const v = b[k];
      if (typeof v !== "number" || !isFinite(v)) throw new Error(`box ${i + 1}: ${k} must be a finite number`);
      out[k] = px ? v / (k === "x" || k === "w" ? size.w : size.h) : v;
    }
    if (out.w <= 0 || out.h <= 0) throw new Error(`box ${i + 1} has no area`);
    out.prompt = String(b.prompt ?? "");
    out.negative = String(b.negative ?? "");
    out.label = String(b.label ?? "");
    out.color = String(b.color || PALETTE[i % PALETTE.length]);
    return out;
  });
  return { version: 1, units: "fraction", boxes };
}

class RegionEditor {
  constructor(node, inputName) {
    this.node = node;
    this.state = emptyState();
    this.selected = -1;
    this.drag = null;
    this.snap = true;

    this.root = document.createElement("div");
    this.root.className = "mc-regions";
    this.root.innerHTML = `
      <div class="mc-bar">
        <label title="Snap box edges to the 8-pixel latent grid"><input type="checkbox" class="mc-snap" checked> snap 8px</label>
        <button class="mc-delete" title="Delete the selected box (Delete key)">delete box</button>
        <button class="mc-json-toggle" title="Show the boxes as JSON text">JSON</button>
        <span class="mc-count"></span><span class="mc-error"></span>
      </div>
      <canvas class="mc-canvas" tabindex="0"></canvas>
      <div class="mc-edit" hidden>
        <span>label</span><input class="mc-label" placeholder="concept, e.g. cat">
        <span>prompt</span><textarea class="mc-prompt" rows="2" placeholder="a <cat1> <cat2> sitting"></textarea>
        <span>negative</span><input class="mc-negative" placeholder="optional">
      </div>
      <textarea class="mc-json" hidden spellcheck="false"></textarea>`;
    this.canvas = this.root.querySelector("canvas");
    this.ctx = this.canvas.getContext("2d");
    this.editPanel = this.root.querySelector(".mc-edit");
    this.jsonArea = this.root.querySelector(".mc-json");
    this.errorEl = this.root.querySelector(".mc-error");
    this.bindEvents();
  }

  // --- value ------------------------------------------------------------------------------------
  size() {
    const get = (name, dflt) => this.node.widgets?.find((w) => w.name === name)?.value ?? dflt;
    return { w: Math.max(8, Number(get("width", 512))), h: Math.max(8, Number(get("height", 512))) };
  }
  get value() {
    return JSON.stringify(this.state);
  }
  set value(text) {
    try {
      this.state = parseState(text, this.size());
      this.showError("");
    } catch (e) {
      this.showError(`refused: ${e.message}`); // keep the last good boxes
    }
    if (this.selected >= this.state.boxes.length) this.selected = -1;
    this.refresh();
  }
  commit() {
    this.node.setDirtyCanvas?.(true, true);
    this.refresh();
  }
  showError(text) {
    this.errorEl.textContent = text;
  }

  // --- geometry ---------------------------------------------------------------------------------
  toPx(b) {
    const r = this.canvas.getBoundingClientRect();
    return { x: b.x * r.width, y: b.y * r.height, w: b.w * r.width, h: b.h * r.height };
  }
  eventPos(e) {
    const r = this.canvas.getBoundingClientRect();
    return { x: Math.min(Math.max((e.clientX - r.left) / r.width, 0), 1), y: Math.min(Math.max((e.clientY - r.top) / r.height, 0), 1) };
  }
  snapFrac(v, axis) {
    if (!this.snap) return v;
    const n = axis === "x" ? this.size().w : this.size().h;
    return Math.round((v * n) / 8) * 8 / n;
  }
  hit(p) {
    const r = this.canvas.getBoundingClientRect();
    const hx = HANDLE / r.width, hy = HANDLE / r.height;
    if (this.selected >= 0) {
      const b = this.state.boxes[this.selected];
      const corners = { nw: [b.x, b.y], ne: [b.x + b.w, b.y], sw: [b.x, b.y + b.h], se: [b.x + b.w, b.y + b.h] };
      for (const [name, [cx, cy]] of Object.entries(corners)) {
        if (Math.abs(p.x - cx) <= hx && Math.abs(p.y - cy) <= hy) return { index: this.selected, mode: name };
      }
    }
    for (let i = this.state.boxes.length - 1; i >= 0; i--) {
      const b = this.state.boxes[i];
      if (p.x >= b.x && p.x <= b.x + b.w && p.y >= b.y && p.y <= b.y + b.h) return { index: i, mode: "move" };
    }
    return null;
  }

  // --- interaction ------------------------------------------------------------------------------
  bindEvents() {
    const c = this.canvas;
    c.addEventListener("pointerdown", (e) => {
      e.stopPropagation();
      c.focus();
      c.setPointerCapture?.(e.pointerId);
      const p = this.eventPos(e);
      const h = this.hit(p);
      if (h) {
        this.selected = h.index;
        this.drag = { mode: h.mode, start: p, orig: { ...this.state.boxes[h.index] } };
      } else if (this.state.boxes.length < MAX_BOXES) {
        const i = this.state.boxes.length;
        this.state.boxes.push({ x: p.x, y: p.y, w: 0, h: 0, prompt: "", negative: "", label: "", color: PALETTE[i % PALETTE.length] });
        this.selected = i;
        this.drag = { mode: "draw", start: p };
      } else {
        this.showError(`at most ${MAX_BOXES} boxes`);
      }
      this.refresh();
    });
    c.addEventListener("pointermove", (e) => {
      if (!this.drag) return;
      e.stopPropagation();
      const p = this.eventPos(e);
      const b = this.state.boxes[this.selected];
      const d = this.drag;
      if (d.mode === "draw") {
        const x0 = this.snapFrac(Math.min(d.start.x, p.x), "x"), x1 = this.snapFrac(Math.max(d.start.x, p.x), "x");
        const y0 = this.snapFrac(Math.min(d.start.y, p.y), "y"), y1 = this.snapFrac(Math.max(d.start.y, p.y), "y");
        Object.assign(b, { x: x0, y: y0, w: x1 - x0, h: y1 - y0 });
      } else if (d.mode === "move") {
        const o = d.orig;
        const x = Math.min(Math.max(o.x + p.x - d.start.x, 0), 1 - o.w);
        const y = Math.min(Math.max(o.y + p.y - d.start.y, 0), 1 - o.h);
        Object.assign(b, { x: this.snapFrac(x, "x"), y: this.snapFrac(y, "y") });
      } else {
        const o = d.orig;
        let x0 = o.x, y0 = o.y, x1 = o.x + o.w, y1 = o.y + o.h;
        if (d.mode.includes("w")) x0 = this.snapFrac(p.x, "x");
        if (d.mode.includes("e")) x1 = this.snapFrac(p.x, "x");
        if (d.mode.includes("n")) y0 = this.snapFrac(p.y, "y");
        if (d.mode.includes("s")) y1 = this.snapFrac(p.y, "y");
        Object.assign(b, { x: Math.min(x0, x1), y: Math.min(y0, y1), w: Math.abs(x1 - x0), h: Math.abs(y1 - y0) });
      }
      this.refresh();
    });
    const end = (e) => {
      if (!this.drag) return;
      e.stopPropagation();
      const b = this.state.boxes[this.selected];
      const size = this.size();
      if (this.drag.mode === "draw" && (b.w * size.w < 4 || b.h * size.h < 4)) {
        this.state.boxes.splice(this.selected, 1); // a click, not a box
        this.selected = -1;
      }
      this.drag = null;
      this.commit();
    };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("keydown", (e) => {
      if ((e.key === "Delete" || e.key === "Backspace") && this.selected >= 0) {
        e.preventDefault();
        e.stopPropagation();
        this.deleteSelected();
      }
    });
    this.root.querySelector(".mc-delete").addEventListener("click", () => this.deleteSelected());
    this.root.querySelector(".mc-snap").addEventListener("change", (e) => { this.snap = e.target.checked; });
    this.root.querySelector(".mc-json-toggle").addEventListener("click", () => {
      this.jsonArea.hidden = !this.jsonArea.hidden;
      this.jsonArea.value = JSON.stringify(this.state, null, 1);
      this.fitNode();
    });
    this.jsonArea.addEventListener("change", () => { this.value = this.jsonArea.value; this.commit(); });
    for (const key of ["label", "prompt", "negative"]) {
      const el = this.root.querySelector(`.mc-${key}`);
      el.addEventListener("input", () => {
        if (this.selected < 0) return;
        this.state.boxes[this.selected][key] = el.value;
        this.commit();
      });
      el.addEventListener("keydown", (e) => e.stopPropagation()); // typing must not trigger graph shortcuts
    }
  }

  // Height the node must give the widget: toolbar + canvas at the image's aspect ratio + open panels.
  minHeight() {
    const size = this.size();
    const width = Math.max(64, this.root.clientWidth || 256);
    return 34 + Math.round((width * size.h) / size.w) + (this.editPanel.hidden ? 0 : 96) + (this.jsonArea.hidden ? 0 : 110);
  }

  fitNode() {
    const needed = this.node.computeSize?.();
    if (needed && this.node.size[1] < needed[1]) this.node.setSize([this.node.size[0], needed[1]]);
  }

  deleteSelected() {
    if (this.selected < 0) return;
    this.state.boxes.splice(this.selected, 1);
    this.state.boxes.forEach((b, i) => { if (!b.color) b.color = PALETTE[i % PALETTE.length]; });
    this.selected = -1;
    this.commit();
  }

  // --- drawing ----------------------------------------------------------------------------------
  refresh() {
    const size = this.size();
    const cssW = Math.max(64, this.root.clientWidth || 256);
    const cssH = Math.round((cssW * size.h) / size.w);
    const dpr = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(cssW * dpr) || this.canvas.height !== Math.round(cssH * dpr)) {
      this.canvas.width = Math.round(cssW * dpr);
      this.canvas.height = Math.round(cssH * dpr);
      this.canvas.style.height = `${cssH}px`;
    }
    const ctx = this.ctx;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.fillStyle = "#3a3a3a";
    ctx.fillRect(0, 0, cssW, cssH);
    ctx.strokeStyle = "rgba(255,255,255,0.06)"; // 64-pixel guide grid
    for (let x = 64; x < size.w; x += 64) { const X = (x / size.w) * cssW; ctx.beginPath(); ctx.moveTo(X, 0); ctx.lineTo(X, cssH); ctx.stroke(); }
    for (let y = 64; y < size.h; y += 64) { const Y = (y / size.h) * cssH; ctx.beginPath(); ctx.moveTo(0, Y); ctx.lineTo(cssW, Y); ctx.stroke(); }
    this.state.boxes.forEach((b, i) => {
      const x = b.x * cssW, y = b.y * cssH, w = b.w * cssW, h = b.h * cssH;
      ctx.globalAlpha = 0.22;
      ctx.fillStyle = b.color;
      ctx.fillRect(x, y, w, h);
      ctx.globalAlpha = 1;
      ctx.lineWidth = i === this.selected ? 3 : 2;
      ctx.strokeStyle = b.color;
      ctx.strokeRect(x, y, w, h);
      const text = b.label || b.prompt.slice(0, 24) || `box ${i + 1}`;
      ctx.font = "12px sans-serif";
      const tw = ctx.measureText(text).width + 6;
      ctx.fillRect(x, y, Math.min(tw, Math.max(w, tw)), 16);
      ctx.fillStyle = "#000";
      ctx.fillText(text, x + 3, y + 12);
      if (i === this.selected) {
        ctx.fillStyle = "#fff";
        for (const [cx, cy] of [[x, y], [x + w, y], [x, y + h], [x + w, y + h]]) ctx.fillRect(cx - 3, cy - 3, 6, 6);
      }
    });
    const sel = this.state.boxes[this.selected];
    if (this.editPanel.hidden === !!sel) {
      this.editPanel.hidden = !sel;
      this.fitNode();
    }
    if (sel) {
      for (const key of ["label", "prompt", "negative"]) {
        const el = this.root.querySelector(`.mc-${key}`);
        if (document.activeElement !== el) el.value = sel[key];
      }
    }
    this.root.querySelector(".mc-count").textContent = `${this.state.boxes.length}/${MAX_BOXES} boxes · ${size.w}×${size.h}`;
    if (!this.jsonArea.hidden && document.activeElement !== this.jsonArea) this.jsonArea.value = JSON.stringify(this.state, null, 1);
  }
}

app.registerExtension({
  name: "multiconcept.regions",
  async setup() {
    const style = document.createElement("style");
    style.textContent = CSS;
    document.head.appendChild(style);
  },
  getCustomWidgets() {
    return {
      [WIDGET_TYPE](node, inputName, inputData) {
        const editor = new RegionEditor(node, inputName);
        const dflt = inputData?.[1]?.default;
        if (dflt) editor.value = dflt;
        const widget = node.addDOMWidget(inputName, WIDGET_TYPE, editor.root, {
          getValue: () => editor.value,
          setValue: (v) => { editor.value = v; },
          getMinHeight: () => editor.minHeight(),
        });
        widget.regionEditor = editor; // lets tests and other extensions reach the editor
        new ResizeObserver(() => editor.refresh()).observe(editor.root);
        return { widget };
      },
    };
  },
  nodeCreated(node) {
    if (node.comfyClass !== NODE_ID) return;
    // Redraw when the image size changes.
    const editor = node.widgets?.find((w) => w.type === WIDGET_TYPE)?.regionEditor;
    if (!editor) return;
    for (const name of ["width", "height"]) {
      const w = node.widgets.find((x) => x.name === name);
      if (w && !w.__mcHooked) {
        const cb = w.callback;
        w.callback = function () { const r = cb?.apply(this, arguments); editor.refresh(); return r; };
        w.__mcHooked = true;
      }
    }
    setTimeout(() => editor.refresh(), 0);
  },
});
