// The page code's pure logic (javascript/sdtrt.js), with Node's built-in test runner: node --test tests/js
"use strict";
const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");
const status = require(path.join(__dirname, "..", "..", "javascript", "sdtrt.js"));

function fakeTimers() {
    let now = 0, next = 1;
    const pending = new Map();
    return {
        setTimeout(fn, ms) { const id = next++; pending.set(id, {at: now + ms, fn}); return id; },
        clearTimeout(id) { pending.delete(id); },
        advance(ms) {
            now += ms;
            for (const [id, t] of [...pending].sort((a, b) => a[1].at - b[1].at)) {
                if (t.at <= now) { pending.delete(id); t.fn(); }
            }
        },
        get size() { return pending.size; },
    };
}

test("debounce runs once, with the last arguments, after the quiet period", () => {
    const timers = fakeTimers();
    const calls = [];
    const d = status.debounce((x) => calls.push(x), 500, timers);
    d(1); timers.advance(200); d(2); timers.advance(200); d(3);
    timers.advance(499);
    assert.deepEqual(calls, []);
    timers.advance(1);
    assert.deepEqual(calls, [3]);
    d(4); d.cancel(); timers.advance(1000);
    assert.deepEqual(calls, [3]);
    assert.equal(timers.size, 0);
});

test("the request is a txt2img body with what decides the UNet calls", () => {
    const r = status.buildRequest("txt2img", {prompt: "a cat", negative_prompt: "", width: "768", height: "512",
        batch_size: "2", batch_count: "3", steps: "30", enable_hr: true, hr_scale: "2", hr_resize_x: "0",
        hr_resize_y: "0", hr_checkpoint: "Use same checkpoint", refiner: false});
    assert.equal(r.url, "/sdtrt/v1/coverage?kind=txt2img");
    assert.deepEqual(r.body, {prompt: "a cat", negative_prompt: "", width: 768, height: 512, batch_size: 2,
        n_iter: 3, steps: 30, enable_hr: true, hr_scale: 2, hr_resize_x: 0, hr_resize_y: 0});
});

test("hires checkpoint, hires prompts and the refiner go in when set; img2img has no hires pass", () => {
    const f = {width: "512", height: "512", enable_hr: true, hr_scale: "1.5", hr_checkpoint: "other.safetensors",
        hr_prompt: "detailed", refiner: true, refiner_checkpoint: "refiner", refiner_switch_at: "0.7"};
    const t = status.buildRequest("txt2img", f).body;
    assert.equal(t.hr_checkpoint_name, "other.safetensors");
    assert.equal(t.hr_prompt, "detailed");
    assert.equal(t.refiner_checkpoint, "refiner");
    assert.equal(t.refiner_switch_at, 0.7);
    const i = status.buildRequest("img2img", f);
    assert.equal(i.url, "/sdtrt/v1/coverage?kind=img2img");
    assert.equal(i.body.enable_hr, undefined);
    assert.equal(i.body.refiner_checkpoint, "refiner");
});

test("enabled ControlNet units go in as sd-webui-controlnet's API takes them; disabled ones do not", () => {
    const units = [{enabled: true, module: "canny", model: "control_sd15_canny [fef5e48e]"},
        {enabled: false, module: "reference_only", model: "None"}, {enabled: true}];
    const b = status.buildRequest("txt2img", {controlnet_units: units}).body;
    assert.deepEqual(b.alwayson_scripts, {controlnet: {args: [
        {enabled: true, module: "canny", model: "control_sd15_canny [fef5e48e]"},
        {enabled: true, module: "none", model: "None"}]}});
    assert.equal(status.buildRequest("txt2img", {controlnet_units: [units[1]]}).body.alwayson_scripts, undefined);
});

test("styles go in; img2img's Resize by samples at the previewed size, rounded down to 8", () => {
    assert.deepEqual(status.buildRequest("txt2img", {styles: ["cinematic", "sharp"]}).body.styles, ["cinematic", "sharp"]);
    assert.equal(status.buildRequest("txt2img", {styles: []}).body.styles, undefined);
    const f = {width: "512", height: "512", resize_by: true,
        resize_by_preview: "resize: from 640x480 to 963x722"};
    const b = status.buildRequest("img2img", f).body;
    assert.deepEqual([b.width, b.height], [960, 720]);
    assert.deepEqual(status.buildRequest("img2img", {...f, resize_by: false}).body.width, 512);
    assert.equal(status.buildRequest("img2img", {...f, resize_by_preview: "no image selected"}).body.width, 512);
    assert.equal(status.scaledSize("resize: from 0x0 to 0x0"), null);
});

