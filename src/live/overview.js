// Overview: refreshes the camera table from /api/cameras every second and draws sparklines.
(function () {
  function spark(canvas, scores, threshold) {
    const g = canvas.getContext('2d'); const w = canvas.width, h = canvas.height;
    g.clearRect(0, 0, w, h);
    if (!scores.length) return;
    const hi = Math.max(threshold || 0, ...scores) * 1.1 || 1;
    if (threshold) { g.strokeStyle = '#d32020'; g.setLineDash([3, 3]); g.beginPath();
      g.moveTo(0, h - h * threshold / hi); g.lineTo(w, h - h * threshold / hi); g.stroke(); g.setLineDash([]); }
    g.strokeStyle = '#0b5cad'; g.beginPath();
    scores.forEach((s, i) => { const x = i * w / Math.max(1, scores.length - 1), y = h - h * s / hi;
      if (i) g.lineTo(x, y); else g.moveTo(x, y); });
    g.stroke();
  }
  function fmt(x, d) { return (x === null || x === undefined) ? '–' : x.toFixed(d); }
  async function refresh() {
    try {
      const r = await fetch('/api/cameras', { credentials: 'same-origin' });
      if (!r.ok) return;
      for (const c of await r.json()) {
        const row = document.querySelector('tr[data-camera="' + CSS.escape(c.name) + '"]');
        if (!row) continue;
        row.querySelector('.status').textContent = c.status;
        const v = row.querySelector('.verdict');
        v.textContent = c.last ? c.last.verdict : '–'; v.className = 'verdict ' + (c.last ? c.last.verdict : '');
        row.querySelector('.score').textContent = c.last ? fmt(c.last.score, 3) : '–';
        row.querySelector('.threshold').textContent = c.last ? fmt(c.last.threshold, 3) : '–';
        row.querySelector('.fps').textContent = fmt(c.fps, 1);
        row.querySelector('.latency').textContent = c.last ? fmt(c.last.latency_ms, 0) + ' ms' : '–';
        spark(row.querySelector('canvas'), c.scores, c.last && c.last.threshold);
      }
    } catch (e) { /* the daemon restarts: try again next tick */ }
  }
  refresh(); setInterval(refresh, 1000);
})();
