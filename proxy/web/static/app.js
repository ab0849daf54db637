// lightloop dashboard: every figure comes from a /v1/stats/... JSON route (the same ones scripts
// use), drawn with uPlot, refreshed every few seconds. Text from the data is only ever set as
// text (never as HTML), so nothing an agent sent can run here.
"use strict";

const REFRESH_MS = 5000;
const COLORS = ["#2f6fde", "#e0812c", "#2e9e5b", "#c2419e", "#7b5cd6", "#8d6e3f", "#d23f3f", "#3a9bb5"];

// -- small helpers ---------------------------------------------------------------------------

function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === "") continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fill(id, ...children) {
  const slot = document.getElementById(id);
  slot.replaceChildren(...children);
  return slot;
}

function num(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(digits);
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function empty(text) {
  return h("p", { class: "empty" }, text);
}

class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

async function api(url) {
  const answer = await fetch(url, { credentials: "same-origin", headers: { accept: "application/json" } });
  if (answer.status === 401) {
    location.assign("/ui/login?next=" + encodeURIComponent(location.pathname + location.search));
    throw new ApiError(401, "signed out");
  }
  const body = await answer.json().catch(() => null);
  if (!answer.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(answer.status, error.message || answer.statusText, error.param);
  }
  return body;
}

// A table from rows: columns are [label, value(row), {num: true}].
function table(columns, rows, emptyText = "Nothing yet.") {
  if (!rows.length) return empty(emptyText);
  const head = h("tr", {}, columns.map(([label, , o]) => h("th", { class: o && o.num ? "num" : null }, label)));
  const body = rows.map((row) =>
    h("tr", {}, columns.map(([, value, o]) => h("td", { class: o && o.num ? "num" : null }, value(row))))
  );
  return h("table", {}, h("thead", {}, head), h("tbody", {}, body));
}

// -- charts ----------------------------------------------------------------------------------

const charts = new Map();

// Draws (or redraws, when the data changed) a line chart: `xs` and one array per series.
function chart(id, xs, series, { time = false, xLabel = "" } = {}) {
  const slot = document.getElementById(id);
  slot.dataset.points = String(xs.length);
  const key = JSON.stringify([xs, series]);
  const known = charts.get(id);
  if (known && known.key === key) return;
  if (known && known.plot) known.plot.destroy();
  slot.replaceChildren();
  if (!xs.length) {
    slot.append(empty("No data yet."));
    charts.set(id, { key, plot: null });
    return;
  }
  // Versions and steps are whole numbers: ticks on them only.
  const xAxis = time ? { label: xLabel } : { label: xLabel, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] };
  const options = {
    width: Math.max(320, slot.clientWidth || 600),
    height: 240,
    scales: { x: { time } },
    axes: [xAxis, {}],
    series: [
      { label: xLabel || "x" },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: COLORS[i % COLORS.length],
        width: 2,
        spanGaps: true,
        points: { show: true, size: 6 },
      })),
    ],
  };
  const plot = new uPlot(options, [xs, ...series.map((s) => s.values)], slot);
  charts.set(id, { key, plot });
}

// -- pages -----------------------------------------------------------------------------------

