/* Cylindria dashboard: the buttons that cancel, retry, drain and undrain, through the
   JSON API's own routes. With a dashboard sign-in, each call carries the page's CSRF
   token; the browser adds the Origin header the service also checks. */
"use strict";

(function () {
  // Buttons are only shown where this script runs (see .actions-col in the stylesheet).
  document.documentElement.classList.add("scripted");
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrfToken = meta ? meta.content : "";
  const flash = document.querySelector('[data-field="flash"]');
  // A cancel is answered within about 2 seconds, a retry within a submission's time.
  const requestTimeoutMs = 15000;

  const NAMES = {cancel: "cancel", retry: "retry", drain: "drain", undrain: "undrain"};

  function say(text, ok) {
    if (!flash) {
      return;
    }
    flash.querySelector('[data-field="flash-text"]').textContent = text;
    flash.classList.toggle("is-error", !ok);
    flash.classList.toggle("is-ok", ok);
    flash.hidden = false;
  }

  // What a button acts on: the job of its row (or of the page), or the GPU of its card.
  function subject(button) {
    const card = button.closest("[data-gpu]");
    if (card) {
      return "GPU " + card.dataset.gpu;
    }
    const holder = button.closest("[data-job]") || document.body;
    return "job " + (holder.dataset.job || "");
  }

  function succeeded(action, what, body) {
    if (action === "cancel") {
      return body && body.state === "cancelled"
        ? "Cancelled " + what + "."
        : "Cancel of " + what + " requested: it ends once ComfyUI confirms.";
    }
    if (action === "retry") {
      const where = body && body.gpu_id !== null && body.gpu_id !== undefined
        ? " on GPU " + body.gpu_id : "";
      const attempt = body && body.attempt ? " as attempt " + body.attempt : "";
      return "Queued " + what + " again" + attempt + where + ".";
    }
    if (action === "drain") {
      return "Drained " + what + ": it takes no new jobs; those it holds finish.";
    }
    return "Undrained " + what + ": it takes new jobs again.";
  }

  function failed(action, what, status, body) {
    const error = body && body.error;
    const message = error && error.message ? error.message : "HTTP " + status + ".";
    return "Could not " + NAMES[action] + " " + what + " (" + status + "): " + message;
  }

  function target(button) {
    let url = button.dataset.url;
    const panel = button.closest('[data-section="job-actions"]');
    const pick = panel && panel.querySelector('[data-field="retry-gpu"]');
    if (button.dataset.action === "retry" && pick && pick.value) {
      url += (url.includes("?") ? "&" : "?") + "GpuId=" + encodeURIComponent(pick.value);
    }
    return url;
  }

  async function act(button) {
    const action = button.dataset.action;
    const what = subject(button);
    if (!button.dataset.url || !NAMES[action]) {
      return;
    }
    const headers = {Accept: "application/json"};
    if (csrfToken) {
      headers["X-CSRF-Token"] = csrfToken;
    }
    const controller = new AbortController();
    const abort = setTimeout(() => controller.abort(), requestTimeoutMs);
    button.disabled = true;
    try {
      const response = await fetch(target(button), {
        method: "POST",
        credentials: "same-origin",
        cache: "no-store",
        headers: headers,
        signal: controller.signal,
      });
      let body = null;
      try {
        body = await response.json();
      } catch (error) {
        body = null;
      }
      if (response.ok) {
        say(succeeded(action, what, body), true);
      } else {
        say(failed(action, what, response.status, body), false);
      }
    } catch (error) {
      say("Could not " + NAMES[action] + " " + what + ": Cylindria did not answer.", false);
    } finally {
      clearTimeout(abort);
      button.disabled = false;
    }
    // The pages fetch fresh state at once rather than at their next poll.
    document.dispatchEvent(new CustomEvent("cylindria:changed"));
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (button) {
      event.preventDefault();
      act(button);
      return;
    }
    if (flash && event.target.closest('[data-field="flash-close"]')) {
      flash.hidden = true;
    }
  });
})();
