// Fills the Deployments page's "Runs in progress" section and refreshes it every few seconds without reloading
// the page: fetches the section from this app (/runs/section) and swaps it in. No framework, no other origin.
(function () {
  "use strict";
  var SECTION_ID = "runs-in-progress";

  function section() { return document.getElementById(SECTION_ID); }

  function schedule() {
    var current = section();
    if (!current) { return; }
    var seconds = Number(current.getAttribute("data-refresh-seconds")) || 5;
    window.setTimeout(refresh, seconds * 1000);
  }

  function refresh() {
    var current = section();
    if (!current) { return; }
    fetch(current.getAttribute("data-refresh-url"), {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var holder = document.createElement("template");
        holder.innerHTML = html.trim();
        var fresh = holder.content.getElementById(SECTION_ID);
        // Only a section replaces the section (not, e.g., a sign-in page after the session expired).
        if (fresh) { section().replaceWith(fresh); }
      })
      .catch(function () { /* a moment offline: the next refresh tries again */ })
      .then(schedule);
  }

  refresh();  // the page comes without the runs: fetch them at once
})();
