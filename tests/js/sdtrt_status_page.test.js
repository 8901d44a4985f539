// The status line on a small stand-in of A1111's page (no browser): javascript/sdtrt.js's start() with a fake DOM
// and a scripted /sdtrt/v1 server. What a real browser shows is in tests/integration/test_real_webui_status_line.py.
"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const status = require(path.join(__dirname, "..", "..", "javascript", "sdtrt.js"));

class El {
    constructor(tag, id) {
        this.tagName = tag.toUpperCase(); this.id = id || ""; this.children = []; this.parentNode = null;
        this.style = {}; this.listeners = {}; this.textContent = ""; this.value = ""; this.checked = false;
        this.type = ""; this.title = ""; this.className = ""; this.offsetParent = {};
    }
    appendChild(c) { c.parentNode = this; this.children.push(c); return c; }
    insertBefore(c, ref) {
        c.parentNode = this;
        const i = ref ? this.children.indexOf(ref) : -1;
        if (i < 0) this.children.push(c); else this.children.splice(i, 0, c);
        return c;
    }
    get nextSibling() {
        const sibs = this.parentNode ? this.parentNode.children : [];
        return sibs[sibs.indexOf(this) + 1] || null;
    }
    addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); }
    contains(other) {
        for (let e = other; e; e = e.parentNode) if (e === this) return true;
        return false;
    }
    *walk() { for (const c of this.children) { yield c; yield* c.walk(); } }
    matches(part) {
        const m = /^(#[\w-]+)?([a-z]+)?(?:\[type=(\w+)\])?$/.exec(part);
        if (!m) return false;
        return (!m[1] || this.id === m[1].slice(1)) && (!m[2] || this.tagName === m[2].toUpperCase()) &&
            (!m[3] || this.type === m[3]);
    }
    querySelector(selector) {
        let scope = [this];
        for (const part of selector.trim().split(/\s+/)) {
            const found = [];
            for (const s of scope) for (const e of s.walk()) if (e.matches(part)) found.push(e);
            if (!found.length) return null;
            scope = found;
        }
        return scope[0];
    }
    querySelectorAll() { return []; }
    fire(type, target) {  // capture listeners on the ancestors, then the target's own
        const chain = [];
        for (let e = target; e; e = e.parentNode) chain.unshift(e);
        for (const e of chain) for (const fn of e.listeners[type] || []) fn({target, preventDefault() {}});
    }
}

