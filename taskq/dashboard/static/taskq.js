// taskq dashboard: live regions over server-sent events, confirmations,
// "select all". No inline script anywhere (the CSP forbids it).
"use strict";

(function () {
  const body = document.body;
  const root = body.dataset.root || "";

  function hasSelection(el) {
    return el.querySelector("input[type=checkbox]:checked") !== null;
  }

  function startLive() {
    if (!body.dataset.live || !window.EventSource) return;
    const badge = document.getElementById("live-state");
    const page = location.pathname.slice(root.length) + location.search;
    const source = new EventSource(root + "/events?page=" + encodeURIComponent(page || "/"));
    function show(text, cls) {
      if (!badge) return;
      badge.hidden = false;
      badge.textContent = text;
      badge.className = "live-state " + cls;
    }
    source.onopen = function () { show("live", "on"); };
    source.onerror = function () { show("reconnecting…", "off"); };
    source.addEventListener("regions", function (event) {
      const regions = JSON.parse(event.data);
      for (const name of Object.keys(regions)) {
        for (const el of document.querySelectorAll("[data-region='" + CSS.escape(name) + "']")) {
          // Never wipe out what the operator is selecting.
          if (hasSelection(el)) continue;
          // A new stream gets every region once: skip the ones that did not
          // change (compared as the browser serializes both), so an element
          // the operator is about to click is not replaced for nothing.
          const probe = document.createElement(el.tagName);
          probe.innerHTML = regions[name];
          if (probe.innerHTML.trim() === el.innerHTML.trim()) continue;
          el.innerHTML = regions[name];
        }
      }
      body.dataset.updated = String(Date.now());
      show("live", "on");
    });
    source.addEventListener("problem", function (event) {
      show(JSON.parse(event.data).error, "off");
    });
  }

  document.addEventListener("submit", function (event) {
    const form = event.target;
    const question = form.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });

  document.addEventListener("change", function (event) {
    const box = event.target;
    if (!(box instanceof HTMLInputElement) || !box.dataset.selectAll) return;
    for (const other of document.querySelectorAll("input[type=checkbox][name='" + CSS.escape(box.dataset.selectAll) + "']")) {
      other.checked = box.checked;
    }
  });

  startLive();
})();
