// Keyboard review and the Grad-CAM toggle. No framework: the page works without this script,
// it only adds shortcuts (see the ? panel).
(function () {
  "use strict";
  const $ = (s) => document.querySelector(s);
  const typing = (e) => ["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName);

  const help = $("#help");
  document.querySelectorAll("[data-help]").forEach((b) => b.addEventListener("click", () => { help.hidden = !help.hidden; }));

  const cam = $("#gradcam");
  function showCam(on) {
    document.querySelectorAll("img[data-cam]").forEach((img) => { img.src = on ? img.dataset.cam : img.dataset.thumb; });
  }
  if (cam) cam.addEventListener("change", () => showCam(cam.checked));

  const rows = Array.from(document.querySelectorAll("tr[data-href]"));
  let current = -1;
  function select(i) {
    if (!rows.length) return;
    current = Math.max(0, Math.min(rows.length - 1, i));
    rows.forEach((r, k) => r.classList.toggle("selected", k === current));
    rows[current].scrollIntoView({ block: "nearest" });
  }
  rows.forEach((r, k) => r.addEventListener("click", (e) => { if (e.target.tagName !== "A") window.location = r.dataset.href; }));

  function decide(value) {
    const form = $("#decide");
    if (!form) return;
    const button = form.querySelector(`button[value="${value}"]`);
    if (button) form.requestSubmit(button);
  }

  document.addEventListener("keydown", (e) => {
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    const label = $("#true-label");
    if (e.key === "?") { help.hidden = !help.hidden; return; }
    if (e.key === "j") select(current + 1);
    else if (e.key === "k") select(current - 1);
    else if (e.key === "Enter" && current >= 0) window.location = rows[current].dataset.href;
    else if (e.key === "c") decide("confirm");
    else if (e.key === "r") decide("reject");
    else if (e.key === "s") decide("skip");
    else if (e.key === "n") { const a = $("#next-series"); if (a) window.location = a.href; }
    else if (e.key === "g" && cam) { cam.checked = !cam.checked; showCam(cam.checked); }
    else if (label && /^[1-8]$/.test(e.key)) label.selectedIndex = Number(e.key) - 1;
    else return;
    e.preventDefault();
  });
})();
