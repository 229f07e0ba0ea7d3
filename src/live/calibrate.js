// Calibration page: starts a capture of the chosen region's scores on the running daemon,
// shows its progress, then the proposal (histogram of the scores' logits with T1 and T2, the
// rates) and lets the engineer accept it (written to the state directory, daemon reloaded) or
// discard it.
(function () {
  const base = '/api/calibration/' + encodeURIComponent(CAMERA);
  const $ = id => document.getElementById(id);
  const regionSel = $('region');
  let timer = null;

  function post(action, body) {
    return fetch(base + '/' + action, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body)
    });
  }
  function region() { return regionSel.value; }
  function logit(p) { const e = 1e-6; p = Math.min(1 - e, Math.max(e, p)); return Math.log(p / (1 - p)); }

  async function regions() {
    const r = await fetch('/api/regions/' + encodeURIComponent(CAMERA), { credentials: 'same-origin' });
    const names = r.ok ? (await r.json()).regions.map(x => x.name) : [];
    regionSel.innerHTML = '';
    (names.length ? names : ['']).forEach(n => {
      const o = document.createElement('option');
      o.value = n; o.textContent = n || '(whole frame)';
      regionSel.appendChild(o);
    });
  }

  function histogram(cal) {
    const svg = $('hist'), h = cal.stats.histogram, W = 400, H = 100;
    const max = Math.max(1, ...h.counts), bw = W / h.counts.length;
    const x = l => (Math.min(h.logit_hi, Math.max(h.logit_lo, l)) - h.logit_lo) / (h.logit_hi - h.logit_lo) * W;
    let out = '';
    h.counts.forEach((c, i) => {
      const bh = c / max * H;
      out += `<rect x="${i * bw}" y="${H - bh}" width="${Math.max(1, bw - 1)}" height="${bh}" fill="#0b5cad"></rect>`;
    });
    [['T1', cal.t1, '#e6aa00'], ['T2', cal.t2, '#d32020']].forEach(([n, t, c]) => {
      const xx = x(logit(t));
      out += `<line x1="${xx}" x2="${xx}" y1="0" y2="${H}" stroke="${c}" stroke-width="2"></line>` +
        `<text x="${xx + 3}" y="12" font-size="11" fill="${c}">${n} ${t.toFixed(4)}</text>`;
    });
    out += `<text x="0" y="115" font-size="10">logit ${h.logit_lo}</text><text x="${W - 50}" y="115" font-size="10">logit ${h.logit_hi}</text>`;
    svg.innerHTML = out;
  }

  function show(s) {
    const prog = $('progress');
    if (s.state === 'idle') { prog.textContent = 'no capture'; $('proposal').hidden = true; return false; }
    if (s.state === 'running') {
      prog.textContent = `capturing: ${s.n} / ${s.target} frames (${s.elapsed_s.toFixed(0)} s)`;
      $('proposal').hidden = true; return true;
    }
    if (s.state === 'failed') { prog.textContent = 'capture failed: ' + s.error; prog.className = 'status bad'; return false; }
    const c = s.proposal;
    prog.textContent = `done: ${s.n} good frames`; prog.className = 'status good';
    $('proposal').hidden = false;
    histogram(c);
    const rows = [
      ['T2 (NG at or above)', c.t2.toFixed(4)], ['T1 (UNKNOWN from)', c.t1.toFixed(4)],
      ['target false-NG rate per frame', c.target_rate], ['UNKNOWN rate per frame', c.unknown_rate],
      ['lowest rate the sample supports', c.min_supported_rate.toExponential(2)],
      ['false alarms per frame under the debounce (independent frames)', c.alarm_rate === null ? '–' : c.alarm_rate.toExponential(2)],
      ['scores min / max', c.stats.min.toFixed(4) + ' / ' + c.stats.max.toFixed(4)]
    ].concat(c.stats.quantiles.map(q => ['quantile ' + q[0], q[1].toFixed(4)]));
    $('numbers').innerHTML = rows.map(r => `<tr><th>${r[0]}</th><td>${r[1]}</td></tr>`).join('');
    const notes = c.notes.slice();
    if (!s.uses_calibration) notes.push('this region decides with a hand-set threshold: set calibration = true for it to use this calibration');
    $('notes').innerHTML = '';
    notes.forEach(n => { const li = document.createElement('li'); li.textContent = n; $('notes').appendChild(li); });
    return false;
  }

  async function poll() {
    try {
      const r = await fetch(base + '?region=' + encodeURIComponent(region()), { credentials: 'same-origin', cache: 'no-store' });
      const running = show(await r.json());
      if (!running && timer) { clearInterval(timer); timer = null; }
    } catch (e) { /* next tick */ }
  }

  $('go').onclick = async () => {
    $('result').textContent = '';
    const body = { region: region(), frames: +$('frames').value, rate: +$('rate').value, min_interval_ms: +$('interval').value };
    const r = await post('start', body);
    const j = await r.json();
    if (!r.ok) { $('progress').textContent = j.error; $('progress').className = 'status bad'; return; }
    $('progress').className = 'status';
    if (!timer) timer = setInterval(poll, 500);
    poll();
  };
  $('accept').onclick = async () => {
    const r = await post('accept', { region: region() });
    const j = await r.json();
    $('result').textContent = r.ok ? `saved calibration ${j.id} (T1 ${j.t1.toFixed(4)}, T2 ${j.t2.toFixed(4)}) to ${j.saved}; reloaded` : j.error;
    $('result').className = 'status ' + (r.ok ? 'good' : 'bad');
    $('proposal').hidden = true;
  };
  $('discard').onclick = async () => { await post('discard', { region: region() }); $('proposal').hidden = true; poll(); };
  // Few-shot reference: capture K crops, the daemon builds the bank, accept or discard.
  let refTimer = null;
  async function refPoll() {
    try {
      const r = await fetch('/api/reference/' + encodeURIComponent(CAMERA) + '?region=' + encodeURIComponent(region()),
        { credentials: 'same-origin', cache: 'no-store' });
      const s = await r.json();
      const p = $('refprogress');
      $('refdone').hidden = s.state !== 'done';
      if (s.state === 'idle') p.textContent = '';
      else if (s.state === 'running') p.textContent = `capturing: ${s.n} / ${s.target} frames`;
      else if (s.state === 'building') p.textContent = 'building the bank …';
      else if (s.state === 'failed') { p.textContent = 'failed: ' + s.error; p.className = 'status bad'; }
      else { p.textContent = `built: K = ${s.target}, ${(s.bytes / 1048576).toFixed(2)} MiB of features`; p.className = 'status good'; }
      if (s.state !== 'running' && s.state !== 'building' && refTimer) { clearInterval(refTimer); refTimer = null; }
    } catch (e) { /* next tick */ }
  }
  $('refgo').onclick = async () => {
    $('refresult').textContent = '';
    const r = await post('reference-start', { region: region(), frames: +$('refk').value, min_interval_ms: +$('refinterval').value });
    const j = await r.json();
    if (!r.ok) { $('refprogress').textContent = j.error; $('refprogress').className = 'status bad'; return; }
    $('refprogress').className = 'status';
    if (!refTimer) refTimer = setInterval(refPoll, 500);
    refPoll();
  };
  $('refaccept').onclick = async () => {
    const r = await post('reference-accept', { region: region() });
    const j = await r.json();
    $('refresult').textContent = r.ok ? `saved bank ${j.id} to ${j.saved}; reloaded` : j.error;
    $('refresult').className = 'status ' + (r.ok ? 'good' : 'bad');
    $('refdone').hidden = true;
  };
  $('refdiscard').onclick = async () => { await post('reference-discard', { region: region() }); refPoll(); };
  regionSel.onchange = () => { poll(); refPoll(); };
  // Ready once the first status is on the page: its text changes the layout, so a click aimed
  // before it could land beside the button.
  regions().then(async () => { await poll(); await refPoll(); window.CALIBRATE_READY = true; });
})();
