// CSV batch predictions on a deployment's page (templates/deployments/_csv_form.html).
// The server checks the file, then streams the predicted CSV back a batch at a time;
// this reads that stream, counts its lines against X-ServeML-Rows for the progress bar,
// and offers the result as a Blob download. Plain JS, no dependencies. Delegated from
// document because htmx swaps the form in when the deployment turns ready.
(function () {
  "use strict";
  var STOPPED = "#ServeML error: ";
  var NEWLINE = 10;

  function show(el, on) { el.hidden = !on; }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.id !== "csv-form" || !window.fetch || !window.ReadableStream) return; // else the browser posts it
    event.preventDefault();
    run(form);
  });

  async function run(form) {
    var button = form.querySelector("button[type=submit]");
    var result = document.getElementById("csv-result");
    var progress = document.getElementById("csv-progress");
    var count = document.getElementById("csv-count");
    var errors = document.getElementById("csv-errors");
    var download = document.getElementById("csv-download");
    var file = form.querySelector("input[type=file]").files[0];
    if (!file) return;
    if (download.href) URL.revokeObjectURL(download.href);
    download.removeAttribute("href");
    show(download, false); show(errors, false); show(result, true);
    progress.removeAttribute("value"); // indeterminate while uploading and checking
    count.textContent = "Uploading and checking " + file.name + "…";
    button.disabled = true;
    try {
      var response = await fetch(form.action, {
        method: "POST", body: new FormData(form), credentials: "same-origin",
        headers: { "X-Requested-With": "fetch" },
      });
      if (!response.ok) {
        fail(await response.text() || ("HTTP " + response.status));
        return;
      }
      var total = parseInt(response.headers.get("X-ServeML-Rows"), 10) || 0;
      progress.max = Math.max(total, 1);
      progress.value = 0;
      var reader = response.body.getReader();
      var chunks = [], lines = 0, tail = "";
      var decoder = new TextDecoder();
      for (;;) {
        var step = await reader.read();
        if (step.done) break;
        chunks.push(step.value);
        for (var i = 0; i < step.value.length; i++) if (step.value[i] === NEWLINE) lines++;
        tail = (tail + decoder.decode(step.value.subarray(Math.max(0, step.value.length - 4096)))).slice(-4096);
        var rows = Math.max(lines - 1, 0); // the first line is the header
        progress.value = Math.min(rows, total);
        count.textContent = "Predicted " + rows.toLocaleString() + " of " + total.toLocaleString() + " rows";
      }
      var last = tail.replace(/\n$/, "").split("\n").pop();
      if (last.indexOf(STOPPED) === 0) {
        fail("Prediction stopped at " + last.slice(STOPPED.length));
        return;
      }
      if (lines - 1 !== total) {
        fail("The answer ended after " + Math.max(lines - 1, 0) + " of " + total + " rows: try again.");
        return;
      }
      var name = file.name.replace(/\.csv$/i, "") + "-predictions.csv";
      download.href = URL.createObjectURL(new Blob(chunks, { type: "text/csv" }));
      download.download = name;
      download.textContent = "Download " + name + " (" + total.toLocaleString() + " rows)";
      show(download, true);
      count.textContent = "Predicted " + total.toLocaleString() + " of " + total.toLocaleString() + " rows";
    } catch (err) {
      fail("The prediction did not finish: " + err);
    } finally {
      button.disabled = false;
    }

    function fail(message) {
      progress.max = 1; progress.value = 0;
      count.textContent = "";
      errors.textContent = message;
      show(errors, true);
    }
  }
})();
