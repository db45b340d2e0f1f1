// Live progress bars: polls /ui/progress for the batches on the page that have not ended and
// updates their bars and counts. Writes text only (textContent), never markup.
"use strict";
(function () {
  const ENDED = new Set(["completed", "failed", "expired", "cancelled"]);
  const INTERVAL_MS = 1000;

  function rows() {
    return Array.from(document.querySelectorAll("[data-progress-batch]"));
  }

  function setField(row, name, value) {
    for (const element of row.querySelectorAll('[data-field="' + name + '"]')) {
      element.textContent = String(value);
    }
  }

  function update(row, batch) {
    const bar = row.querySelector("progress");
    if (bar) {
      bar.max = Math.max(batch.total, 1);
      bar.value = batch.finished;
      bar.textContent = batch.finished + " of " + batch.total;
    }
    row.dataset.status = batch.status;
    for (const name of ["status", "finished", "total", "completed", "failed"]) {
      setField(row, name, batch[name]);
    }
  }

  async function poll() {
    const running = rows().filter((row) => !ENDED.has(row.dataset.status));
    if (running.length === 0) {
      return;
    }
    const query = new URLSearchParams();
    for (const id of new Set(running.map((row) => row.dataset.progressBatch))) {
      query.append("batch", id);
    }
    try {
      const response = await fetch("/ui/progress?" + query.toString(), {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
      });
      if (response.status === 401) {
        window.location.assign("/ui/login");
        return;
      }
      if (response.ok) {
        const body = await response.json();
        for (const batch of body.data) {
          for (const row of running) {
            if (row.dataset.progressBatch === batch.id) {
              update(row, batch);
            }
          }
        }
      }
    } catch (error) {
      // The API restarting or the network gone: try again at the next tick.
    }
    window.setTimeout(poll, INTERVAL_MS);
  }

  window.setTimeout(poll, INTERVAL_MS);
})();
