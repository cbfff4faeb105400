// Live updates: on each server-sent "change" event, fetch this page again and swap in its
// [data-live] regions. Every action is a plain form; without this script the page still works.
(function () {
  "use strict";
  if (!window.EventSource || !window.fetch || !window.DOMParser) return;
  var busy = false;
  var again = false;
  function refresh() {
    if (!document.querySelector("[data-live]")) return; // nothing live here (Versions, a confirmation)
    if (busy) { again = true; return; }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Live": "1" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh) el.replaceWith(document.importNode(fresh, true));
        });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the next event tries again */ })
      .then(function () {
        busy = false;
        if (again) { again = false; refresh(); }
      });
  }
  var source = new EventSource("/events");
  source.addEventListener("change", refresh);
  var opened = false;
  source.addEventListener("open", function () {
    if (opened) refresh(); // reconnected: changes may have been missed
    opened = true;
    document.body.setAttribute("data-live-open", "1");
  });
})();
