// Region editor: draws the camera's regions (rectangles and ignore polygons, in fractions of
// the frame) over a live frame, lets the user draw, move, resize, rename and delete them, and
// sends the whole list to /api/regions/<camera>. The server checks the edited config as
// check-config does and writes it only when it is good; its answer is shown as is.
(function () {
  const api = '/api/regions/' + encodeURIComponent(CAMERA);
  const img = document.getElementById('frame');
  const svg = document.getElementById('overlay');
  const list = document.getElementById('list');
  const status = document.getElementById('status');
  const problems = document.getElementById('problems');
  const sel = document.getElementById('selected');
  const nameInput = document.getElementById('name');
  const polyBtn = document.getElementById('poly');
  const polyDone = document.getElementById('polydone');
  const NS = 'http://www.w3.org/2000/svg';
  const MIN = 0.01; // smallest side drawn, in fractions
  let base = null, editable = false, regions = [], selected = -1, drag = null, polygon = null;

  function say(text, cls) { status.textContent = text; status.className = 'status ' + (cls || ''); }
  function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }
  function point(ev) {
    const r = img.getBoundingClientRect();
    return [clamp((ev.clientX - r.left) / r.width, 0, 1), clamp((ev.clientY - r.top) / r.height, 0, 1)];
  }

  // Regions from the file; rect_px converted with the last frame's size when it is known.
  async function load() {
    const r = await fetch(api, { credentials: 'same-origin', cache: 'no-store' });
    const j = await r.json();
    if (!r.ok) { say(j.error || ('HTTP ' + r.status), 'bad'); return; }
    base = j.base; editable = j.editable;
    regions = j.regions.map(x => {
      let rect = x.rect, px = false;
      if (!rect && x.rect_px) {
        px = true;
        rect = j.frame ? [x.rect_px[0] / j.frame.width, x.rect_px[1] / j.frame.height,
          x.rect_px[2] / j.frame.width, x.rect_px[3] / j.frame.height] : null;
      }
      const ignore = x.ignore.map(p => p.map(q => px && j.frame ? [q[0] / j.frame.width, q[1] / j.frame.height] : q));
      return { name: x.name, from: x.name, rect, ignore, changed: false, keys: x.keys, px };
    });
    selected = -1; polygon = null; problems.textContent = '';
    document.getElementById('save').disabled = !editable;
    say(editable ? 'loaded from ' + j.config : 'read-only (http.edit_config = false)');
    render();
    window.EDITOR_READY = true;
  }

  function render() {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    regions.forEach((r, i) => {
      if (!r.rect) return;
      const g = document.createElementNS(NS, 'g');
      const rect = document.createElementNS(NS, 'rect');
      rect.setAttribute('x', r.rect[0]); rect.setAttribute('y', r.rect[1]);
      rect.setAttribute('width', r.rect[2]); rect.setAttribute('height', r.rect[3]);
      rect.setAttribute('class', 'region' + (i === selected ? ' selected' : ''));
      rect.dataset.index = i;
      g.appendChild(rect);
      r.ignore.forEach(p => {
        const pl = document.createElementNS(NS, 'polygon');
        pl.setAttribute('points', p.map(q => q.join(',')).join(' '));
        pl.setAttribute('class', 'ignore');
        g.appendChild(pl);
      });
      if (i === selected) {
        const h = document.createElementNS(NS, 'rect');
        h.setAttribute('x', r.rect[0] + r.rect[2] - 0.015); h.setAttribute('y', r.rect[1] + r.rect[3] - 0.015);
        h.setAttribute('width', 0.03); h.setAttribute('height', 0.03);
        h.setAttribute('class', 'handle'); h.dataset.handle = i;
        g.appendChild(h);
      }
      svg.appendChild(g);
    });
    if (polygon && polygon.points.length) {
      const pl = document.createElementNS(NS, 'polyline');
      pl.setAttribute('points', polygon.points.map(q => q.join(',')).join(' '));
      pl.setAttribute('class', 'ignore drawing');
      svg.appendChild(pl);
    }
    list.innerHTML = '';
    regions.forEach((r, i) => {
      const li = document.createElement('li');
      li.textContent = r.name + (r.rect ? ' [' + r.rect.map(v => v.toFixed(3)).join(', ') + ']' : ' (rect_px: no frame yet)') +
        (r.ignore.length ? ' · ' + r.ignore.length + ' ignore polygon(s)' : '') + (r.changed ? ' · changed' : '') +
        (r.keys.length ? ' · ' + r.keys.join(', ') : '');
      li.className = i === selected ? 'selected' : '';
      li.onclick = () => { select(i); };
      list.appendChild(li);
    });
    sel.hidden = selected < 0;
    if (selected >= 0 && document.activeElement !== nameInput) nameInput.value = regions[selected].name;
  }

  function select(i) { selected = i; polygon = null; polyDone.hidden = true; render(); }

  function freshName() {
    for (let k = 1; ; k++) { const n = 'region-' + k; if (!regions.some(r => r.name === n)) return n; }
  }

  svg.addEventListener('mousedown', ev => {
    if (!editable || ev.button !== 0) return;
    ev.preventDefault();
    const p = point(ev);
    if (polygon) { polygon.points.push(p); render(); return; }
    const t = ev.target;
    if (t.dataset && t.dataset.handle !== undefined) {
      drag = { kind: 'resize', i: +t.dataset.handle, start: p, orig: regions[+t.dataset.handle].rect.slice() };
    } else if (t.dataset && t.dataset.index !== undefined) {
      const i = +t.dataset.index; select(i);
      drag = { kind: 'move', i, start: p, orig: regions[i].rect.slice(), ignore: JSON.parse(JSON.stringify(regions[i].ignore)) };
    } else {
      regions.push({ name: freshName(), from: null, rect: [p[0], p[1], 0, 0], ignore: [], changed: true, keys: [], px: false });
      select(regions.length - 1);
      drag = { kind: 'draw', i: regions.length - 1, start: p };
    }
  });
  window.addEventListener('mousemove', ev => {
    if (!drag) return;
    const p = point(ev), r = regions[drag.i];
    if (drag.kind === 'draw') {
      r.rect = [Math.min(p[0], drag.start[0]), Math.min(p[1], drag.start[1]),
        Math.abs(p[0] - drag.start[0]), Math.abs(p[1] - drag.start[1])];
    } else if (drag.kind === 'move') {
      const dx = clamp(p[0] - drag.start[0], -drag.orig[0], 1 - drag.orig[0] - drag.orig[2]);
      const dy = clamp(p[1] - drag.start[1], -drag.orig[1], 1 - drag.orig[1] - drag.orig[3]);
      r.rect = [drag.orig[0] + dx, drag.orig[1] + dy, drag.orig[2], drag.orig[3]];
      r.ignore = drag.ignore.map(poly => poly.map(q => [q[0] + dx, q[1] + dy]));
    } else {
      r.rect = [drag.orig[0], drag.orig[1], Math.max(MIN, p[0] - drag.orig[0]), Math.max(MIN, p[1] - drag.orig[1])];
    }
    r.changed = true;
    render();
  });
  window.addEventListener('mouseup', () => {
    if (!drag) return;
    const r = regions[drag.i];
    if (drag.kind === 'draw' && (r.rect[2] < MIN || r.rect[3] < MIN)) { regions.splice(drag.i, 1); selected = -1; }
    drag = null; render();
  });

  nameInput.addEventListener('input', () => {
    if (selected < 0) return;
    regions[selected].name = nameInput.value.trim(); regions[selected].changed = true; render();
  });
  polyBtn.onclick = () => { if (selected >= 0 && regions[selected].rect) { polygon = { points: [] }; polyDone.hidden = false; say('click the polygon\'s points on the frame'); } };
  polyDone.onclick = () => {
    if (polygon && polygon.points.length >= 3 && selected >= 0) {
      regions[selected].ignore.push(polygon.points); regions[selected].changed = true;
    }
    polygon = null; polyDone.hidden = true; render();
  };
  document.getElementById('clearpoly').onclick = () => { if (selected >= 0) { regions[selected].ignore = []; regions[selected].changed = true; render(); } };
  document.getElementById('delete').onclick = () => { if (selected >= 0) { regions.splice(selected, 1); selected = -1; render(); } };
  document.getElementById('discard').onclick = () => { load(); };

  document.getElementById('save').onclick = async () => {
    if (regions.some(r => r.changed && !r.rect)) { say('a changed region has no rectangle', 'bad'); return; }
    const body = {
      base, regions: regions.map(r => r.changed || !r.from
        ? { name: r.name, from: r.from, rect: r.rect, ignore: r.ignore }
        : { name: r.name, from: r.from })
    };
    say('checking and saving …'); problems.textContent = '';
    try {
      const resp = await fetch(api, {
        method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body)
      });
      const j = await resp.json();
      if (resp.ok) { await load(); say('saved to ' + j.saved + ' and reloaded', 'good'); return; }
      say(j.error || ('HTTP ' + resp.status), 'bad');
      if (j.problems) problems.textContent = j.problems.join('\n');
      if (j.text) problems.textContent = j.text;
    } catch (e) { say('request failed: ' + e, 'bad'); }
  };

  // The frame: one still a second (the live view's overlaid JPEG), so the regions can be
  // placed on what the camera sees now.
  let busy = false;
  async function frame() {
    if (busy) return; busy = true;
    try {
      const r = await fetch('/live/' + encodeURIComponent(CAMERA) + '/frame.jpg', { cache: 'no-store', credentials: 'same-origin' });
      if (r.ok) {
        const url = URL.createObjectURL(await r.blob());
        const old = img.src; img.src = url;
        if (old.startsWith('blob:')) URL.revokeObjectURL(old);
      }
    } catch (e) { /* next tick */ }
    busy = false;
  }
  frame(); setInterval(frame, 1000);
  load();
})();
