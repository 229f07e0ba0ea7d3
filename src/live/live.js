// Live view: reloads the overlaid frame at the configured rate (one request in flight at a
// time, so a slow link lowers the rate instead of queueing) and updates the verdict badge.
(function () {
  const img = document.getElementById('frame');
  const badge = document.getElementById('badge');
  const info = document.getElementById('info');
  let busy = false;
  async function next() {
    if (busy) return; busy = true;
    try {
      const r = await fetch('/live/' + encodeURIComponent(CAMERA) + '/frame.jpg', { cache: 'no-store', credentials: 'same-origin' });
      if (r.ok) {
        const url = URL.createObjectURL(await r.blob());
        const old = img.src; img.src = url;
        if (old.startsWith('blob:')) URL.revokeObjectURL(old);
      }
      const c = await fetch('/api/cameras', { credentials: 'same-origin' });
      if (c.ok) {
        const cam = (await c.json()).find(x => x.name === CAMERA);
        if (cam && cam.last) {
          badge.textContent = cam.last.verdict; badge.className = 'badge ' + cam.last.verdict;
          info.textContent = 'score ' + cam.last.score.toFixed(3) + ' (threshold ' + cam.last.threshold.toFixed(3) +
            ') · map max ' + cam.last.map_max.toFixed(3) + ' · ' + (cam.fps ? cam.fps.toFixed(1) : '–') + ' fps · ' +
            cam.last.latency_ms.toFixed(0) + ' ms · status ' + cam.status;
        }
      }
    } catch (e) { /* retry next tick */ }
    busy = false;
  }
  setInterval(next, 1000 / Math.max(1, FPS));
})();
