/* Cylindria dashboard: keeps the server-rendered page current from its JSON state feed.
   Data is only ever written with textContent and setAttribute, never parsed as HTML. */
"use strict";

(function () {
  const body = document.body;
  const stateUrl = body.dataset.stateUrl;
  if (!stateUrl) {
    return;
  }
  const pollMs = Number(body.dataset.pollMs) || 1000;
  // A hidden tab needs no second-by-second updates; it catches up when shown again.
  const hiddenPollMs = pollMs * 5;
  const requestTimeoutMs = 5000;
  const live = document.querySelector('[data-field="live"]');
  // The server's time of the last state shown, for saying how old it is.
  let lastUpdated = body.dataset.updated || "";
  let timer = null;
  // A finished job's page has nothing to follow until an action starts it again.
  let stopped = body.dataset.follow === "false";

  function field(root, name) {
    return root.querySelector('[data-field="' + name + '"]');
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node && node.textContent !== value) {
      node.textContent = value;
    }
  }

  function show(node, visible) {
    if (node) {
      node.hidden = !visible;
    }
  }

  function setHref(node, href) {
    if (node && node.getAttribute("href") !== href) {
      node.setAttribute("href", href);
    }
  }

  // A job's link: its id (whole in the title, which a long id shows cut short) and page.
  function setJobLink(node, job) {
    setText(node, job.job_id);
    setHref(node, job.url);
    if (node && node.title !== job.job_id) {
      node.title = job.job_id;
    }
  }

  // Swap the one class that starts with `prefix` (state-*, status-*).
  function setVariant(node, prefix, value) {
    if (!node) {
      return;
    }
    for (const name of Array.from(node.classList)) {
      if (name.startsWith(prefix) && name !== prefix + value) {
        node.classList.remove(name);
      }
    }
    node.classList.add(prefix + value);
  }

  function setBar(node, value, label) {
    if (node) {
      node.value = value;
      setText(node, label);
    }
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") {
        node.textContent = value;
      } else if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children || []) {
      node.appendChild(child);
    }
    return node;
  }

  // A row's, card's or page's action button: shown with its API route when it applies.
  function setAction(root, action, url) {
    const button = root.querySelector('button[data-action="' + action + '"]');
    if (button) {
      button.dataset.url = url || "";
      show(button, Boolean(url));
    }
  }

  function progressBox(state, barField, percentField) {
    return el("div", {class: "progress"}, [
      el("progress", {class: "bar state-" + state, "data-field": barField, max: "1"}),
      el("span", {class: "pct", "data-field": percentField}),
    ]);
  }

  // -- live indicator ------------------------------------------------------------------

  function markLive(label) {
    if (!live) {
      return;
    }
    live.classList.remove("is-stale", "is-out");
    live.classList.add("is-live");
    setText(field(live, "live-label"), "Live · updated " + label);
  }

  function markStale() {
    if (live) {
      live.classList.remove("is-live");
      live.classList.add("is-stale");
      setText(field(live, "live-label"), "Connection lost · retrying");
    }
    markGpusUnknown();
  }

  function markSignedOut() {
    if (live) {
      live.classList.remove("is-live", "is-stale");
      live.classList.add("is-out");
      setText(field(live, "live-label"), "Signed out ·");
      show(field(live, "signin"), true);
    }
    markGpusUnknown();
  }

  // Without fresh state a card's last status is a guess: an "OK" shown while Cylindria
  // cannot be reached would be worse than none. The next update restores each card.
  function markGpusUnknown() {
    const peers = field(document, "peers");
    if (peers) {
      peers.dataset.key = "";  // the next update redraws the other nodes' cards
    }
    for (const card of document.querySelectorAll("article.gpu, article.peer-gpu")) {
      setVariant(card, "status-", "unknown");
      const pill = field(card, "status");
      setVariant(pill, "status-", "unknown");
      setText(pill, "Unknown");
      const note = field(card, "stale");
      setText(note, lastUpdated ? "No update since " + lastUpdated : "No update yet");
      show(note, true);
    }
  }

  // -- the overview page ----------------------------------------------------------------

  function updateGpu(card, gpu) {
    setVariant(card, "status-", gpu.status);
    const pill = field(card, "status");
    setVariant(pill, "status-", gpu.status);
    setText(pill, gpu.status_label);
    show(field(card, "stale"), false);
    show(field(card, "drained"), Boolean(gpu.drained));
    setAction(card, "drain", gpu.drained ? "" : gpu.drain_url);
    setAction(card, "undrain", gpu.drained ? gpu.undrain_url : "");

    const reachable = field(card, "reachable");
    setText(reachable, gpu.reachable ? "reachable" : "unreachable");
    reachable.classList.toggle("good", gpu.reachable);
    reachable.classList.toggle("bad", !gpu.reachable);
    const listener = field(card, "listener");
    setText(listener, gpu.listener_connected ? "connected" : "disconnected");
    listener.classList.toggle("good", gpu.listener_connected);
    listener.classList.toggle("bad", !gpu.listener_connected);

    setText(field(card, "queue"), gpu.queue_label);
    setText(field(card, "vram"), gpu.vram_label);
    const vram = field(card, "vram-bar");
    show(vram, gpu.vram_fraction !== null);
    if (gpu.vram_fraction !== null) {
      vram.value = gpu.vram_fraction;
    }
    const device = [gpu.device_name, gpu.comfyui_version ? "ComfyUI " + gpu.comfyui_version : ""];
    setText(field(card, "device"), device.filter(Boolean).join(" · "));
    const problem = field(card, "problem");
    setText(problem, gpu.problem);
    show(problem, Boolean(gpu.problem));

    const run = gpu.running;
    show(field(card, "running-job"), Boolean(run));
    show(field(card, "idle"), !run);
    if (run) {
      setJobLink(field(card, "running-link"), run);
      setBar(field(card, "running-bar"), run.progress, run.progress_label);
      setText(field(card, "running-percent"), run.progress_label);
      setText(field(card, "running-node"), run.node_label);
    }
  }

  function makeRow(job) {
    const tr = el("tr", {class: "job", "data-job": job.job_id}, [
      el("td", {"data-label": "Job", class: "job-id"}, [
        el("a", {class: "mono", "data-field": "link"}),
      ].concat(job.node === undefined ? [] : [
        el("div", {class: "sub", "data-field": "job-node", title: "The node that ran it"}),
      ])),
      el("td", {"data-label": "GPU", "data-field": "gpu"}),
      el("td", {"data-label": "State"}, [
        el("span", {class: "pill", "data-field": "state"}),
        el("div", {class: "sub", "data-field": "attempt"}),
      ]),
      el("td", {"data-label": "Progress", class: "progress-cell"}, [
        progressBox(job.state, "bar", "percent"),
        el("div", {class: "sub", "data-field": "node"}),
      ]),
      el("td", {"data-label": "Submitted", "data-field": "submitted", class: "nowrap"}),
      el("td", {"data-label": "Duration", "data-field": "duration", class: "nowrap"}),
      el("td", {"data-label": "Detail", class: "detail", "data-field": "detail"}),
      el("td", {"data-label": "Actions", class: "actions-col"}, [
        el("button", {type: "button", class: "action", "data-action": "cancel", hidden: true,
                      text: "Cancel"}),
        el("button", {type: "button", class: "action", "data-action": "retry", hidden: true,
                      text: "Retry"}),
      ]),
    ]);
    return tr;
  }

  function fillRow(tr, job) {
    tr.dataset.state = job.state;
    setJobLink(field(tr, "link"), job);
    if (job.node !== undefined) {
      setText(field(tr, "job-node"), "on " + job.node);
    }
    setText(field(tr, "gpu"), job.gpu_id === null ? "—" : job.gpu_id);
    const state = field(tr, "state");
    setVariant(state, "state-", job.state);
    setText(state, job.state_label);
    setText(field(tr, "attempt"), job.attempt_label);
    const bar = field(tr, "bar");
    setVariant(bar, "state-", job.state);
    setBar(bar, job.progress, job.progress_label);
    setText(field(tr, "percent"), job.progress_label);
    setText(field(tr, "node"), job.node_label);
    const submitted = field(tr, "submitted");
    setText(submitted, job.submitted_label);
    submitted.title = job.submitted_at;
    const duration = field(tr, "duration");
    setText(duration, job.duration_label);
    duration.classList.toggle("cached", Boolean(job.cached));
    setText(field(tr, "detail"), job.detail);
    setAction(tr, "cancel", job.cancel_url);
    setAction(tr, "retry", job.retry_url);
    for (const button of tr.querySelectorAll("button[data-action]")) {
      const label = (button.dataset.action === "cancel" ? "Cancel job " : "Retry job ")
        + job.job_id;
      if (button.getAttribute("aria-label") !== label) {
        button.setAttribute("aria-label", label);
      }
    }
  }

  function updateJobs(jobs, name, emptyName) {
    const tbody = document.querySelector('[data-field="' + (name || "jobs") + '"]');
    if (!tbody) {
      return;
    }
    // Keyed by job id through a Map: ids never end up inside a CSS selector.
    const rows = new Map();
    for (const tr of Array.from(tbody.rows)) {
      rows.set(tr.dataset.job, tr);
    }
    const kept = new Set();
    let cursor = tbody.firstElementChild;
    for (const job of jobs) {
      const tr = rows.get(job.job_id) || makeRow(job);
      fillRow(tr, job);
      kept.add(tr);
      if (tr === cursor) {
        cursor = cursor.nextElementSibling;
      } else {
        tbody.insertBefore(tr, cursor);
      }
    }
    for (const tr of rows.values()) {
      if (!kept.has(tr)) {
        tr.remove();
      }
    }
    show(document.querySelector('[data-field="' + (emptyName || "empty") + '"]'),
         jobs.length === 0);
  }

  // -- the other nodes sharing the database (read-only; as index.html draws them) -------

  function peerCard(gpu) {
    const pills = [];
    if (gpu.drained) {
      pills.push(el("span", {class: "pill drained", title: "Drained: takes no new jobs",
                             text: "Drained"}));
    }
    pills.push(el("span", {class: "pill status-" + gpu.status, "data-field": "status",
                           text: gpu.status_label}));
    const running = gpu.running
      ? [el("a", {class: "mono", href: gpu.running_url, title: gpu.running, text: gpu.running})]
      : [document.createTextNode("Idle")];
    const fact = (label, name, children, title) => el("div", {class: "wide"}, [
      el("dt", {text: label}), el("dd", {"data-field": name, title: title}, children)]);
    return el("article", {class: "card peer-gpu status-" + gpu.status,
                          "data-peer-gpu": gpu.gpu_id}, [
      el("header", {class: "card-head"}, [
        el("h4", {text: "GPU " + gpu.gpu_id}), el("span", {class: "pills"}, pills)]),
      el("dl", {class: "facts"}, [
        fact("Queue", "queue", [document.createTextNode(gpu.queue_label)]),
        fact("Running", "running", running),
        fact("Models", "models", [document.createTextNode(gpu.models_label)],
             gpu.models_label),
        fact("VRAM", "vram", [document.createTextNode(gpu.vram_label)]),
      ]),
    ]);
  }

  function peerGroup(node) {
    const cards = node.gpus.length
      ? node.gpus.map(peerCard) : [el("p", {class: "muted", text: "No GPUs reported yet."})];
    return el("section", {class: "peer", "data-node": node.name}, [
      el("h3", {class: "node-title"}, [
        el("a", {href: node.url, title: "This node's dashboard", text: node.name}),
        document.createTextNode(" "),
        el("span", {class: "pill status-" + node.status, "data-field": "node-state",
                    text: node.state_label}),
        document.createTextNode(" "),
        el("span", {class: "muted", "data-field": "node-seen", text: node.seen_label}),
      ]),
      el("div", {class: "gpus peer-gpus"}, cards),
    ]);
  }

  // Redrawn only when something but the age changed, so a link keeps its hover.
  function updatePeers(nodes) {
    const box = field(document, "peers");
    if (!box) {
      return;
    }
    const key = JSON.stringify(nodes.map((node) => Object.assign({}, node, {seen_label: ""})));
    if (box.dataset.key !== key) {
      box.replaceChildren(...nodes.map(peerGroup));
      box.dataset.key = key;
    }
    for (const node of nodes) {
      const group = Array.from(box.children).find((child) => child.dataset.node === node.name);
      if (group) {
        setText(field(group, "node-seen"), node.seen_label);
      }
    }
  }

  function renderOverview(state) {
    setText(document.querySelector('[data-field="summary"]'), state.summary);
    for (const gpu of state.gpus) {
      const card = document.querySelector('[data-gpu="' + Number(gpu.gpu_id) + '"]');
      if (card) {
        updateGpu(card, gpu);
      }
    }
    if (state.nodes) {
      updatePeers(state.nodes);
    }
    updateJobs(state.jobs);
    if (state.held) {
      updateJobs(state.held, "held", "held-empty");
      setText(document.querySelector('[data-field="held-summary"]'), state.held_summary);
    }
    lastUpdated = state.generated_label;
    markLive(state.generated_label);
  }

  // -- the failures page -----------------------------------------------------------------

  function setLink(name, href) {
    const link = field(document, name);
    if (link) {
      setHref(link, href || "");
      show(link, Boolean(href));
    }
  }

  function renderFailures(state) {
    setText(document.querySelector('[data-field="summary"]'), state.summary);
    setText(field(document, "since"), state.since_label);
    const chips = new Map();
    for (const chip of document.querySelectorAll("[data-chip]")) {
      chips.set(chip.dataset.chip, chip);
    }
    for (const chip of state.state_chips.concat(state.gpu_chips)) {
      const link = chips.get(chip.key);
      if (link) {
        setText(field(link, "count"), chip.count_label);
        setHref(link, chip.url);
      }
    }
    updateJobs(state.jobs);
    setLink("older", state.older_url);
    setLink("newest", state.newest_url);
    lastUpdated = state.generated_label;
    markLive(state.generated_label);
  }

  // -- the job page ---------------------------------------------------------------------

  function outputItem(o) {
    let main;
    if (o.thumbnail) {
      main = el("a", {class: "thumb", href: o.url}, [
        el("img", {src: o.url, alt: o.filename, loading: "lazy"}),
      ]);
    } else if (o.text !== null && o.text !== undefined) {
      main = el("pre", {class: "text-output", text: o.text});
    } else if (o.url) {
      main = el("a", {class: "file mono", href: o.url, text: o.filename});
    } else {
      main = el("span", {class: "file mono", text: o.filename});
    }
    return el("li", {class: "output"}, [main, el("span", {class: "caption", text: o.caption})]);
  }

  function attemptRow(a) {
    const cells = [a.attempt, a.gpu, null, a.submitted, a.finished, a.error].map(
      (text, n) => text === null
        ? el("td", {}, [el("span", {class: "pill state-" + a.state, text: a.state_label})])
        : el("td", {class: n === 3 || n === 4 ? "mono" : "", text: text}));
    return el("tr", {class: "attempt", title: "ComfyUI prompt " + a.prompt}, cells);
  }

  function renderJob(job) {
    for (const [name, text] of Object.entries(job.text)) {
      setText(field(document, name), text);
    }
    setVariant(field(document, "state"), "state-", job.state);
    show(field(document, "cached"), Boolean(job.cached));
    const actions = document.querySelector('[data-section="job-actions"]');
    if (actions) {
      setAction(actions, "cancel", job.cancel_url);
      setAction(actions, "retry", job.retry_url);
      show(field(actions, "retry-gpu"), Boolean(job.retry_url));
    }
    for (const [name, text] of Object.entries(job.extras || {})) {
      setText(field(document, "x-" + name), text);
      show(document.querySelector('[data-extra="' + name + '"]'), text !== null);
    }
    const bar = field(document, "bar");
    setVariant(bar, "state-", job.state);
    setBar(bar, job.progress, job.progress_label);

    const error = job.error;
    show(document.querySelector('[data-section="error"]'), Boolean(error));
    if (error) {
      setText(field(document, "error-kind"), error.kind);
      setText(field(document, "error-node"), error.node ? "in node " + error.node : "");
      setText(field(document, "error-message"), error.message);
      setText(field(document, "error-traceback"), error.traceback);
      show(field(document, "error-traceback-box"), Boolean(error.traceback));
    }
    const nodeErrors = job.node_errors;
    show(document.querySelector('[data-section="node-errors"]'), Boolean(nodeErrors));
    if (nodeErrors) {
      setText(field(document, "node-errors-summary"), nodeErrors.summary);
      setText(field(document, "node-errors-raw"), nodeErrors.raw);
    }

    // Rebuild the outputs only when they change, so thumbnails do not reload.
    const list = field(document, "outputs");
    if (list.dataset.outputsKey !== job.outputs_key) {
      list.replaceChildren(...job.outputs.map(outputItem));
      list.dataset.outputsKey = job.outputs_key;
    }
    show(field(document, "outputs-empty"), job.outputs.length === 0);
    show(document.querySelector('[data-section="attempts"]'), job.attempts.length > 1);
    field(document, "attempts").replaceChildren(...job.attempts.map(attemptRow));
    setText(field(document, "raw"), job.status_json);
    markLive(job.generated_label);
    if (job.terminal) {
      // A finished job changes again only if it is retried (an action restarts polling).
      stopped = true;
      if (live) {
        setText(field(live, "live-label"), "Finished · updated " + job.generated_label);
      }
    }
  }

  // -- polling ---------------------------------------------------------------------------

  const render = {job: renderJob, failures: renderFailures}[body.dataset.page] || renderOverview;

  function schedule(delay) {
    clearTimeout(timer);
    if (!stopped) {
      timer = setTimeout(poll, delay);
    }
  }

  async function poll() {
    const controller = new AbortController();
    const abort = setTimeout(() => controller.abort(), requestTimeoutMs);
    try {
      const response = await fetch(stateUrl, {
        credentials: "same-origin",
        cache: "no-store",
        headers: {Accept: "application/json"},
        signal: controller.signal,
      });
      if (response.status === 401) {
        stopped = true;
        markSignedOut();
        return;
      }
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      render(await response.json());
    } catch (error) {
      markStale();
    } finally {
      clearTimeout(abort);
    }
    schedule(document.hidden ? hiddenPollMs : pollMs);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      schedule(0);
    }
  });
  // An action was taken (actions.js): show its effect now, and follow it.
  document.addEventListener("cylindria:changed", () => {
    stopped = false;
    schedule(0);
  });
  schedule(0);
})();
