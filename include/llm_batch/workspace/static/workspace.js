// The workspace's only script: live progress bars and the review queue's keyboard shortcuts.
// No library and nothing from the network but this app's own JSON endpoints.
"use strict";

function refreshProgress() {
  document.querySelectorAll("[data-progress-url]").forEach(async (box) => {
    try {
      const response = await fetch(box.dataset.progressUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const p = await response.json();
      const bar = box.querySelector("progress");
      bar.max = p.total; bar.value = p.answered;
      box.querySelector(".progress-text").textContent = `${p.answered} / ${p.total}` + (p.final ? ` (${p.state})` : "");
      if (p.final) box.removeAttribute("data-progress-url");
    } catch (err) { /* the next tick tries again */ }
  });
}

function reviewShortcuts() {
  const items = Array.from(document.querySelectorAll(".review-item"));
  if (!items.length) return;
  let current = 0;
  const focus = (i) => {
    current = Math.max(0, Math.min(items.length - 1, i));
    items.forEach((el, j) => el.classList.toggle("current", j === current));
    items[current].focus({ preventScroll: true });
    items[current].scrollIntoView({ block: "nearest" });
  };
  items.forEach((el, i) => el.addEventListener("click", () => { if (current !== i) focus(i); }));
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    const typing = target instanceof HTMLElement && target.matches("input, textarea, select");
    if (typing) {
      if (target.matches("textarea") && event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        target.closest("form").querySelector(".correct-save").click();
      }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const item = items[current];
    const press = (selector) => { const b = item.querySelector(selector); if (b) { event.preventDefault(); b.click(); } };
    switch (event.key) {
      case "j": case "n": case "ArrowDown": event.preventDefault(); focus(current + 1); break;
      case "k": case "p": case "ArrowUp": event.preventDefault(); focus(current - 1); break;
      case "a": press("button.approve"); break;
      case "r": press("button.reject"); break;
      case "c": {
        const details = item.querySelector("details.correct");
        if (details) { event.preventDefault(); details.open = true; details.querySelector("textarea").focus(); }
        break;
      }
    }
  });
  focus(0);
}

document.addEventListener("DOMContentLoaded", () => {
  reviewShortcuts();
  if (document.querySelector("[data-progress-url]")) setInterval(refreshProgress, 3000);
});
