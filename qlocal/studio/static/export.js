// Export job page: follow the job's log and status, then show the verify table and Modelfile.
"use strict";
(function () {
  const box = document.getElementById("export-job");
  if (!box) return;
  const id = box.dataset.job;
  const log = document.getElementById("log");
  const badge = document.getElementById("job-status");
  const stop = document.getElementById("stop-button");
  const POLL_MS = 700;

  document.getElementById("stop-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    stop.disabled = true;
    await fetch(`/api/jobs/${encodeURIComponent(id)}/stop`, { method: "POST" });
  });

  async function showResult() {
    const r = await fetch(`/export/jobs/${encodeURIComponent(id)}/result`);
    const html = await r.text();
    document.getElementById("export-result").outerHTML = html;
  }

  async function poll() {
    let job;
    try {
      const r = await fetch(`/api/jobs/${encodeURIComponent(id)}`);
      job = await r.json();
    } catch (e) {
      setTimeout(poll, POLL_MS * 3);  // the studio restarting: try again
      return;
    }
    if (job.log !== undefined && log.textContent !== job.log) {
      log.textContent = job.log;
      log.scrollTop = log.scrollHeight;
    }
    badge.textContent = job.status;
    badge.className = "status " + job.status;
    box.dataset.status = job.status;
    if (job.status === "running") {
      setTimeout(poll, POLL_MS);
    } else {
      stop.hidden = true;
      await showResult();
    }
  }
  if (box.dataset.status === "running") poll();
})();
