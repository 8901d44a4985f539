// sd-webui-trt: a status line under Generate in txt2img and img2img. It asks POST /sdtrt/v1/coverage (the
// server decides, with the code that routes UNet calls at run time) whether the generation as set up now will run
// on a TensorRT engine, offers a one-click build when an engine would fix it, an on/off switch, and after each
// generation shows what really ran. No framework, no build step. Anything missing (other element ids, the routes,
// the network) makes the line show nothing; it never throws into the page.
(function (root, factory) {
    "use strict";
    var api = factory();
    if (typeof module === "object" && module.exports) {
        module.exports = api;
    } else {
        root.sdtrtStatus = api;
        var started = false, tries = 0;
        // once the page has its Generate rows: A1111 and Forge call onUiLoaded when they exist; without that hook
        // (or before gradio 4 rendered the page after DOMContentLoaded) it looks again, for a while
        var begin = function () {
            if (started) return;
            try {
                var app = typeof root.gradioApp === "function" ? root.gradioApp() : root.document;
                if (!api.ready(app)) {
                    if (++tries < 600) root.setTimeout(begin, 500);
                    return;
                }
                started = true;
                api.start(app, root);
            } catch (e) {
                if (root.console) root.console.warn("sd-webui-trt status line disabled:", e);
            }
        };
        if (typeof root.onUiLoaded === "function") root.onUiLoaded(begin);
        else if (root.document) root.document.addEventListener("DOMContentLoaded", begin);
    }
})(typeof window !== "undefined" ? window : globalThis, function () {
    "use strict";

    var PREFIX = "/sdtrt/v1";
    var DEBOUNCE_MS = 500;
    var JOB_POLL_MS = 1000;
    var STATUS_POLL_MS = 1500;
    var TABS = ["txt2img", "img2img"];
    var RECHECK_AFTER_MODEL_MS = [0, 5000, 20000];
    var LINE_HEIGHT = "1.8em";

    // ---- pure logic (tested with node --test) -------------------------------------------------------------------
    function debounce(fn, wait, timers) {
        // the globals are called as functions: a browser refuses `obj.setTimeout(...)` on another object
        var t = timers || {setTimeout: function (f, ms) { return setTimeout(f, ms); },
                           clearTimeout: function (h) { clearTimeout(h); }};
        var handle = null;
        var wrapped = function () {
            var args = arguments;
            if (handle !== null) t.clearTimeout(handle);
            handle = t.setTimeout(function () {
                handle = null;
                fn.apply(null, args);
            }, wait);
        };
        wrapped.cancel = function () {
            if (handle !== null) t.clearTimeout(handle);
            handle = null;
        };
        return wrapped;
    }

    function num(value, fallback) {
        var n = Number(value);
        return value === null || value === undefined || value === "" || !isFinite(n) ? fallback : n;
    }

    // The request body, in the shape of /sdapi/v1/txt2img (or img2img): only what decides the UNet calls.
    // `f`: field values read from the page (undefined when the page has no such field).
    // img2img's "Resize by" preview ("resize: from 512x512 to 768x768"): the size it samples at, which A1111
    // rounds down to multiples of 8; null without an image.
    function scaledSize(preview) {
        var m = /to\s+(\d+)\s*x\s*(\d+)/.exec(preview || "");
        if (!m) return null;
        var w = Number(m[1]), h = Number(m[2]);
        return w > 0 && h > 0 ? [w - w % 8, h - h % 8] : null;
    }

    function buildRequest(tab, f) {
        var scaled = tab === "img2img" && f.resize_by ? scaledSize(f.resize_by_preview) : null;
        var body = {
            prompt: f.prompt || "",
            negative_prompt: f.negative_prompt || "",
            width: scaled ? scaled[0] : num(f.width, 512),
            height: scaled ? scaled[1] : num(f.height, 512),
            batch_size: num(f.batch_size, 1),
            n_iter: num(f.batch_count, 1),
            steps: num(f.steps, 20)
        };
        if (f.styles && f.styles.length) body.styles = f.styles.slice();
        if (tab === "txt2img" && f.enable_hr) {
            body.enable_hr = true;
            body.hr_scale = num(f.hr_scale, 2);
            body.hr_resize_x = num(f.hr_resize_x, 0);
            body.hr_resize_y = num(f.hr_resize_y, 0);
            if (f.hr_checkpoint && f.hr_checkpoint !== "Use same checkpoint") body.hr_checkpoint_name = f.hr_checkpoint;
            if (f.hr_prompt) body.hr_prompt = f.hr_prompt;
            if (f.hr_negative_prompt) body.hr_negative_prompt = f.hr_negative_prompt;
        }
        if (f.refiner && f.refiner_checkpoint && f.refiner_checkpoint !== "None") {
            body.refiner_checkpoint = f.refiner_checkpoint;
            body.refiner_switch_at = num(f.refiner_switch_at, 0.8);
        }
        var units = (f.controlnet_units || []).filter(function (u) { return u && u.enabled; });
        if (units.length) {
            body.alwayson_scripts = {controlnet: {args: units.map(function (u) {
                return {enabled: true, module: u.module || "none", model: u.model || "None"};
            })}};
        }
        return {url: PREFIX + "/coverage?kind=" + (tab === "img2img" ? "img2img" : "txt2img"), body: body};
    }

    // What the line shows for a coverage answer: {text, tone: "ok"|"warn"|"off"|"", build: body|null}.
    function render(answer) {
        if (!answer || typeof answer.message !== "string") return {text: "", tone: "", build: null};
        var tone = answer.engine ? "ok" : answer.state === "off" ? "off" : "warn";
        return {text: answer.message, tone: tone, build: answer.engine ? null : answer.build || null};
    }

    function renderJob(job) {
        if (!job) return "";
        if (job.state === "done") return "engine built";
        if (job.state === "failed" || job.state === "cancelled") return "build " + job.state + (job.error ? ": " + job.error : "");
        return "building " + Math.round(100 * num(job.progress, 0)) + "%" + (job.phase ? " (" + job.phase + ")" : "");
    }

    function renderOutcome(last) {
        if (!last || typeof last.engine_calls !== "number") return "";
        var text = "last generation: " + last.engine_calls + " UNet calls on the engine, " + last.fallback_calls +
            " on PyTorch";
        var reasons = Object.keys(last.fallback_reasons || {});
        if (reasons.length) text += " (" + reasons[0] + ")";
        return text;
    }

    // ---- the page -------------------------------------------------------------------------------------------------
    function q(app, selector) {
        try {
            return app.querySelector(selector);
        } catch (e) {
            return null;
        }
    }

    function value(app, id, kind) {
        var el = q(app, "#" + id);
        if (!el) return undefined;
        var input = kind === "text" ? q(el, "textarea") || q(el, "input") :
            kind === "check" ? q(el, "input[type=checkbox]") :
            kind === "num" ? q(el, "input[type=number]") || q(el, "input") : q(el, "input") || q(el, "select");
        if (!input && (el.tagName === "INPUT" || el.tagName === "TEXTAREA")) input = el;
        if (!input) return undefined;
        return kind === "check" ? !!input.checked : input.value;
    }

    // sd-webui-controlnet's units in this tab (ids <tab>_controlnet_<unit>_controlnet_enable_checkbox, ...)
    function readControlNetUnits(app, tab) {
        var boxes = [];
        try {
            boxes = Array.prototype.slice.call(app.querySelectorAll(
                "[id^='" + tab + "_controlnet_'][id$='_controlnet_enable_checkbox']"));
        } catch (e) {
            return [];
        }
        return boxes.map(function (box) {
            var unit = box.id.slice(0, -"_controlnet_enable_checkbox".length);
            return {enabled: value(app, box.id, "check") === true,
                    module: value(app, unit + "_controlnet_preprocessor_dropdown"),
                    model: value(app, unit + "_controlnet_model_dropdown")};
        });
    }

    function texts(app, selector) {
        try {
            return Array.prototype.map.call(app.querySelectorAll(selector), function (e) {
                return (e.textContent || "").trim();
            }).filter(function (t) { return t; });
        } catch (e) {
            return [];
        }
    }

    function shown(el) {
        return !!el && el.offsetParent !== null && (!el.style || el.style.display !== "none");
    }

    function readFields(app, tab) {
        var s = "script_" + tab + "_refiner_";
        return {
            controlnet_units: readControlNetUnits(app, tab),
            styles: texts(app, "#" + tab + "_styles .token span"),
            resize_by: tab === "img2img" && shown(q(app, "#img2img_tab_resize_by")),
            resize_by_preview: (q(app, "#img2img_scale_resolution_preview") || {}).textContent,
            prompt: value(app, tab + "_prompt", "text"),
            negative_prompt: value(app, tab + "_neg_prompt", "text"),
            width: value(app, tab + "_width", "num"),
            height: value(app, tab + "_height", "num"),
            batch_size: value(app, tab + "_batch_size", "num"),
            batch_count: value(app, tab + "_batch_count", "num"),
            steps: value(app, tab + "_steps", "num"),
            enable_hr: tab === "txt2img" ? value(app, tab + "_hr-checkbox", "check") : false,
            hr_scale: value(app, tab + "_hr_scale", "num"),
            hr_resize_x: value(app, tab + "_hr_resize_x", "num"),
            hr_resize_y: value(app, tab + "_hr_resize_y", "num"),
            hr_checkpoint: value(app, "hr_checkpoint"),
            hr_prompt: value(app, "hires_prompt", "text"),
            hr_negative_prompt: value(app, "hires_neg_prompt", "text"),
            refiner: value(app, s + "enable-checkbox", "check"),
            refiner_checkpoint: value(app, s + "checkpoint"),
            refiner_switch_at: value(app, s + "switch_at", "num")
        };
    }

    function request(win, method, url, body) {
        var init = {method: method, credentials: "same-origin", headers: {"Content-Type": "application/json"}};
        if (body !== undefined) init.body = JSON.stringify(body);
        return win.fetch(url, init).then(function (r) {
            return r.json().then(function (data) {
                if (!r.ok) throw new Error((data && data.detail) || ("HTTP " + r.status));
                return data;
            });
        });
    }

    // under the prompts and Generate, the whole width (the actions column is too narrow for a sentence)
    function anchorOf(app, tab) {
        return q(app, "#" + tab + "_toprow") || q(app, "#" + tab + "_generate_box") || q(app, "#" + tab + "_generate");
    }

    // whether the page has rendered a tab the line goes into
    function ready(app) {
        return TABS.some(function (tab) { return !!anchorOf(app, tab); });
    }

    function Line(app, win, tab) {
        var doc = win.document;
        var anchor = anchorOf(app, tab);
        if (!anchor || !anchor.parentNode) return null;
        var box = doc.createElement("div");
        box.id = "sdtrt_status_" + tab;
        box.className = "sdtrt-status";
        // a fixed height from the start: what the line says or offers never moves the page (no layout shift)
        box.style.cssText = "height:" + LINE_HEIGHT + ";font-size:85%;line-height:" + LINE_HEIGHT + ";display:flex;" +
            "gap:.5em;align-items:center;flex-wrap:nowrap;overflow:hidden;color:var(--body-text-color-subdued);" +
            "padding:0 var(--size-2, 8px);";
        var toggle = doc.createElement("input");
        toggle.type = "checkbox";
        // drawn by the browser: the theme styles only its own components' check boxes
        toggle.style.cssText = "margin:0;flex:0 0 auto;appearance:auto;-webkit-appearance:auto;width:auto;height:auto;";
        toggle.title = "Run the UNet on TensorRT engines (sdtrt_enabled)";
        var text = doc.createElement("span");
        text.className = "sdtrt-status-text";
        text.style.cssText = "overflow:hidden;text-overflow:ellipsis;white-space:nowrap;flex:1 1 auto;";
        var button = doc.createElement("button");
        button.className = "sdtrt-build secondary gradio-button";
        button.textContent = "Build an engine for this";
        button.style.cssText = "display:none;padding:0 .5em;font-size:100%;min-height:0;height:" + LINE_HEIGHT +
            ";line-height:1;flex:0 0 auto;";
        box.appendChild(toggle);
        box.appendChild(text);
        box.appendChild(button);
        anchor.parentNode.insertBefore(box, anchor.nextSibling);

        var self = {tab: tab, box: box, text: text, button: button, toggle: toggle, answer: null, busy: false,
                    outcome: ""};
        function show(r) {
            var colors = {ok: "var(--color-accent-soft, #16a34a)", warn: "#d97706", off: "", "": ""};
            text.textContent = r.text + (self.outcome ? " · " + self.outcome : "");
            text.title = r.text;
            box.style.color = r.tone === "ok" ? "#16a34a" : colors[r.tone] || "var(--body-text-color-subdued)";
            button.style.display = r.build && !self.busy ? "inline-block" : "none";
        }
        var asked = 0;  // only the newest question's answer is shown (answers may arrive out of order)
        self.check = debounce(function () {
            var req = buildRequest(tab, readFields(app, tab));
            var mine = ++asked;
            request(win, "POST", req.url, req.body).then(function (answer) {
                if (mine !== asked) return;
                self.answer = answer;
                toggle.checked = answer.state !== "off" || answer.reason !== "sdtrt is switched off";
                if (!self.busy) show(render(answer));  // a build in progress keeps its progress in the line
            }, function () {
                if (mine !== asked) return;
                self.answer = null;
                if (self.busy) return;
                text.textContent = "";
                button.style.display = "none";
            });
        }, DEBOUNCE_MS);
        button.addEventListener("click", safely(function (ev) {
            ev.preventDefault();
            var build = self.answer && self.answer.build;
            if (!build || self.busy) return;
            self.busy = true;
            button.style.display = "none";
            request(win, "POST", PREFIX + "/engines", build).then(function (accepted) {
                var poll = function () {
                    request(win, "GET", PREFIX + "/jobs/" + accepted.job_id).then(function (job) {
                        text.textContent = renderJob(job);
                        if (job.state === "queued" || job.state === "running") {
                            win.setTimeout(poll, JOB_POLL_MS);
                        } else {
                            self.busy = false;
                            if (job.state === "done") self.check();
                        }
                    }, function (e) {
                        self.busy = false;
                        text.textContent = "build status unavailable: " + e.message;
                    });
                };
                poll();
            }, function (e) {
                self.busy = false;
                text.textContent = "build refused: " + e.message;
            });
        }));
        toggle.addEventListener("change", safely(function () {
            request(win, "POST", PREFIX + "/enabled", {enabled: toggle.checked}).then(self.check, self.check);
        }));
        return self;
    }

    function watchGenerations(app, win, line) {
        var generate = q(app, "#" + line.tab + "_generate");
        if (!generate) return;
        generate.addEventListener("click", safely(function () {
            request(win, "GET", PREFIX + "/status").then(function (before) {
                var seen = before.generations;
                var deadline = Date.now() + 3600 * 1000;
                var poll = function () {
                    request(win, "GET", PREFIX + "/status").then(function (now) {
                        if (now.generations !== seen && now.last_generation) {
                            line.outcome = renderOutcome(now.last_generation);
                            line.check();
                        } else if (Date.now() < deadline) {
                            win.setTimeout(poll, STATUS_POLL_MS);
                        }
                    }, function () { /* the line keeps its prediction */ });
                };
                win.setTimeout(poll, STATUS_POLL_MS);
            }, function () { /* no routes: nothing to show */ });
        }));
    }

    // an event handler that never throws into the page
    function safely(fn) {
        return function () {
            try {
                return fn.apply(this, arguments);
            } catch (e) {
                if (typeof console !== "undefined") console.warn("sd-webui-trt status line:", e);
            }
        };
    }

    function start(app, win) {
        var lines = [];
        TABS.forEach(function (tab) {
            var line = Line(app, win, tab);
            if (!line) return;
            lines.push(line);
            var tabRoot = q(app, "#tab_" + tab) || app;
            ["input", "change"].forEach(function (ev) {
                tabRoot.addEventListener(ev, safely(function (e) {
                    if (e.target && line.box.contains(e.target)) return;
                    line.check();
                }), true);
            });
            // the checkpoint picker: A1111's quicksetting, or Forge's (a dropdown with the class model_selection)
            var model = q(app, "#setting_sd_model_checkpoint") || q(app, ".model_selection");
            if (model) {
                // the WebUI loads the checkpoint after the change: ask again once it likely has
                model.addEventListener("change", safely(function () {
                    RECHECK_AFTER_MODEL_MS.forEach(function (ms) { win.setTimeout(line.check, ms); });
                }), true);
            }
            watchGenerations(app, win, line);
            line.check();
        });
        return lines;
    }

    return {debounce: debounce, buildRequest: buildRequest, scaledSize: scaledSize, render: render, renderJob: renderJob,
            renderOutcome: renderOutcome, readFields: readFields, ready: ready, start: start, PREFIX: PREFIX};
});
