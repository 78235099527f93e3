// Speech Latency Lab, browser benchmark: an independent tap on what the page plays, from the click to the first
// audible sample rendered. Injected with Playwright's page.add_init_script (so it runs before any page script);
// it reads nothing of the page's own code (web/player.js), only the platform's events and audio:
//
//   clicks  a capture-phase listener on document: `click` and `pointerdown` on #compare-btn or #ab-play, stamped
//           with the event's own timeStamp (performance clock, ms, the moment the input event was created).
//   audio   every connection to an AudioDestinationNode (AudioNode.prototype.connect is wrapped) also feeds a
//           tap: an AudioWorkletNode, one per AudioContext, which sums what goes to the speakers. <audio> and
//           <video> elements (Gradio's HLS players) play outside Web Audio: each one that starts playing is
//           captured (element.captureStream()) into a tap context of the tap's own, one tap node per element.
//   onsets  in the audio thread, the RMS over a 10 ms window sliding in 1 ms steps (channels averaged); a window
//           at or above -50 dBFS (full scale 1.0, lab/measure/metrics.py's "audible") after at least 300 ms of windows
//           below it (or the first one ever) is an onset, stamped at the first 1 ms hop of that window that
//           reaches -50 dBFS on its own (the sound's first millisecond; the window's start if none does) as a
//           context time (currentFrame / sampleRate). The main thread maps that to the performance clock with
//           AudioContext.getOutputTimestamp(): performanceTime + (t - contextTime) * 1000, the moment the sample
//           leaves the output (the output latency is counted). For a captured element that is the moment the
//           captured copy would leave the tap context's output: it includes the capture's own latency.
//
// window.labTap: clicks, onsets, offsets (end of a loud stretch, once 300 ms of quiet followed), sources (the
// spans of scheduled AudioBufferSourceNodes, context and performance clocks, with their route: the node each one
// feeds, e.g. a player's per-run GainNode, so one clip's buffers can be told from the next one's), media
// (play/playing/pause/ended/waiting of media elements), errors. snapshot() gives all of it as plain data,
// reset() clears the lists, busy() says whether sound is still to come. Every time is performance-clock ms (t_ms)
// and also epoch ms (performance.timeOrigin + t_ms), comparable across pages.
(function () {
  "use strict";
  if (window.labTap) return;

  var CONFIG = { window_s: 0.010, hop_s: 0.001, audible_dbfs: -50, quiet_s: 0.300, buttons: "#compare-btn, #ab-play" };
  var TICK_S = 1.0; // the processor says how far it got, about once a second (proof that it runs)

  var tap = {
    version: 1, config: CONFIG, clicks: [], onsets: [], offsets: [], sources: [], media: [], errors: [], seq: 0,
  };
  window.labTap = tap;

  function now() { return performance.now(); }
  function epoch(tMs) { return tMs === null ? null : performance.timeOrigin + tMs; }
  function fail(where, e) {
    tap.errors.push({ where: where, error: String(e && e.message || e), t_ms: now() });
    if (tap.errors.length > 100) tap.errors.shift();
  }

  // -- the processor: runs in the audio thread ---------------------------------------------------------------
  var PROCESSOR = "(" + function () {
    class LabTapProcessor extends AudioWorkletProcessor {
      constructor(options) {
        super();
        var o = options.processorOptions;
        this.hop = Math.max(1, Math.round(sampleRate * o.hop_s));
        this.hops = Math.max(1, Math.round(o.window_s / o.hop_s));      // hops per window
        this.threshold = Math.pow(10, o.audible_dbfs / 10);              // mean power of a -50 dBFS RMS
        this.quietFrames = Math.round(o.quiet_s * sampleRate);
        this.tickFrames = Math.round(o.tick_s * sampleRate);
        this.ring = new Float64Array(this.hops);                         // summed power per hop
        this.k = 0; this.filled = 0; this.acc = 0; this.accN = 0;
        this.nextFrame = null;                                           // frame the next block should start at
        this.lastLoudEnd = null;                                         // frame after the last loud window
        this.loud = false;                                               // in a loud stretch (no offset said yet)
        this.lastTick = -Infinity;
      }

      process(inputs) {
        var input = inputs[0] || [];
        var n = input.length ? input[0].length : 128;
        var start = currentFrame;
        if (this.nextFrame !== null && start !== this.nextFrame) { // a gap (not pulled): its frames were silent
          this.filled = 0; this.acc = 0; this.accN = 0;
        }
        this.nextFrame = start + n;
        var channels = input.length;
        for (var i = 0; i < n; i++) {
          var p = 0;
          for (var c = 0; c < channels; c++) { var x = input[c][i]; p += x * x; }
          this.acc += channels ? p / channels : 0;
          if (++this.accN === this.hop) this.endHop(start + i + 1);
        }
        if (start - this.lastTick >= this.tickFrames) {
          this.lastTick = start;
          this.port.postMessage({ type: "tick", frame: start });
        }
        return true; // keep running with no input: quiet time is counted too
      }

      endHop(endFrame) {
        this.ring[this.k] = this.acc;
        this.k = (this.k + 1) % this.hops;
        this.acc = 0; this.accN = 0;
        if (this.filled < this.hops) this.filled++;
        if (this.filled < this.hops) return;
        var sum = 0;
        for (var j = 0; j < this.hops; j++) sum += this.ring[j];
        var power = sum / (this.hops * this.hop);
        var winEnd = endFrame, winStart = endFrame - this.hops * this.hop;
        if (power >= this.threshold) {
          var quiet = this.lastLoudEnd === null ? null : winStart - this.lastLoudEnd;
          if (quiet === null || quiet >= this.quietFrames) {
            // stamped at the window's first hop that is loud on its own (the sound's first millisecond), else
            // at the window's start (a sound spread thin over the window)
            var at = winStart;
            for (var h = 0; h < this.hops; h++) {
              if (this.ring[(this.k + h) % this.hops] / this.hop >= this.threshold) { at = winStart + h * this.hop; break; }
            }
            this.port.postMessage({ type: "onset", frame: at, window_frame: winStart,
                                    level_dbfs: 10 * Math.log10(power), quiet_frames: quiet });
          }
          this.lastLoudEnd = winEnd;
          this.loud = true;
        } else if (this.loud && winEnd - this.lastLoudEnd >= this.quietFrames) {
          this.loud = false;
          this.port.postMessage({ type: "offset", frame: this.lastLoudEnd });
        }
      }
    }
    registerProcessor("lab-tap", LabTapProcessor);
  } + ")();";

  var moduleUrl = null;
  function processorUrl() {
    if (!moduleUrl) moduleUrl = URL.createObjectURL(new Blob([PROCESSOR], { type: "application/javascript" }));
    return moduleUrl;
  }

  // -- contexts --------------------------------------------------------------------------------------------
  var OriginalContext = window.AudioContext || window.webkitAudioContext;
  var states = new WeakMap(); // context -> its tap state
  var contexts = []; // the states, for snapshot()

  // performance.now() at which context time tS leaves the output (as web/player.js maps it; see README).
  function perfAt(ctx, tS) {
    var ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (ts && ts.performanceTime > 0 && ts.contextTime > 0) return ts.performanceTime + (tS - ts.contextTime) * 1000;
    var latency = ctx.outputLatency > 0 ? ctx.outputLatency : (ctx.baseLatency > 0 ? ctx.baseLatency : 0);
    return now() + (tS - ctx.currentTime + latency) * 1000;
  }

  // The tap state of a context: loads the processor module at once; taps asked for before it is ready wait.
  function prepare(ctx, kind) {
    var st = states.get(ctx);
    if (st) return st;
    st = { ctx: ctx, index: contexts.length, kind: kind, ready: false, failed: null, waiting: [], lastTickFrame: null,
           created_ms: now() };
    states.set(ctx, st);
    contexts.push(st);
    if (!ctx.audioWorklet) {
      st.failed = "no audioWorklet (not a secure context?)";
      fail("prepare", st.failed);
      return st;
    }
    ctx.audioWorklet.addModule(processorUrl()).then(function () {
      st.ready = true;
      var waiting = st.waiting;
      st.waiting = [];
      waiting.forEach(function (fn) { fn(); });
    }, function (e) {
      st.failed = String(e);
      // a context closed at once (a decoder's: Gradio's waveform) plays nothing: not an error of the tap
      if (ctx.state !== "closed") fail("addModule, context " + st.index, e);
    });
    return st;
  }

  // A new tap node in this context; `label` keys its onsets (the element it listens to, or "destination").
  function newTapNode(st, label) {
    var node = new AudioWorkletNode(st.ctx, "lab-tap", {
      numberOfInputs: 1, numberOfOutputs: 0, channelCount: 2, channelCountMode: "max", channelInterpretation: "speakers",
      processorOptions: { window_s: CONFIG.window_s, hop_s: CONFIG.hop_s, audible_dbfs: CONFIG.audible_dbfs,
                          quiet_s: CONFIG.quiet_s, tick_s: TICK_S },
    });
    var sr = st.ctx.sampleRate;
    node.port.onmessage = function (event) {
      var m = event.data;
      if (m.type === "tick") { st.lastTickFrame = m.frame; return; }
      var ctxTimeS = m.frame / sr;
      var tMs = perfAt(st.ctx, ctxTimeS);
      var entry = { seq: ++tap.seq, path: st.kind === "media" ? "media" : "webaudio", source: label,
                    context: st.index, t_ms: tMs, epoch_ms: epoch(tMs), ctx_time_s: ctxTimeS,
                    seen_ms: now() };
      if (m.type === "onset") {
        entry.level_dbfs = m.level_dbfs;
        entry.window_ctx_time_s = m.window_frame / sr;
        entry.quiet_before_s = m.quiet_frames === null ? null : m.quiet_frames / sr;
        tap.onsets.push(entry);
      } else {
        tap.offsets.push(entry);
      }
    };
    return node;
  }

  // Run fn(state) once the context's module is loaded.
  function whenReady(st, fn) {
    if (st.failed) return;
    if (st.ready) fn();
    else st.waiting.push(fn);
  }

  // -- Web Audio: whatever goes to a destination also goes to the context's tap ------------------------------
  var connect = AudioNode.prototype.connect;
  var disconnect = AudioNode.prototype.disconnect;
  var connected = new WeakMap(); // node -> outputs waiting for the tap (cleared by a disconnect before it is ready)
  var nodeIds = new WeakMap(); // node -> a number: a buffer source's route is the node it feeds (a player's gain)
  var routes = new WeakMap(); // buffer source -> the id of the node it was connected to
  var nextNodeId = 1;

  function nodeId(node) {
    if (!nodeIds.has(node)) nodeIds.set(node, nextNodeId++);
    return nodeIds.get(node);
  }

  function destinationTap(st) {
    if (!st.destinationTap) st.destinationTap = newTapNode(st, "destination");
    return st.destinationTap;
  }

  function tapConnection(node, output) {
    var ctx = node.context;
    if (!(ctx instanceof OriginalContext)) return; // an OfflineAudioContext renders to nobody's ears
    var st = prepare(ctx, "page");
    var outputs = connected.get(node) || {};
    outputs[output] = true;
    connected.set(node, outputs);
    whenReady(st, function () {
      if (!(connected.get(node) || {})[output]) return; // disconnected before the tap was ready
      try { connect.call(node, destinationTap(st), output, 0); } catch (e) { fail("connect", e); }
    });
  }

  AudioNode.prototype.connect = function (target, output) {
    var result = connect.apply(this, arguments);
    try {
      if (typeof AudioDestinationNode !== "undefined" && target instanceof AudioDestinationNode) {
        tapConnection(this, Number(output) || 0);
      }
      if (this instanceof AudioBufferSourceNode && target instanceof AudioNode) routes.set(this, nodeId(target));
    } catch (e) { fail("connect hook", e); }
    return result;
  };

  AudioNode.prototype.disconnect = function (target) {
    var result = disconnect.apply(this, arguments);
    try {
      if (arguments.length === 0 || typeof target === "number") {
        connected.delete(this); // every connection of the output(s) went, the tap's with them
      } else if (typeof AudioDestinationNode !== "undefined" && target instanceof AudioDestinationNode) {
        connected.delete(this);
        var st = states.get(this.context);
        if (st && st.destinationTap) {
          try { disconnect.call(this, st.destinationTap); } catch (e) { /* was not connected to it */ }
        }
      }
    } catch (e) { fail("disconnect hook", e); }
    return result;
  };

  // The module starts loading as soon as the page makes a context.
  if (OriginalContext) {
    var Hooked = new Proxy(OriginalContext, {
      construct: function (target, args, newTarget) {
        var ctx = Reflect.construct(target, args, newTarget);
        try { prepare(ctx, "page"); } catch (e) { fail("prepare", e); }
        return ctx;
      },
    });
    if (window.AudioContext) window.AudioContext = Hooked;
    if (window.webkitAudioContext) window.webkitAudioContext = Hooked;
  }

  // Where scheduled buffers play (context and performance clocks): when a clip ends, for the harness.
  if (window.AudioBufferSourceNode) {
    var start = AudioBufferSourceNode.prototype.start;
    AudioBufferSourceNode.prototype.start = function (when, offset, duration) {
      var result = start.apply(this, arguments);
      try {
        var ctx = this.context;
        if (ctx instanceof OriginalContext && this.buffer && !this.loop) {
          var st = prepare(ctx, "page");
          var startS = Math.max(Number(when) || 0, ctx.currentTime);
          var lengthS = duration !== undefined ? Number(duration) : this.buffer.duration - (Number(offset) || 0);
          var endS = startS + Math.max(lengthS, 0) / (this.playbackRate.value || 1);
          var tStart = perfAt(ctx, startS), tEnd = perfAt(ctx, endS);
          tap.sources.push({ seq: ++tap.seq, context: st.index, route: routes.has(this) ? routes.get(this) : null,
                             ctx_start_s: startS, ctx_end_s: endS,
                             t_start_ms: tStart, t_end_ms: tEnd, epoch_start_ms: epoch(tStart),
                             epoch_end_ms: epoch(tEnd) });
          if (tap.sources.length > 5000) tap.sources.shift();
        }
      } catch (e) { fail("source start hook", e); }
      return result;
    };
  }

  // -- media elements (Gradio's HLS <audio>): captured into a tap context of the tap's own -------------------
  var mediaCtx = null;
  var capturedElements = new WeakSet();

  // Made at the first click on a tracked button (or the first play), so that its module is loaded before the
  // first element plays: an element's first sound must not come before its tap is ready.
  function mediaContext() {
    if (!mediaCtx && OriginalContext) {
      mediaCtx = new OriginalContext({ latencyHint: "interactive" });
      prepare(mediaCtx, "media");
    }
    if (mediaCtx && mediaCtx.state === "suspended") mediaCtx.resume().catch(function () {});
    return mediaCtx ? states.get(mediaCtx) : null;
  }

  function describe(el) {
    var holder = el.closest ? el.closest("[id]") : null;
    return (el.id ? "#" + el.id : holder ? "#" + holder.id : el.tagName.toLowerCase()) + " " + el.tagName.toLowerCase();
  }

  function tapMedia(el) {
    if (capturedElements.has(el)) return;
    capturedElements.add(el);
    var capture = el.captureStream || el.mozCaptureStream;
    if (!capture || !OriginalContext) { fail("capture", "no captureStream"); return; }
    var stream;
    try { stream = capture.call(el); } catch (e) { fail("captureStream", e); return; }
    var st = mediaContext();
    if (!st) return;
    var label = describe(el);
    var tracks = new WeakSet();
    whenReady(st, function () {
      var node = newTapNode(st, label);
      function add(track) {
        if (track.kind !== "audio" || tracks.has(track)) return;
        tracks.add(track);
        try {
          var src = mediaCtx.createMediaStreamSource(new MediaStream([track]));
          connect.call(src, node);
        } catch (e) { fail("capture source", e); }
      }
      stream.getAudioTracks().forEach(add);
      stream.addEventListener("addtrack", function (event) { add(event.track); }); // a new src, a new track
    });
  }

  ["play", "playing", "pause", "ended", "waiting"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      var el = event.target;
      if (!(el instanceof HTMLMediaElement)) return;
      tap.media.push({ seq: ++tap.seq, type: type, element: describe(el), t_ms: event.timeStamp,
                       epoch_ms: epoch(event.timeStamp), position_s: el.currentTime });
      if (tap.media.length > 2000) tap.media.shift();
      if (type === "play" || type === "playing") {
        try { tapMedia(el); } catch (e) { fail("tapMedia", e); }
      }
    }, true);
  });

  // -- clicks ------------------------------------------------------------------------------------------------
  function button(event) {
    var path = event.composedPath ? event.composedPath() : [event.target];
    for (var i = 0; i < path.length; i++) {
      var el = path[i];
      if (el && el.matches && el.matches(CONFIG.buttons)) return el;
      if (el && el.closest) {
        var found = el.closest(CONFIG.buttons);
        if (found) return found;
      }
    }
    return null;
  }

  ["pointerdown", "click"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      var b = button(event);
      if (!b) return;
      tap.clicks.push({ seq: ++tap.seq, button: b.id, type: type, t_ms: event.timeStamp,
                        epoch_ms: epoch(event.timeStamp), seen_ms: now(), trusted: event.isTrusted });
      try { mediaContext(); } catch (e) { fail("media context", e); }
    }, true);
  });

  // -- for the harness -----------------------------------------------------------------------------------------
  tap.reset = function () {
    tap.clicks = []; tap.onsets = []; tap.offsets = []; tap.sources = []; tap.media = []; tap.errors = [];
  };

  // Sound still to come: a scheduled buffer not yet played out (in its context's time), or a media element
  // playing. The harness waits for false before the next compare.
  tap.busy = function () {
    var scheduled = tap.sources.some(function (src) {
      var st = contexts[src.context];
      return st && st.ctx.state === "running" && st.ctx.currentTime < src.ctx_end_s;
    });
    var media = Array.prototype.some.call(document.querySelectorAll("audio, video"), function (el) {
      return !el.paused && !el.ended;
    });
    return scheduled || media;
  };

  tap.snapshot = function () {
    return {
      now_ms: now(), time_origin_ms: performance.timeOrigin, config: CONFIG,
      clicks: tap.clicks.slice(), onsets: tap.onsets.slice(), offsets: tap.offsets.slice(),
      sources: tap.sources.slice(), media: tap.media.slice(), errors: tap.errors.slice(),
      contexts: contexts.map(function (st) {
        var c = st.ctx;
        return { index: st.index, kind: st.kind, ready: st.ready, failed: st.failed, state: c.state,
                 sample_rate: c.sampleRate, base_latency_s: c.baseLatency || null,
                 output_latency_s: c.outputLatency || null, current_time_s: c.currentTime,
                 tap_frame: st.lastTickFrame, tapped: !!st.destinationTap };
      }),
    };
  };
})();