const pages = {
  async overview() {
    const o = await api("/v1/stats/overview");
    fill(
      "live-versions",
      table(
        [["policy", (v) => v.policy], ["live version", (v) => `v${v.version}`], ["live since", (v) => when(v.live_at)]],
        o.live_versions,
        "No version is live yet: the base model serves (v0)."
      )
    );
    fill(
      "engines",
      table(
        [
          ["policy", (e) => e.policy],
          ["engine", (e) => e.url],
          ["health", (e) => h("span", { class: e.healthy ? "ok" : "error" }, e.healthy ? "healthy" : e.error || "down")],
          ["models and adapters", (e) => e.models.join(", ")],
        ],
        o.engines,
        "No engine is configured."
      )
    );
    // One line per dataset and mode; x: the policy versions that have a figure.
    const versions = [...new Set(o.rewards.map((r) => r.version))].sort((a, b) => a - b);
    const lines = [];
    for (const dataset of [...new Set(o.rewards.map((r) => r.dataset))]) {
      const rows = o.rewards.filter((r) => r.dataset === dataset);
      for (const mode of ["train", "val"]) {
        const values = versions.map((v) => {
          const row = rows.find((r) => r.version === v);
          return row ? row[`${mode}_reward`] : null;
        });
        if (values.some((v) => v !== null)) lines.push({ label: `${dataset ?? "(no dataset)"} ${mode}`, values });
      }
    }
    chart("reward-chart", versions, lines, { xLabel: "version" });
    const minutes = o.activity.map((a) => Date.parse(a.minute) / 1000);
    chart(
      "activity-chart",
      o.activity.some((a) => a.rollouts || a.calls) ? minutes : [],
      [
        { label: "rollouts", values: o.activity.map((a) => a.rollouts) },
        { label: "calls", values: o.activity.map((a) => a.calls) },
      ],
      { time: true }
    );
    fill(
      "queue",
      table(
        [["dataset", (q) => q.dataset], ["mode", (q) => q.mode], ["queued", (q) => num(q.queued), { num: true }],
         ["running", (q) => num(q.running), { num: true }]],
        o.queue,
        "No dataset is loaded (lightloop tasks load)."
      )
    );
    const w = o.writer;
    fill(
      "writer",
      table(
        [["queue rows", () => num(w.queue_rows), { num: true }], ["spool bytes", () => num(w.spool_bytes), { num: true }],
         ["dropped", () => num(w.dropped), { num: true }], ["rejected", () => num(w.rejected), { num: true }],
         ["state", () => h("span", { class: w.degraded ? "error" : "ok" }, w.degraded || "ok")]],
        [w]
      )
    );
  },

  async training() {
    const steps = (await api("/v1/stats/steps")).data;
    const xs = steps.map((s) => s.step);
    const figures = [
      ["loss", (s) => s.loss],
      ["reward mean", (s) => s.reward_mean],
      ["reward std", (s) => s.reward_std],
      ["tokens", (s) => s.n_tokens],
      ["seconds per step", (s) => s.seconds],
    ];
    // Then every number the trainer reported in its metrics (grad norm, KL, clip fraction, ...).
    const keys = new Set();
    for (const s of steps) for (const [k, v] of Object.entries(s.metrics || {})) if (typeof v === "number") keys.add(k);
    for (const k of [...keys].sort()) figures.push([k, (s) => (typeof s.metrics[k] === "number" ? s.metrics[k] : null)]);
    const holder = document.getElementById("step-charts");
    if (!steps.length) holder.replaceChildren(h("section", { class: "card wide" }, empty("No training step yet.")));
    for (const [label, value] of steps.length ? figures : []) {
      const id = "chart-" + label.replace(/[^a-z0-9]+/gi, "-");
      if (!document.getElementById(id)) {
        holder.append(h("section", { class: "card" }, h("h2", {}, label), h("div", { id, class: "chart" })));
      }
      chart(id, xs, [{ label, values: steps.map(value) }], { xLabel: "step" });
    }
    fill(
      "steps",
      table(
        [
          ["step", (s) => s.step, { num: true }],
          ["policy", (s) => s.policy],
          ["version", (s) => (s.policy_out === null ? "–" : `v${s.policy_in ?? 0} → v${s.policy_out}`)],
          ["rollouts", (s) => num(s.n_rollouts), { num: true }],
          ["tokens", (s) => num(s.n_tokens), { num: true }],
          ["loss", (s) => num(s.loss, 4), { num: true }],
          ["reward mean", (s) => num(s.reward_mean), { num: true }],
          ["seconds", (s) => num(s.seconds, 1), { num: true }],
          ["finished", (s) => when(s.finished_at)],
        ],
        steps.slice().reverse().slice(0, 100),
        "No training step yet."
      )
    );
  },

  async rollouts() {
    const params = new URLSearchParams(location.search);
    const form = document.getElementById("filters");
    for (const [key, value] of params) if (form.elements[key]) form.elements[key].value = value;
    for (const input of form.querySelectorAll("input, select")) input.removeAttribute("aria-invalid");
    const message = document.getElementById("filter-error");
    let page;
    try {
      page = await api("/v1/stats/rollouts?" + params.toString());
    } catch (error) {
      if (error.status === 400 && error.param && form.elements[error.param]) {
        form.elements[error.param].setAttribute("aria-invalid", "true");
        message.textContent = error.message;
        message.hidden = false;
        fill("rollouts", empty("Fix the marked filter."));
        return;
      }
      throw error;
    }
    message.hidden = true;
    fill(
      "rollouts",
      table(
        [
          ["rollout", (r) => h("a", { href: "/ui/rollouts/" + encodeURIComponent(r.id) }, r.id)],
          ["dataset", (r) => r.dataset ?? "–"],
          ["mode", (r) => r.mode],
          ["status", (r) => r.status],
          ["reward", (r) => num(r.reward), { num: true }],
          ["version", (r) => (r.version === null ? "–" : `v${r.version}`)],
          ["calls", (r) => num(r.calls), { num: true }],
          ["agent", (r) => r.agent ?? "–"],
          ["started", (r) => when(r.created_at)],
        ],
        page.data,
        "No rollout matches."
      )
    );
    const pages = Math.max(1, Math.ceil(page.total / page.page_size));
    const link = (n, label) => {
      const next = new URLSearchParams(params);
      next.set("page", String(n));
      return h("a", { href: "/ui/rollouts?" + next.toString() }, label);
    };
    fill(
      "pager",
      page.page > 1 ? link(page.page - 1, "← newer") : "",
      h("span", { id: "total" }, `${num(page.total)} rollouts · page ${page.page} of ${pages}`),
      page.page < pages ? link(page.page + 1, "older →") : ""
    );
  },

  async rollout() {
    const id = document.body.dataset.rollout;
    const r = await api("/v1/stats/rollouts/" + encodeURIComponent(id));
    fill(
      "summary",
      table(
        [
          ["status", () => r.status], ["mode", () => r.mode], ["reward", () => num(r.reward), { num: true }],
          ["version", () => (r.version === null ? "–" : `v${r.version}`)], ["dataset", () => r.dataset ?? "–"],
          ["task", () => (r.task ? JSON.stringify(r.task) : r.task_id ?? "–")], ["agent", () => r.agent ?? "–"],
          ["trained by step", () => r.consumed_by_step ?? "–"], ["started", () => when(r.created_at)],
          ["finished", () => when(r.finished_at)],
        ],
        [r]
      ),
      r.metadata && r.metadata.error ? h("pre", { class: "error" }, String(r.metadata.error)) : ""
    );
    const callSpans = new Set(r.calls.map((c) => c.span_id));
    const events = [
      ...r.calls.map((c) => ({ at: Date.parse(c.created_at), node: callView(c, r.rewards) })),
      ...r.spans.filter((s) => !callSpans.has(s.span_id)).map((s) => ({ at: Date.parse(s.start_time), node: spanView(s) })),
    ].sort((a, b) => a.at - b.at);
    const rollupRewards = r.rewards.filter((w) => !w.span_id);
    fill(
      "timeline",
      ...(events.length ? events.map((e) => e.node) : [empty("This rollout has no recorded call or span.")]),
      rollupRewards.length
        ? h("div", { class: "event" }, meta(h("strong", {}, "rewards of the rollout")),
            table([["name", (w) => w.name], ["value", (w) => num(w.value), { num: true }], ["at", (w) => when(w.created_at)]], rollupRewards))
        : ""
    );
    const view = await api("/v1/stats/rollouts/" + encodeURIComponent(id) + "/samples");
    fill("samples", ...samplesView(view));
    return r.status === "running" || r.status === "queued";
  },

  async datasets() {
    const found = (await api("/v1/datasets")).data;
    const rows = found.flatMap((d) => Object.values(d.splits).map((s) => ({ ...s, live: d.live_version, val: d.val_reward })));
    fill(
      "datasets",
      table(
        [
          ["dataset", (s) => s.dataset], ["split", (s) => s.split], ["policy", (s) => s.policy],
          ["tasks", (s) => num(s.tasks), { num: true }], ["queued", (s) => num(s.queued), { num: true }],
          ["running", (s) => num(s.running), { num: true }], ["done", (s) => num(s.done), { num: true }],
          ["failed", (s) => num(s.failed), { num: true }],
          ["planned", (s) => (s.planned === null ? "until stopped" : num(s.planned)), { num: true }],
          ["live version", (s) => `v${s.live ?? 0}`],
          ["newest val reward", (s) => (s.val ? `${num(s.val.mean)} (v${s.val.version})` : "–")],
        ],
        rows,
        "No dataset is loaded (lightloop tasks load)."
      )
    );
  },
};

