// Speech Latency Lab: low-latency PCM player and in-browser latency measurement.
//
// One WebSocket per page (/lab/pcm?listener=<random id>) carries runs' PCM from the server (web/pcm.py), and the
// page's clicks to it: a click on Compare or Play sends its start at once (lab.start), so the run does not wait
// for Gradio's event. Chunks are scheduled back to back with Web Audio behind a small jitter buffer; the page
// reports per run when the first chunk arrived and when the first audible sample was played, in ms from the
// server's request stamp (the page's clock is related to the server's by ping/pong) and from the click (the
// page's own clock). Runs with transport "gradio" are measured on Gradio's own streaming <audio> element
// (#player-N audio) instead.
//
// Plain script, no build step, no libraries. Exposes window.labAudio.
(function () {
  "use strict";
  if (window.labAudio) return; // loaded twice (Gradio may re-insert <head> content): keep the first

  var DEFAULT_JITTER_MS = 60;
  var SLOTS = 6;
  var PINGS_AT_CONNECT = 10;
  var PINGS_BEFORE_RUN = 3;
  var PING_SPACING_MS = 15;
  var PERIODIC_PING_MS = 10000;
  var CLOCK_SAMPLES_KEPT = 30; // the best of the recent round trips; old ones age out (clock drift)
  var RECONNECT_MS = 1000;
  var UI_TICK_MS = 100;
  // A chunk whose slot in the schedule is less than one render quantum away can no longer start on time.
  var RENDER_QUANTUM_FRAMES = 128;
  // A report waits at most this long for the first audible sample to play (e.g. audio blocked by autoplay).
  var HEARD_WAIT_LIMIT_MS = 30000;

  var scriptUrl = (document.currentScript && document.currentScript.src) || location.href;

  function randomId() {
    var bytes = new Uint8Array(8);
    crypto.getRandomValues(bytes); // works on plain http too, unlike crypto.randomUUID
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  var lab = {
    listenerId: randomId(),
    jitterMs: DEFAULT_JITTER_MS,
    lastClick: null, // {id: the button's, t_ms: the click event's own time stamp}
    clicks: {}, // comparison id -> the click that started it (performance.now() ms)
    reports: {}, // run_id -> report sent
    played: {}, // run_id -> true once its audio ended
    clock: { offsetMs: null, uncertaintyMs: null, samples: [] },
    connected: false,
    log: [], // short diagnostics, newest last
  };
  window.labAudio = lab;

  function note(text) {
    lab.log.push(Math.round(performance.now()) + " ms: " + text);
    if (lab.log.length > 50) lab.log.shift();
  }

  // -- clock: server perf_counter ms ~= performance.now() + offsetMs ---------------------------------------
  function toServerMs(perfMs) {
    return lab.clock.offsetMs === null ? null : perfMs + lab.clock.offsetMs;
  }

  function onPong(msg) {
    var t1 = performance.now();
    var t0 = msg.t_client_ms;
    var rttMs = t1 - t0;
    var samples = lab.clock.samples;
    samples.push({ rttMs: rttMs, offsetMs: msg.t_server_s * 1000 - (t0 + t1) / 2, atMs: t1 });
    if (samples.length > CLOCK_SAMPLES_KEPT) samples.shift();
    var best = samples[0];
    for (var i = 1; i < samples.length; i++) if (samples[i].rttMs < best.rttMs) best = samples[i];
    lab.clock.offsetMs = best.offsetMs;
    lab.clock.uncertaintyMs = best.rttMs / 2;
  }

  function ping(count) {
    for (var i = 0; i < count; i++) {
      setTimeout(function () { sendJson({ type: "ping", t_client_ms: performance.now() }); }, i * PING_SPACING_MS);
    }
  }

  // -- socket ----------------------------------------------------------------------------------------------
  var socket = null;

  function socketUrl() {
    var url = new URL("pcm", scriptUrl); // next to player.js: /lab/pcm, also under a proxy's root path
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = "?listener=" + encodeURIComponent(lab.listenerId);
    return url.href;
  }

  function sendJson(obj) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  function connect() {
    var ws = new WebSocket(socketUrl());
    ws.binaryType = "arraybuffer";
    socket = ws;
    ws.onopen = function () {
      lab.connected = true;
      note("socket open");
      ping(PINGS_AT_CONNECT);
    };
    ws.onmessage = function (event) {
      var arrival = performance.now();
      if (typeof event.data === "string") onText(JSON.parse(event.data), arrival);
      else onChunk(event.data, arrival);
    };
    ws.onclose = function () {
      if (socket === ws) {
        lab.connected = false;
        note("socket closed; reconnecting");
        socket = null;
        setTimeout(connect, RECONNECT_MS);
      }
    };
  }

  function onText(msg, arrival) {
    if (msg.type === "pong") onPong(msg);
    else if (msg.type === "run" && !replaced[msg.comparison_id]) startRun(msg);
    else if (msg.type === "end") endRun(msg);
    else if (msg.type === "done") voiceArrived(msg.comparison_id);
  }

  function onChunk(buffer, arrival) {
    var view = new DataView(buffer);
    var headLen = view.getUint32(0, true);
    var header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, headLen)));
    var pcm = new Int16Array(buffer.slice(4 + headLen)); // copy: the Int16Array needs 2-byte alignment
    var samples = new Float32Array(pcm.length);
    for (var i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32767;
    addChunk(header, samples, arrival);
  }

  // -- audio context ---------------------------------------------------------------------------------------
  var ctx = null;

  function audioContext() {
    if (!ctx) {
      var Ctor = window.AudioContext || window.webkitAudioContext;
      ctx = new Ctor({ latencyHint: "interactive" });
    }
    if (ctx.state === "suspended") ctx.resume().catch(function () {});
    return ctx;
  }

  function outputLatencyS() {
    if (ctx.outputLatency > 0) return ctx.outputLatency;
    return ctx.baseLatency > 0 ? ctx.baseLatency : 0;
  }

  // performance.now() at which context time ctxTimeS leaves the speakers. getOutputTimestamp() pairs the
  // context time being output by the device with its performance time, so it already carries the output
  // latency (measured in Chromium: its contextTime trails currentTime by outputLatency plus a render quantum);
  // only the fallback from currentTime (which runs ahead of the speakers) adds the reported latency.
  function perfAtCtxTime(ctxTimeS) {
    var ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (ts && ts.performanceTime > 0 && ts.contextTime > 0) {
      return ts.performanceTime + (ctxTimeS - ts.contextTime) * 1000;
    }
    return performance.now() + (ctxTimeS - ctx.currentTime) * 1000 + outputLatencyS() * 1000;
  }

  // Whether the device's output has reached context time ctxTimeS (getOutputTimestamp's contextTime is what is
  // leaving the speakers now); without that API, whether currentTime less the output latency has.
  function outputPassed(ctxTimeS) {
    var ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (ts && ts.contextTime > 0) return ts.contextTime >= ctxTimeS;
    return ctx.currentTime - outputLatencyS() >= ctxTimeS;
  }

  function jitterS() {
    var input = document.querySelector("#jitter-ms input");
    if (input && input.value !== "" && isFinite(Number(input.value))) lab.jitterMs = Math.max(0, Number(input.value));
    return lab.jitterMs / 1000;
  }

  // -- slots -----------------------------------------------------------------------------------------------
  var slots = [];

  function newSlot(index) {
    return {
      index: index, run: null, gain: null, lastPcm: null, replay: null, ui: null,
    };
  }
  for (var s = 0; s < SLOTS; s++) slots.push(newSlot(s));

  function slotFor(index) {
    index = Number(index) || 0;
    while (slots.length <= index) slots.push(newSlot(slots.length));
    return slots[index];
  }

  // Silence everything the slot plays now: the sources hang off one gain node, dropped here.
  function silence(slot) {
    if (slot.gain) {
      try { slot.gain.disconnect(); } catch (e) { /* already */ }
    }
    slot.gain = null;
    if (slot.replay) {
      slot.replay.onended = null;
      try { slot.replay.stop(); } catch (e) { /* not started */ }
      slot.replay = null;
    }
    if (slot.run) {
      slot.run.sources.forEach(function (src) {
        src.onended = null;
        try { src.stop(); } catch (e) { /* not started */ }
      });
      slot.run.sources = [];
      if (slot.run.timer) clearTimeout(slot.run.timer);
    }
  }

  function freshGain(slot) {
    var c = audioContext();
    slot.gain = c.createGain();
    slot.gain.connect(c.destination);
    return slot.gain;
  }

  function startRun(msg) {
    var slot = slotFor(msg.slot);
    silence(slot);
    var transport = msg.transport || "pcm";
    slot.run = {
      id: msg.run_id, label: msg.label || "", transport: transport, msg: msg,
      sampleRate: msg.sample_rate, tRequestMs: msg.t_request_s * 1000, startPerfMs: performance.now(),
      chunks: [], receivedSamples: 0, segments: [], sources: [],
      nextStartCtxS: null, jitterS: jitterS(), underruns: 0, gapS: 0,
      firstAudibleCtxS: null, firstStartCtxS: null, audible: false,
      firstChunkPerfMs: null, lastChunkPerfMs: null, jitterMsMax: 0, lastArrivalGapMs: null,
      end: null, complete: false, reportSent: false, playedSent: false, timer: null,
      state: "started · waiting for first audio",
    };
    slot.lastPcm = null;
    ping(PINGS_BEFORE_RUN);
    if (transport === "gradio") startGradioRun(slot);
    else freshGain(slot);
    renderSlot(slot);
  }

  function addChunk(header, samples, arrivalPerfMs) {
    var slot = slotFor(header.slot);
    var run = slot.run;
    if (!run || String(run.id) !== String(header.run_id) || run.transport !== "pcm") return; // stale run
    var c = audioContext();
    var rate = header.sample_rate || run.sampleRate;
    // The page announces a run before its model has said its rate (0 in the run message): the first chunk's header
    // gives it, and the slot's progress, its state in seconds and its replay read it from the run.
    if (!run.sampleRate) run.sampleRate = rate;
    noteArrival(run, header, samples.length, rate, arrivalPerfMs);
    run.chunks.push(samples);
    run.receivedSamples += samples.length;

    var startS = scheduleStart(run, c, samples.length / rate);
    var buffer = c.createBuffer(1, samples.length, rate);
    buffer.getChannelData(0).set(samples);
    var src = c.createBufferSource();
    src.buffer = buffer;
    src.connect(slot.gain || freshGain(slot));
    src.start(startS);
    src.onended = function () { onSourceEnded(slot, run, src); };
    run.sources.push(src);
    run.segments.push({ startS: startS, durS: samples.length / rate });
    run.nextStartCtxS = startS + samples.length / rate;

    if (run.firstStartCtxS === null) run.firstStartCtxS = startS;
    if (run.firstAudibleCtxS === null && header.audible_at >= 0) {
      run.firstAudibleCtxS = startS + header.audible_at / rate;
      run.audible = true;
    }
    if (run.state !== "done") run.state = "playing";
    voiceArrived(run.msg.comparison_id);
    maybeReport(slot, run);
  }

  // Where the next chunk starts: right after the previous one, or, at the start and when the schedule ran dry (a
  // browser underrun), once the jitter buffer holds its length of audio. A chunk that holds that much already
  // plays at once (one render quantum ahead, so that it is not scheduled in the past): waiting would only add
  // latency, since the chunk itself is the cushion. The silence of an underrun is counted.
  function scheduleStart(run, c, chunkS) {
    var nowS = c.currentTime;
    var quantumS = RENDER_QUANTUM_FRAMES / c.sampleRate;
    var bufferedS = nowS + quantumS + Math.max(0, run.jitterS - chunkS);
    if (run.nextStartCtxS === null) return bufferedS;
    if (run.nextStartCtxS > nowS + quantumS) return run.nextStartCtxS;
    run.underruns += 1;
    run.gapS += bufferedS - run.nextStartCtxS;
    return bufferedS;
  }

  // Arrival bookkeeping: first/last arrival, and jitter as the largest lateness against the audio's own pace.
  function noteArrival(run, header, nSamples, rate, arrivalPerfMs) {
    if (run.firstChunkPerfMs === null) {
      run.firstChunkPerfMs = arrivalPerfMs;
      run.firstChunkHeader = header;
    } else {
      var audioSoFarMs = run.receivedSamples / rate * 1000;
      var latenessMs = (arrivalPerfMs - run.firstChunkPerfMs) - audioSoFarMs;
      if (latenessMs > run.jitterMsMax) run.jitterMsMax = latenessMs;
    }
    run.lastChunkPerfMs = arrivalPerfMs;
  }

  function endRun(msg) {
    var slot = slotFor(msg.slot);
    var run = slot.run;
    if (!run || String(run.id) !== String(msg.run_id)) return;
    run.end = msg;
    if (run.transport === "gradio") { maybeReportGradio(slot, run); return; }
    maybeReport(slot, run);
  }

  function maybeReport(slot, run) {
    if (!run.end || run.reportSent) return;
    run.complete = run.chunks.length >= run.end.chunks;
    if (!run.complete) return;
    var heardCtxS = run.firstAudibleCtxS !== null ? run.firstAudibleCtxS : run.firstStartCtxS;
    var heardPerfMs = heardCtxS === null ? null : perfAtCtxTime(heardCtxS);
    var waitMs = heardPerfMs === null ? 0 : heardPerfMs - performance.now();
    // Sent once the device's output has passed the first audible sample, and mapped to the page's clock with the
    // output timestamp from after it: while the audio thread is starved (many pages on two cores) the timestamp
    // pair stops moving, and an earlier one put the sound up to 366 ms too early (docs/RESULTS.md, "8 pages at
    // once"). A context that does not run (autoplay blocked) still gets its report, after a bound, without a figure.
    var notYetOut = heardCtxS !== null && !outputPassed(heardCtxS);
    if ((waitMs > 0 || notYetOut) && performance.now() - run.startPerfMs < HEARD_WAIT_LIMIT_MS) {
      clearTimeout(run.timer);
      run.timer = setTimeout(function () { maybeReport(slot, run); }, Math.min(Math.max(waitMs, 10) + 5, 1000));
      return;
    }
    // A context that never ran played nothing: no heard figure rather than a made-up one.
    if (!ctx || ctx.state !== "running") heardPerfMs = null;
    sendReport(slot, run, buildPcmReport(run, heardPerfMs));
    maybePlayed(slot, run);
  }

  function sinceRequestMs(run, perfMs) {
    var serverMs = perfMs === null ? null : toServerMs(perfMs);
    return serverMs === null ? null : serverMs - run.tRequestMs;
  }

  function buildPcmReport(run, heardPerfMs) {
    return {
      type: "report", run_id: run.id, transport: "pcm",
      // sent: the server's own stamp (its clock, like t_request_s) when the first chunk went on the socket
      sent_ms: run.firstChunkHeader ? run.firstChunkHeader.t_sent_s * 1000 - run.tRequestMs : null,
      received_ms: sinceRequestMs(run, run.firstChunkPerfMs),
      received_last_ms: sinceRequestMs(run, run.lastChunkPerfMs),
      heard_ms: sinceRequestMs(run, heardPerfMs),
      click_to_received_ms: sinceClickMs(run, run.firstChunkPerfMs),
      click_to_heard_ms: sinceClickMs(run, heardPerfMs),
      audible: run.audible,
      underruns: run.underruns, gap_s: run.gapS, complete: run.complete,
      chunks: run.chunks.length, samples: run.receivedSamples,
      output_latency_ms: outputLatencyS() * 1000,
      clock_uncertainty_ms: lab.clock.uncertaintyMs,
      jitter_ms: run.jitterMsMax, jitter_buffer_ms: run.jitterS * 1000,
      ctx_state: ctx ? ctx.state : "none",
    };
  }

  function sendReport(slot, run, report) {
    run.reportSent = true;
    run.report = report;
    lab.reports[run.id] = report;
    sendJson(report);
    renderSlot(slot);
  }

  function onSourceEnded(slot, run, src) {
    if (slot.run !== run) return;
    var i = run.sources.indexOf(src);
    if (i >= 0) run.sources.splice(i, 1);
    maybePlayed(slot, run);
  }

  // "played" once every chunk of a complete run has been scheduled and played out.
  function maybePlayed(slot, run) {
    if (run.playedSent || !run.reportSent || !run.complete || run.sources.length > 0) return;
    run.playedSent = true;
    run.state = "done";
    slot.lastPcm = { chunks: run.chunks, sampleRate: run.sampleRate };
    lab.played[run.id] = true;
    sendJson({ type: "played", run_id: run.id, transport: run.transport });
    renderSlot(slot);
  }

  // -- Gradio transport: measure Gradio's streaming <audio> (hls.js) in #player-N ---------------------------
  var hookedAudio = new WeakSet();
  var resourceEntries = [];

  if (window.PerformanceObserver) {
    try {
      new PerformanceObserver(function (list) {
        list.getEntries().forEach(function (e) { resourceEntries.push(e); onResource(e); });
        if (resourceEntries.length > 500) resourceEntries.splice(0, resourceEntries.length - 500);
      }).observe({ type: "resource", buffered: true });
    } catch (e) { note("no resource observer: " + e); }
  }

  function gradioAudio(slot) {
    return document.querySelector("#player-" + slot.index + " audio");
  }

  // Stream segments of this run: the path the run message names (stream_path), else any Gradio stream
  // segment (not the playlist) requested after the run started.
  function isRunSegment(run, entry) {
    var path = run.msg.stream_path || "/stream/";
    return entry.name.indexOf(path) >= 0 && entry.name.indexOf(".m3u8") < 0 && entry.startTime >= run.startPerfMs;
  }

  function onResource(entry) {
    slots.forEach(function (slot) {
      var run = slot.run;
      if (run && run.transport === "gradio" && run.firstChunkPerfMs === null && isRunSegment(run, entry)) {
        run.firstChunkPerfMs = entry.responseEnd;
        maybeReportGradio(slot, run);
      }
    });
  }

  function startGradioRun(slot) {
    var run = slot.run;
    run.gradio = { firstPlayingPerfMs: null, firstPlayingMediaS: null, waitingSincePerfMs: null, ended: false };
    var audio = gradioAudio(slot);
    if (audio) {
      hookAudio(slot, audio);
      try { audio.pause(); audio.currentTime = 0; } catch (e) { /* no media yet */ }
    }
    var known = resourceEntries.slice(); // entries buffered before the observer callback ran
    known.forEach(onResource);
  }

  function hookAudio(slot, audio) {
    if (hookedAudio.has(audio)) return;
    hookedAudio.add(audio);
    // A new stream must not start where the last clip stopped: back to 0 until this run has played.
    audio.addEventListener("loadedmetadata", function () {
      var run = slot.run;
      if (run && run.transport === "gradio" && run.gradio.firstPlayingPerfMs === null && audio.currentTime > 0) {
        audio.currentTime = 0;
      }
    });
    audio.addEventListener("playing", function () { onGradioPlaying(slot, audio); });
    audio.addEventListener("waiting", function () { onGradioWaiting(slot); });
    audio.addEventListener("ended", function () { onGradioEnded(slot); });
  }

  function gradioRun(slot) {
    var run = slot.run;
    return run && run.transport === "gradio" ? run : null;
  }

  function onGradioPlaying(slot, audio) {
    var run = gradioRun(slot);
    if (!run) return;
    var g = run.gradio;
    var now = performance.now();
    if (g.firstPlayingPerfMs === null) {
      g.firstPlayingPerfMs = now;
      g.firstPlayingMediaS = audio.currentTime;
      run.state = "playing";
    } else if (g.waitingSincePerfMs !== null) {
      run.gapS += (now - g.waitingSincePerfMs) / 1000;
    }
    g.waitingSincePerfMs = null;
    maybeReportGradio(slot, run);
    renderSlot(slot);
  }

  function onGradioWaiting(slot) {
    var run = gradioRun(slot);
    if (!run || run.gradio.firstPlayingPerfMs === null || run.gradio.waitingSincePerfMs !== null) return;
    run.underruns += 1;
    run.gradio.waitingSincePerfMs = performance.now();
  }

  function onGradioEnded(slot) {
    var run = gradioRun(slot);
    if (!run) return;
    run.gradio.ended = true;
    run.state = "done";
    maybeReportGradio(slot, run);
    if (run.reportSent && !run.playedSent) {
      run.playedSent = true;
      lab.played[run.id] = true;
      sendJson({ type: "played", run_id: run.id, transport: "gradio" });
    }
    renderSlot(slot);
  }

  function maybeReportGradio(slot, run) {
    var g = run.gradio;
    if (run.reportSent || !run.end || g.firstPlayingPerfMs === null) return;
    run.complete = true;
    var firstAudibleS = Number(run.end.first_audible_s || 0);
    // The media time of the first audible sample, counted from the first 'playing' event and its position;
    // the element's own output latency is not exposed, the page's AudioContext's (same device) stands in.
    var aheadMs = Math.max(0, firstAudibleS - g.firstPlayingMediaS) * 1000;
    var heardPerfMs = g.firstPlayingPerfMs + aheadMs + (ctx ? outputLatencyS() * 1000 : 0);
    var waitMs = heardPerfMs - performance.now();
    if (waitMs > 0) {
      clearTimeout(run.timer);
      run.timer = setTimeout(function () { maybeReportGradio(slot, run); }, waitMs + 5);
      return;
    }
    sendReport(slot, run, {
      type: "report", run_id: run.id, transport: "gradio",
      // sent: the server's own stamp (its clock, like t_request_s) when the first chunk went on the socket
      sent_ms: run.firstChunkHeader ? run.firstChunkHeader.t_sent_s * 1000 - run.tRequestMs : null,
      received_ms: sinceRequestMs(run, run.firstChunkPerfMs),
      received_last_ms: null,
      heard_ms: sinceRequestMs(run, heardPerfMs),
      click_to_received_ms: sinceClickMs(run, run.firstChunkPerfMs),
      click_to_heard_ms: sinceClickMs(run, heardPerfMs),
      audible: run.end.first_audible_s !== undefined,
      underruns: run.underruns, gap_s: run.gapS, complete: true,
      start_position_s: g.firstPlayingMediaS,
      output_latency_ms: ctx ? outputLatencyS() * 1000 : null,
      clock_uncertainty_ms: lab.clock.uncertaintyMs, jitter_ms: null,
    });
    if (g.ended) onGradioEnded(slot);
  }

  // -- replay ----------------------------------------------------------------------------------------------
  function replay(index) {
    var slot = slotFor(index);
    var last = slot.lastPcm;
    if (!last || !last.chunks.length) return false;
    silence(slot);
    var c = audioContext();
    var total = 0;
    last.chunks.forEach(function (ch) { total += ch.length; });
    var buffer = c.createBuffer(1, total, last.sampleRate);
    var data = buffer.getChannelData(0);
    var at = 0;
    last.chunks.forEach(function (ch) { data.set(ch, at); at += ch.length; });
    var src = c.createBufferSource();
    src.buffer = buffer;
    src.connect(freshGain(slot));
    var startS = c.currentTime + 0.02;
    src.start(startS); // always from sample 0
    slot.replay = src;
    slot.replayInfo = { startS: startS, durS: total / last.sampleRate };
    src.onended = function () {
      if (slot.replay === src) { slot.replay = null; renderSlot(slot); }
    };
    renderSlot(slot);
    return true;
  }

  // -- state for the UI and tests --------------------------------------------------------------------------
  function playedS(run) {
    if (!ctx || !run) return 0;
    var nowS = ctx.currentTime;
    var total = 0;
    run.segments.forEach(function (seg) { total += Math.min(Math.max(nowS - seg.startS, 0), seg.durS); });
    return total;
  }

  function slotState(index) {
    var slot = slotFor(index);
    var run = slot.run;
    if (!run) return { slot: slot.index, state: "waiting", run_id: null, position_s: 0, received_s: 0 };
    var rate = run.sampleRate || 1;
    var position = run.transport === "gradio"
      ? (gradioAudio(slot) ? gradioAudio(slot).currentTime : 0)
      : playedS(run);
    return {
      slot: slot.index, state: slot.replay ? "replaying" : run.state, run_id: run.id, label: run.label,
      transport: run.transport, position_s: position, received_s: run.receivedSamples / rate,
      chunks: run.chunks.length, underruns: run.underruns, gap_s: run.gapS, complete: run.complete,
      report: run.report || null, elapsed_ms: performance.now() - run.startPerfMs,
    };
  }

  // -- slot UI ---------------------------------------------------------------------------------------------
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Gradio may re-render the container (gr.HTML): rebuild the UI inside it whenever it went missing.
  function ensureUi(slot) {
    var container = document.getElementById("pcm-slot-" + slot.index);
    if (!container) return null;
    if (slot.ui && slot.ui.root.parentNode === container) return slot.ui;
    var root = el("div", "lab-pcm");
    root.style.cssText = "font:12px/1.4 system-ui,sans-serif;display:flex;flex-direction:column;gap:3px";
    var row = el("div");
    row.style.cssText = "display:flex;gap:8px;align-items:center";
    var button = el("button", "lab-pcm-replay", "▶ replay");
    button.type = "button";
    button.style.cssText = "font-size:12px;padding:1px 6px;cursor:pointer";
    button.addEventListener("click", function () { replay(slot.index); });
    var stateText = el("span", "lab-pcm-state", "waiting");
    row.appendChild(button);
    row.appendChild(stateText);
    var track = el("div");
    track.style.cssText = "height:3px;background:rgba(128,128,128,.25);border-radius:2px;overflow:hidden";
    var bar = el("div", "lab-pcm-bar");
    bar.style.cssText = "height:100%;width:0;background:#f97316";
    track.appendChild(bar);
    var figures = el("div", "lab-pcm-figures", "");
    figures.style.opacity = "0.8";
    root.appendChild(row);
    root.appendChild(track);
    root.appendChild(figures);
    container.textContent = "";
    container.appendChild(root);
    slot.ui = { root: root, button: button, state: stateText, bar: bar, figures: figures };
    return slot.ui;
  }

  function fmtMs(v) { return v === null || v === undefined ? "–" : Math.round(v) + " ms"; }

  function renderSlot(slot) {
    var ui = ensureUi(slot);
    if (!ui) return;
    var st = slotState(slot.index);
    var text = st.state;
    if (st.state === "started · waiting for first audio") text += " (" + (st.elapsed_ms / 1000).toFixed(1) + " s)";
    if (st.label) text = st.label + ": " + text;
    ui.state.textContent = text;
    var fraction = 0;
    if (slot.replay && slot.replayInfo && ctx) {
      fraction = (ctx.currentTime - slot.replayInfo.startS) / slot.replayInfo.durS;
    } else if (st.received_s > 0) {
      fraction = st.position_s / st.received_s;
    }
    ui.bar.style.width = (Math.min(Math.max(fraction, 0), 1) * 100).toFixed(1) + "%";
    var r = st.report;
    ui.figures.textContent = r
      ? "received " + fmtMs(r.received_ms) + " · heard " + fmtMs(r.heard_ms) + " · stalls " + r.underruns
      : "";
    ui.button.disabled = !slot.lastPcm || st.transport === "gradio";
  }

  function tick() {
    slots.forEach(function (slot) {
      // Gradio may create the run's <audio> element only once its stream starts.
      var audio = slot.run && slot.run.transport === "gradio" ? gradioAudio(slot) : null;
      if (audio) hookAudio(slot, audio);
      if (slot.run || slot.ui || document.getElementById("pcm-slot-" + slot.index)) renderSlot(slot);
    });
  }

  // -- clicks: a Compare or Play click starts its comparison over the socket ---------------------------------
  // The start goes from the click itself (this listener runs in the capture phase, before Gradio's own click
  // handling, which takes tens of ms on a busy machine), with the form's values as Gradio's change events last
  // reported them (lab.remember). Gradio's event then brings the values it sends: lab.start keeps the click's
  // comparison when they are the same, and replaces it when they are not.
  var CLICK_KINDS = { "compare-btn": "compare", "ab-play": "ab" };
  var CLICK_MAX_AGE_MS = 2000; // a start without a click this recent (a script, a key) is stamped when it is sent
  var forms = {}; // kind -> {names, values}: the form as Gradio's change events last reported it
  var early = {}; // kind -> {field, key, t_ms}: the start a click sent before Gradio's event
  var replaced = {}; // comparison id -> true: a click's start its Gradio event replaced (its runs are not played)
  // kind -> true from Gradio's event start to its end (lab.ended): Gradio takes no click meanwhile (its "once"
  // trigger mode), so neither does the early start
  var pending = {};
  lab.ended = function (kind) { delete pending[kind]; return []; };
  lab.remember = function (kind, names, values) {
    forms[kind] = { names: names, values: values.slice() };
    return [];
  };
  // Gradio's own click handling (its event's request, the status of every output, a copy of the form: 60-110 ms
  // of this thread on 2 cores) would run in the same task, while the start is on its way and the voice is being
  // made; the page would then take the first chunk late. So a click that sent its start is kept from Gradio and
  // handed to it again (the same button, clicked by script) once the voice is scheduled, as afterVoice did for its
  // request. The click's time stays the zero.
  var handingBack = null; // the click event given back to Gradio, which this listener lets through
  var holding = {};       // kind -> true while its click waits to be given back (later clicks are dropped)
  document.addEventListener("click", function (event) {
    if (event === handingBack) return;
    var button = event.target && event.target.closest ? event.target.closest("#compare-btn, #ab-play") : null;
    if (!button || button.disabled) return;
    var kind = CLICK_KINDS[button.id];
    if (holding[kind]) { event.stopImmediatePropagation(); return; }
    lab.lastClick = { id: button.id, t_ms: event.timeStamp, dispatched_ms: performance.now() };
    var form = forms[kind];
    delete early[kind];
    if (!form || pending[kind]) return;
    var field = sendStart(kind, form.names, form.values, event.timeStamp);
    early[kind] = { field: field, key: JSON.stringify(form.values), t_ms: event.timeStamp };
    var parts = field.split(":"); // listener, comparison id, "socket" when the start went over it
    if (parts[2] === "socket" && lab.voiceOverSocket) {
      event.stopImmediatePropagation();
      holding[kind] = true;
      whenVoiced(parts[1], function () { delete holding[kind]; handBack(button); });
    }
  }, true);

  function handBack(button) {
    handingBack = new MouseEvent("click", { bubbles: true, cancelable: true, view: window });
    try { button.dispatchEvent(handingBack); } finally { handingBack = null; }
  }

  function stopPlayers() {
    document.querySelectorAll("audio").forEach(function (a) {
      try { a.pause(); a.currentTime = 0; } catch (e) { /* no media */ }
    });
    lab.reset();
  }

  // The start with the values by name, then players back to 0 (inputs as Gradio sends them); returns what the
  // Gradio event carries in the listener field: "listener:comparison id:socket" ("listener:id:" when it could not
  // be sent, e.g. with a recording to upload: the server then starts it from the event).
  function sendStart(kind, names, values, clickMs) {
    var id = randomId();
    lab.clicks[id] = clickMs;
    var inputs = {};
    names.forEach(function (name, i) { inputs[name] = values[i] === undefined ? null : values[i]; });
    var serverMs = toServerMs(clickMs);
    var sendMs = performance.now();
    var sendServerMs = toServerMs(sendMs);
    // Over Gradio's transport the voice comes with Gradio's own event, and a pre-buffered pair plays once both
    // sides are made: nothing to wait for before the event.
    lab.voiceOverSocket = inputs.transport !== "gradio" && inputs.mode !== "prebuffered";
    var sent = !inputs.user_audio && sendJson({
      type: "start", kind: kind, id: id, inputs: inputs, t_click_ms: clickMs, t_send_ms: sendMs,
      t_click_s: serverMs === null ? null : serverMs / 1000,
      t_send_s: sendServerMs === null ? null : sendServerMs / 1000,
    });
    stopPlayers(); // after the send: nothing of the new comparison can arrive before this task ends
    note(kind + " " + id + (sent ? " started over the socket" : " left to the page's event"));
    return lab.listenerId + ":" + id + ":" + (sent ? "socket" : "");
  }

  // Gradio's event for a click (its js, with the values it will send): the click's own start when it had these
  // values, else a new one (the one the click sent, with other values, is stopped).
  lab.start = function (kind, names, values) {
    var now = performance.now();
    var click = lab.lastClick && now - lab.lastClick.t_ms < CLICK_MAX_AGE_MS ? lab.lastClick : null;
    lab.lastClick = null;
    var sent = early[kind];
    delete early[kind];
    pending[kind] = true;
    if (sent && click && sent.t_ms === click.t_ms) {
      if (sent.key === JSON.stringify(values)) {
        note(kind + " kept the click's start");
        return sent.field;
      }
      note(kind + ": the form changed after its last change event; the click's start is replaced");
      replaced[sent.field.split(":")[1]] = true;
      sendJson({ type: "stop", id: sent.field.split(":")[1] });
    }
    return sendStart(kind, names, values, click ? click.t_ms : now);
  };
  lab.stop = function () { sendJson({ type: "stop" }); };

  // The page's own work for a click (Gradio's event: the request, then a redraw of every slot, table and chart)
  // runs in this thread, where the socket's messages wait for it: it goes after the click's first voice. Resolves
  // to `value` once a chunk of the comparison is scheduled, it has ended, or VOICE_WAIT_MS have passed.
  var VOICE_WAIT_MS = 1500;
  var awaitingVoice = {}; // comparison id -> callbacks waiting for its first voice
  var voiced = {};        // comparison id -> true once its voice was scheduled (or it ended)
  function whenVoiced(id, callback) {
    if (voiced[id]) { callback(); return; }
    var timer = null;
    var once = function () { if (timer !== null) { clearTimeout(timer); timer = null; callback(); } };
    (awaitingVoice[id] = awaitingVoice[id] || []).push(once);
    timer = setTimeout(once, VOICE_WAIT_MS);
  }
  lab.afterVoice = function (listenerField, value) {
    var id = String(listenerField).split(":")[1];
    if (!id || String(listenerField).split(":")[2] !== "socket" || !lab.voiceOverSocket) return value;
    return new Promise(function (resolve) { whenVoiced(id, function () { resolve(value); }); });
  };
  function voiceArrived(comparisonId) {
    if (!comparisonId || voiced[comparisonId]) return;
    voiced[comparisonId] = true;
    var waiting = awaitingVoice[comparisonId] || [];
    delete awaitingVoice[comparisonId];
    waiting.forEach(function (callback) { callback(); });
  }

  function sinceClickMs(run, perfMs) {
    var clickMs = lab.clicks[run.msg.comparison_id];
    return clickMs === undefined || perfMs === null ? null : perfMs - clickMs;
  }

  // -- public API ------------------------------------------------------------------------------------------
  lab.setJitterMs = function (ms) { lab.jitterMs = Math.max(0, Number(ms) || 0); };
  lab.reset = function () {
    slots.forEach(function (slot) {
      silence(slot);
      slot.run = null;
      slot.lastPcm = null;
      var audio = gradioAudio(slot);
      if (audio) { try { audio.pause(); audio.currentTime = 0; } catch (e) { /* no media */ } }
      renderSlot(slot);
    });
  };
  lab.state = slotState;
  lab.replay = replay;
  lab.audioContext = function () { return audioContext(); };
  lab.ping = ping;
  // Closes the socket as a network drop would (tests); the page reconnects with the same listener id.
  lab.dropSocket = function () { if (socket) socket.close(); };

  // Autoplay: try at load (allowed by policy or flags); otherwise the first user gesture resumes it.
  try { audioContext(); } catch (e) { note("no AudioContext: " + e); }
  ["pointerdown", "keydown", "touchstart"].forEach(function (type) {
    document.addEventListener(type, function () { try { audioContext(); } catch (e) { /* none */ } }, true);
  });
  setInterval(tick, UI_TICK_MS);
  setInterval(function () { ping(1); }, PERIODIC_PING_MS);
  connect();
})();
