"""The draw-a-digit page ``mnist-cnn-serve`` serves at ``/``: one self-contained HTML file (no CDN,
works offline) that posts the canvas as a PNG to ``POST /predict`` and draws the ten probabilities."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mnist_cnn: draw a digit</title>
<style>
 body { font-family: sans-serif; margin: 2em; background: #fafafa; color: #222; }
 main { display: flex; gap: 2em; align-items: flex-start; }
 canvas { background: #000; border-radius: 6px; cursor: crosshair; touch-action: none; }
 #bars { width: 320px; }
 .row { display: flex; align-items: center; gap: .5em; margin: 4px 0; }
 .label { width: 1em; font-weight: bold; }
 .track { flex: 1; background: #e4e4e4; height: 20px; border-radius: 3px; }
 .fill { background: #888; height: 100%; border-radius: 3px; width: 0; }
 .best .fill { background: #e8710a; }
 .value { width: 4em; text-align: right; font-variant-numeric: tabular-nums; }
 #digit { font-size: 64px; font-weight: bold; height: 80px; }
 button { font-size: 1em; padding: .4em 1.2em; margin-top: .8em; }
</style></head>
<body>
<h1>Draw a digit</h1>
<main>
 <div><canvas id="pad" width="280" height="280"></canvas><br><button id="clear">Clear</button></div>
 <div><div id="digit"></div><div id="bars"></div><p id="status"></p></div>
</main>
<script>
const pad = document.getElementById("pad"), ctx = pad.getContext("2d");
const bars = document.getElementById("bars");
for (let d = 0; d < 10; d++) {
  bars.insertAdjacentHTML("beforeend",
    `<div class="row" id="row${d}"><span class="label">${d}</span><div class="track"><div class="fill"></div></div>` +
    `<span class="value">0.000</span></div>`);
}
function clearPad() {
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, 280, 280);
  document.getElementById("digit").textContent = "";
  for (let d = 0; d < 10; d++) show(d, 0, false);
}
function show(d, p, best) {
  const row = document.getElementById("row" + d);
  row.querySelector(".fill").style.width = (100 * p).toFixed(1) + "%";
  row.querySelector(".value").textContent = p.toFixed(3);
  row.classList.toggle("best", best);
}
let drawing = false, last = null, pending = false, again = false;
function point(e) { const r = pad.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }
pad.addEventListener("pointerdown", e => { drawing = true; last = point(e); stroke(last); });
pad.addEventListener("pointermove", e => { if (drawing) { stroke(point(e)); } });
window.addEventListener("pointerup", () => { if (drawing) { drawing = false; predict(); } });
function stroke(p) {
  ctx.strokeStyle = "#fff"; ctx.lineWidth = 18; ctx.lineCap = "round"; ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(last[0], last[1]); ctx.lineTo(p[0], p[1]); ctx.stroke(); last = p;
  predict();
}
async function predict() {
  if (pending) { again = true; return; }
  pending = true;
  try {
    const png = await new Promise(done => pad.toBlob(done, "image/png"));  // a few kB, not 0.3 MB of JSON
    const response = await fetch("/predict", {method: "POST", headers: {"Content-Type": "image/png"}, body: png});
    const answer = await response.json();
    if (response.ok) {
      answer.probabilities.forEach((p, d) => show(d, p, d === answer.digit));
      document.getElementById("digit").textContent = answer.digit;
      document.getElementById("status").textContent = "";
    } else {
      document.getElementById("status").textContent = answer.error;
    }
  } finally {
    pending = false;
    if (again) { again = false; predict(); }
  }
}
document.getElementById("clear").addEventListener("click", clearPad);
clearPad();
</script>
</body></html>
"""