// -- a rollout's timeline ----------------------------------------------------------------------

// A line of facts: each its own item, so the flex gap separates them.
function meta(...items) {
  return h("div", { class: "meta" }, items.flat().filter((i) => i !== "" && i !== null && i !== undefined)
    .map((i) => (i instanceof Node ? i : h("span", {}, i))));
}

function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => (typeof part.text === "string" ? part.text : `[${part.type || "part"}]`)).join("\n");
  }
  return content === null || content === undefined ? "" : JSON.stringify(content, null, 2);
}

function toolCall(call) {
  const fn = call.function || {};
  let args = fn.arguments ?? "";
  try {
    args = JSON.stringify(typeof args === "string" ? JSON.parse(args) : args, null, 2);
  } catch (_) {
    args = String(args);
  }
  return h("div", { class: "tool" }, h("span", { class: "name" }, `tool call ${fn.name || "?"}`),
    call.id ? ` (${call.id})` : "", h("pre", {}, args));
}

function messageView(message, extraClass = "") {
  const role = [message.role || "?", message.name, message.tool_call_id ? `result of ${message.tool_call_id}` : null]
    .filter(Boolean).join(" · ");
  const box = h("div", { class: `message ${extraClass} role-${message.role || "unknown"}` }, h("div", { class: "role" }, role));
  const text = contentText(message.content);
  if (text) box.append(h("pre", {}, text));
  for (const call of message.tool_calls || []) box.append(toolCall(call));
  if (message.function_call) box.append(toolCall({ function: message.function_call }));
  return box;
}