function page() {
    const app = new El("div", "app");
    const tab = app.appendChild(new El("div", "tab_txt2img"));
    tab.appendChild(new El("div", "txt2img_toprow"));
    for (const [id, value] of [["txt2img_width", "64"], ["txt2img_height", "64"], ["txt2img_batch_size", "1"]]) {
        const box = tab.appendChild(new El("div", id));
        const input = box.appendChild(new El("input"));
        input.type = "number"; input.value = value;
    }
    const prompt = tab.appendChild(new El("div", "txt2img_prompt")).appendChild(new El("textarea"));
    prompt.value = "a cat";
    tab.appendChild(new El("button", "txt2img_generate"));
    return app;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// wait until `fn()` holds (a loaded machine may be slow), failing with `what` after `ms`
async function until(what, fn, ms = 10000) {
    const end = Date.now() + ms;
    while (!fn()) {
        if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
        await sleep(20);
    }
}

function server(delays = {}) {
    const calls = [];
    let job = 0;
    const answer = (body) => body.width <= 64
        ? {engine: true, state: "engine", message: "TensorRT: e1 profile 1 serves 64x64, batch 1", build: null}
        : {engine: false, state: "pytorch", build: {checkpoint: "m", profiles: ["1x64x64x75:1x128x128x75:1x256x256x150"]},
           message: `TensorRT: the first pass (${body.width}x64) will run on PyTorch — no profile covers it`};
    const fetch = async (url, init) => {
        const body = init.body ? JSON.parse(init.body) : undefined;
        calls.push({url, method: init.method, body});
        let data;
        if (url.startsWith("/sdtrt/v1/coverage")) {
            await sleep(delays[body.width] || 0);
            data = answer(body);
            if (built && body.width === 128) data = {engine: true, state: "engine", build: null,
                message: "TensorRT: e2 profile 1 serves 128x64, batch 1"};
        } else if (url === "/sdtrt/v1/engines") {
            data = {job_id: "j1"};
        } else if (url === "/sdtrt/v1/jobs/j1") {
            job += 1;
            data = job < 2 ? {state: "running", progress: 0.5, phase: "export"} : {state: "done", progress: 1};
            if (data.state === "done") built = true;
        } else {
            return {ok: false, status: 404, json: async () => ({detail: "no such route"})};
        }
        return {ok: true, status: 200, json: async () => data};
    };
    let built = false;
    return {fetch, calls};
}

test("the line predicts, flips, builds in one click and shows only the newest answer", async () => {
    const app = page();
    const srv = server({96: 900});
    const win = {document: {createElement: (tag) => new El(tag)}, fetch: srv.fetch,
                 setTimeout: (f, ms) => setTimeout(f, ms)};
    const [line] = status.start(app, win);
    assert.ok(line, "a line for txt2img");
    const box = app.querySelector("#sdtrt_status_txt2img");
    assert.equal(box.parentNode, app.querySelector("#txt2img_toprow").parentNode);  // right under the top row
    await until("the first answer", () => line.text.textContent !== "");
    assert.equal(line.text.textContent, "TensorRT: e1 profile 1 serves 64x64, batch 1");
    assert.equal(line.button.style.display, "none");
    assert.equal(line.toggle.checked, true);
    assert.deepEqual(srv.calls[0].body, {prompt: "a cat", negative_prompt: "", width: 64, height: 64, batch_size: 1,
        n_iter: 1, steps: 20});

    // typing a width beyond the profile: one request after the quiet period, the flip and the build offer
    const width = app.querySelector("#txt2img_width input[type=number]");
    const before = srv.calls.length;
    for (const v of ["1", "12", "128"]) { width.value = v; app.fire("input", width); }
    await until("the flip", () => /128x64/.test(line.text.textContent));
    await sleep(600);  // nothing more is asked
    assert.equal(srv.calls.length, before + 1);
    assert.match(line.text.textContent, /^TensorRT: the first pass \(128x64\) will run on PyTorch/);
    assert.equal(line.button.style.display, "inline-block");

    // a slow answer to an older question never replaces a newer one
    width.value = "96"; line.check(); await until("the slow question asked", () => srv.calls.at(-1).body?.width === 96);
    width.value = "128"; line.check();
    await sleep(2000);  // both answered by now (the slow one after 900 ms)
    assert.match(line.text.textContent, /\(128x64\)/);

    // one click: the job's progress in the line, then the new answer
    line.button.fire("click", line.button);
    await until("the build's progress", () => line.text.textContent.startsWith("building"));
    assert.equal(line.text.textContent, "building 50% (export)");
    assert.equal(line.button.style.display, "none");
    await until("the new engine", () => line.text.textContent.includes("e2"));
    assert.equal(line.text.textContent, "TensorRT: e2 profile 1 serves 128x64, batch 1");
    assert.deepEqual(srv.calls.find((c) => c.url === "/sdtrt/v1/engines").body,
        {checkpoint: "m", profiles: ["1x64x64x75:1x128x128x75:1x256x256x150"]});
});

test("a failed coverage request leaves the line empty", async () => {
    const app = page();
    const win = {document: {createElement: (tag) => new El(tag)}, setTimeout: (f, ms) => setTimeout(f, ms),
                 fetch: async () => ({ok: false, status: 500, json: async () => ({detail: "boom"})})};
    const [line] = status.start(app, win);
    await sleep(1200);  // asked and failed by now
    assert.equal(line.text.textContent, "");
    assert.equal(line.button.style.display, "none");
});

test("the page is ready for the line once a tab's Generate row exists (gradio 4 renders after the page loads)", () => {
    assert.equal(status.ready(new El("div", "app")), false);
    assert.equal(status.ready(page()), true);  // A1111 and Forge: #txt2img_toprow
    const forgeLike = new El("div", "app");
    forgeLike.appendChild(new El("div", "img2img_generate_box"));
    assert.equal(status.ready(forgeLike), true);
    assert.deepEqual(status.start(new El("div", "app"), {document: {createElement: (tag) => new El(tag)}}), []);
});