test("fields the page lacks (other ids in other versions) fall back to A1111's defaults", () => {
    const r = status.buildRequest("txt2img", {});
    assert.deepEqual(r.body, {prompt: "", negative_prompt: "", width: 512, height: 512, batch_size: 1, n_iter: 1,
        steps: 20});
    assert.equal(status.buildRequest("txt2img", {width: "abc"}).body.width, 512);
    assert.equal(status.buildRequest("txt2img", {refiner: true, refiner_checkpoint: "None"}).body.refiner_checkpoint,
        undefined);
});

test("each state renders its message, tone and build offer", () => {
    const served = status.render({engine: true, state: "engine", message: "TensorRT: e profile 1 serves 768x512, batch 2",
        build: null});
    assert.deepEqual(served, {text: "TensorRT: e profile 1 serves 768x512, batch 2", tone: "ok", build: null});
    const build = {checkpoint: "m", profiles: ["1x256x256x75:1x512x512x75:1x1024x1024x150"], controlnet: false};
    const hires = status.render({engine: false, state: "partial", build,
        message: "TensorRT: the hires pass (1536x1024) will run on PyTorch — no profile covers it"});
    assert.equal(hires.tone, "warn");
    assert.deepEqual(hires.build, build);
    const off = status.render({engine: false, state: "off", message: "TensorRT off", build: null});
    assert.deepEqual(off, {text: "TensorRT off", tone: "off", build: null});
    const none = status.render({engine: false, state: "no_engine", message: "TensorRT: no engine for this checkpoint (m)",
        build});
    assert.equal(none.tone, "warn");
    assert.deepEqual(none.build, build);
});

test("a failed or malformed answer shows nothing rather than something wrong", () => {
    for (const bad of [null, undefined, {}, {detail: "x"}, {message: 3}]) {
        assert.deepEqual(status.render(bad), {text: "", tone: "", build: null});
    }
});

test("build progress and the last generation's outcome", () => {
    assert.equal(status.renderJob({state: "running", progress: 0.354, phase: "exporting"}), "building 35% (exporting)");
    assert.equal(status.renderJob({state: "queued", progress: 0}), "building 0%");
    assert.equal(status.renderJob({state: "done"}), "engine built");
    assert.equal(status.renderJob({state: "failed", error: "out of memory"}), "build failed: out of memory");
    assert.equal(status.renderOutcome({engine_calls: 40, fallback_calls: 0, fallback_reasons: {}}),
        "last generation: 40 UNet calls on the engine, 0 on PyTorch");
    assert.equal(status.renderOutcome({engine_calls: 20, fallback_calls: 20,
        fallback_reasons: {"no engine profile covers this call": 20}}),
        "last generation: 20 UNet calls on the engine, 20 on PyTorch (no engine profile covers this call)");
    assert.equal(status.renderOutcome(null), "");
});

test("start() on a page without the generation tabs adds nothing and does not throw", () => {
    const app = {querySelector() { return null; }};
    assert.deepEqual(status.start(app, {document: {}}), []);
    const broken = {querySelector() { throw new Error("bad selector"); }};
    assert.deepEqual(status.start(broken, {document: {}}), []);
});

test("debounce calls the page's own timers as plain functions (a browser refuses them as methods)", async () => {
    const real = globalThis.setTimeout;
    const realClear = globalThis.clearTimeout;
    globalThis.setTimeout = function (fn, ms) {
        if (this !== undefined && this !== globalThis) throw new TypeError("Illegal invocation");
        return real(fn, ms);
    };
    globalThis.clearTimeout = function (h) {
        if (this !== undefined && this !== globalThis) throw new TypeError("Illegal invocation");
        return realClear(h);
    };
    try {
        let fired = 0;
        const d = status.debounce(() => fired++, 5);
        d(); d();
        await new Promise((resolve) => real(resolve, 30));
        assert.equal(fired, 1);
    } finally {
        globalThis.setTimeout = real;
        globalThis.clearTimeout = realClear;
    }
});