function callView(c, rewards) {
  const request = c.request || {};
  const choice = ((c.response || {}).choices || [])[c.choice_index] || {};
  const prompt = request.messages
    ? request.messages.map((m) => messageView(m))
    : [messageView({ role: "prompt", content: request.prompt })];
  const reply = choice.message
    ? messageView(choice.message, "reply")
    : messageView({ role: "completion", content: choice.text ?? (c.response ? "" : "(no reply recorded)") }, "reply");
  const mine = rewards.filter((w) => w.span_id === c.span_id);
  return h(
    "article",
    { class: "event call", "data-span": c.span_id },
    meta(
      h("strong", {}, `call ${c.seq}${c.choice_index ? ` · choice ${c.choice_index}` : ""}`),
      `model ${c.model}`, c.policy_version === null ? "" : `v${c.policy_version}`,
      c.latency_ms === null ? "" : `${num(c.latency_ms, 0)} ms`,
      `${num(c.prompt_tokens)} prompt / ${num(c.completion_tokens)} completion tokens`,
      c.finish_reason ? `finish: ${c.finish_reason}` : "", c.agent ? `agent ${c.agent}` : "",
      ...mine.map((w) => h("span", { class: "ok" }, `${w.name} ${num(w.value)}`))),
    h("details", { open: true }, h("summary", {}, `${prompt.length} message${prompt.length === 1 ? "" : "s"}`), ...prompt),
    reply
  );
}

function spanView(s) {
  const ms = s.end_time ? Date.parse(s.end_time) - Date.parse(s.start_time) : null;
  return h(
    "article",
    { class: "event span", "data-span": s.span_id },
    meta(h("strong", {}, s.name), s.kind ? s.kind.toLowerCase() : "",
      ms === null ? "" : `${num(ms, 0)} ms`, s.status_code && s.status_code !== "UNSET" ? s.status_code : "",
      s.status_message || ""),
    h("details", {}, h("summary", {}, "attributes"), h("pre", {}, JSON.stringify(s.attributes || {}, null, 2)))
  );
}

// -- the trainer's view -----------------------------------------------------------------------

