// The bulk job page: poll the job's progress until it is finished, then show the final page.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var box = document.getElementById("job");
  if (!box) { return; }
  var url = box.getAttribute("data-progress-url");
  var set = function (id, value) {
    var element = document.getElementById(id);
    if (element) { element.textContent = String(value); }
  };
  var poll = function () {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (job) {
        if (!job) { window.setTimeout(poll, 3000); return; }
        document.getElementById("job-bar").value = job.percent;
        set("job-handled", job.handled);
        set("job-total", job.total);
        set("job-done", job.done);
        set("job-failed", job.failed);
        set("job-skipped", job.skipped);
        if (job.finished) { window.location.reload(); } else { window.setTimeout(poll, 1000); }
      })
      .catch(function () { window.setTimeout(poll, 3000); });
  };
  window.setTimeout(poll, 500);
});