// How the trainer turns this rollout's rewards into advantages (README, Trainer), with its numbers.
function creditView(credit) {
  const turn = credit.mode === "turn";
  const rewarded = Object.keys(credit.turn_rewards || {}).length;
  return h("div", { class: "event credit", "data-credit": credit.mode },
    meta(h("strong", {}, `credit: ${credit.mode}`), turn ? `gamma ${num(credit.gamma)}` : "",
      `final reward ${credit.final_reward === null ? "none" : num(credit.final_reward)}`,
      `${rewarded} call${rewarded === 1 ? "" : "s"} rewarded`),
    h("p", { class: "formula" }, turn
      ? "Each trained turn k: return G_k = Σ_{j≥k} γ^(j−k)·r'_j over the rollout's calls (r'_j: the call's own rewards, plus the final reward R on the last call); advantage A_k = (G_k − mean_g G) / (std_g G + 1e−6) over the trained turns of the rollout's group g, on that turn's tokens."
      : "One advantage per rollout: A = (R − mean_g R) / (std_g R + 1e−6) over the rollouts of its group g (GRPO), on every trained token. With TRAINER__CREDIT=turn each turn would get the return shown beside it."));
}

function samplesView(view) {
  if (!view.policies.length) return [empty("No call of this rollout went to a policy model: nothing to train on.")];
  return [creditView(view.credit), ...view.policies.flatMap((p) => {
    const st = p.stats;
    const skipped = Object.entries(st).filter(([k, v]) => k.startsWith("skipped") && v).map(([k, v]) => `${k.replace(/_/g, " ")}: ${v}`);
    const head = meta(h("strong", {}, `policy ${p.policy}`), `${p.samples.length} sample${p.samples.length === 1 ? "" : "s"}`,
      `${st.calls} calls`, ...skipped);
    if (!p.samples.length) return [h("div", { class: "event" }, head, empty("No sample: no call has token ids."))];
    return p.samples.map((s, i) => {
      const response = s.input_ids.slice(s.prompt_len);
      const trained = s.loss_mask.filter((m) => m).length;
      // The token's text where the proxy has the policy's tokenizer, else its id.
      const shown = (k) => (s.tokens ? s.tokens[k].replace(/\n/g, "\u21b5\n") : String(s.input_ids[k]));
      const turnAt = (j) => s.turns.find((t) => t.start <= j && j < t.end);
      const tokens = response.map((id, j) =>
        h("span", {
          class: "tok " + (s.loss_mask[j] ? "trained" : "masked"),
          title: s.loss_mask[j]
            ? `id ${id} · logprob ${num(s.logprobs[j], 4)} · turn return ${num(turnAt(j)?.return)}`
            : `id ${id} · context, not trained`,
        }, shown(s.prompt_len + j))
      );
      const turns = table(
        [
          ["turn", (t) => s.turns.indexOf(t) + 1, { num: true }],
          ["tokens", (t) => `${t.start}–${t.end}`],
          ["reward", (t) => num(t.reward), { num: true }],
          ["return", (t) => num(t.return), { num: true }],
          ["span", (t) => t.span_id],
        ],
        s.turns,
        "No trained turn."
      );
      return h("div", { class: "event sample", "data-sample": String(i) }, i === 0 ? head : "",
        meta(`sample ${i + 1}`, `${s.prompt_len} prompt tokens`, `${trained} trained`, `${response.length - trained} masked`,
          s.policy_versions.length ? `served by v${s.policy_versions.join(", v")}` : ""),
        h("details", {}, h("summary", {}, s.tokens ? "prompt" : "prompt token ids"),
          h("div", { class: "tokens" }, s.input_ids.slice(0, s.prompt_len).map((id, k) =>
            h("span", { class: "tok prompt", title: `id ${id}` }, shown(k))))),
        h("div", { class: "tokens" }, tokens),
        h("details", { class: "turns" }, h("summary", {}, `${s.turns.length} trained turn${s.turns.length === 1 ? "" : "s"}: rewards and returns`), turns));
    });
  })];
}

// -- refresh -----------------------------------------------------------------------------------

async function run() {
  const render = pages[document.body.dataset.page];
  if (!render) return;
  const live = document.getElementById("live");
  const tick = async () => {
    try {
      const again = await render();
      live.classList.remove("stale");
      live.textContent = "live · " + new Date().toLocaleTimeString();
      return again !== false;
    } catch (error) {
      if (error.status === 401) return false;
      live.classList.add("stale");
      live.textContent = "not refreshed: " + error.message;
      console.warn("lightloop dashboard:", error);
      return true;
    }
  };
  let again = await tick();
  document.body.dataset.ready = "true";
  const timer = setInterval(async () => {
    if (document.hidden) return;
    again = await tick();
    if (!again) clearInterval(timer);
  }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", run);
