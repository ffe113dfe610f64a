// wsicodec viewer: the fidelity overlay. For a slide whose container carries a per-tile
// fidelity map (format 4; /slides lists it as "fidelity"), a header checkbox draws each
// stored tile of the level on screen coloured by its PSNR against the source, with a
// legend; hovering a tile names its level, column, row, kind, PSNR and bytes. The map of a
// level comes from /slides/NAME/fidelity/LEVEL.json (psnr null: the tile is exact).
// Drawn on a canvas over OpenSeadragon's, which takes no pointer events.
(function () {
  "use strict";
  // PSNR bins (dB, lower bound) and their colours; an exact tile is blue
  var BINS = [[-Infinity, "< 30", "#d7191c"], [30, "30–35", "#fdae61"],
              [35, "35–40", "#ffffbf"], [40, "40–45", "#a6d96a"], [45, "≥ 45", "#1a9641"]];
  var EXACT = "#2c7bb6";

  function colour(psnr) {
    if (psnr === null) { return EXACT; }
    for (var i = BINS.length - 1; i >= 0; i--) {
      if (psnr >= BINS[i][0]) { return BINS[i][2]; }
    }
    return BINS[0][2];
  }

  // viewer: the OpenSeadragon viewer; toggle: the checkbox; legend, tip: elements to fill
  window.WsicodecFidelity = function (viewer, toggle, legend, tip) {
    var canvas = document.createElement("canvas");
    canvas.id = "fidelity-overlay";
    canvas.style.cssText = "position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none";
    canvas.hidden = true;
    viewer.canvas.appendChild(canvas);
    var index = null;        // the slide's "fidelity" entry from /slides, or null
    var maps = {};           // level -> map JSON, or a pending marker
    var shown = null;        // {level, map} drawn last (what hover reads)

    function levelOnScreen(item) {
      // the pyramid level readers show at this zoom: the coarsest whose downsample is at
      // most the screen's level-0 pixels per screen pixel (as OpenSlide's best level)
      var perPixel = 1 / item.viewportToImageZoom(viewer.viewport.getZoom(true));
      var best = 0;
      index.levels.forEach(function (lv, i) { if (lv.downsample <= perPixel * 1.01) { best = i; } });
      return best;
    }

    function load(level) {
      if (maps[level]) { return; }
      maps[level] = "pending";
      fetch(index.levels[level].url).then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      }).then(function (map) {
        maps[level] = map;
        draw();
      }).catch(function (e) {
        legend.textContent = "fidelity map unavailable: " + e.message;
      });
    }

    function draw() {
      var item = viewer.world.getItemAt(0);
      var ctx = canvas.getContext("2d");
      var ratio = window.devicePixelRatio || 1;
      var w = viewer.canvas.clientWidth, h = viewer.canvas.clientHeight;
      if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
        canvas.width = Math.round(w * ratio);
        canvas.height = Math.round(h * ratio);
      }
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, w, h);
      shown = null;
      if (!toggle.checked || !index || !item) { return; }
      var level = levelOnScreen(item);
      var map = maps[level];
      if (!map || map === "pending") { load(level); return; }
      shown = {level: level, map: map};
      var span = map.tile_size * map.downsample;      // one stored tile, in level-0 pixels
      var full = item.source.dimensions;
      var view = item.viewportToImageRectangle(viewer.viewport.getBounds(true), true);
      var c0 = Math.max(0, Math.floor(view.x / span)), c1 = Math.min(map.cols, Math.ceil((view.x + view.width) / span));
      var r0 = Math.max(0, Math.floor(view.y / span)), r1 = Math.min(map.rows, Math.ceil((view.y + view.height) / span));
      ctx.globalAlpha = 0.4;
      for (var row = r0; row < r1; row++) {
        for (var col = c0; col < c1; col++) {
          var a = toScreen(item, col * span, row * span);
          var b = toScreen(item, Math.min((col + 1) * span, full.x), Math.min((row + 1) * span, full.y));
          ctx.fillStyle = colour(map.psnr[row][col]);
          ctx.fillRect(a.x, a.y, b.x - a.x, b.y - a.y);
        }
      }
      ctx.globalAlpha = 0.8;
      ctx.strokeStyle = "#333";
      ctx.lineWidth = 1;
      if (span * item.viewportToImageZoom(viewer.viewport.getZoom(true)) >= 12) {
        for (row = r0; row < r1; row++) {    // tile borders, where tiles are big enough to see
          for (col = c0; col < c1; col++) {
            a = toScreen(item, col * span, row * span);
            b = toScreen(item, Math.min((col + 1) * span, full.x), Math.min((row + 1) * span, full.y));
            ctx.strokeRect(a.x + 0.5, a.y + 0.5, b.x - a.x, b.y - a.y);
          }
        }
      }
      ctx.globalAlpha = 1;
    }

    function toScreen(item, x, y) {
      return viewer.viewport.pixelFromPoint(item.imageToViewportCoordinates(x, y, true), true);
    }

    function hover(event) {
      var item = viewer.world.getItemAt(0);
      if (!shown || !item) { tip.hidden = true; return; }
      var box = viewer.canvas.getBoundingClientRect();
      var p = item.viewerElementToImageCoordinates(
        new OpenSeadragon.Point(event.clientX - box.left, event.clientY - box.top));
      var map = shown.map, span = map.tile_size * map.downsample;
      var col = Math.floor(p.x / span), row = Math.floor(p.y / span);
      if (col < 0 || row < 0 || col >= map.cols || row >= map.rows) { tip.hidden = true; return; }
      var psnr = map.psnr[row][col];
      tip.textContent = "level " + shown.level + " tile " + col + "," + row + ": " +
        map.kinds[map.kind[row][col]] + ", " + (psnr === null ? "exact" : psnr.toFixed(2) + " dB") +
        ", " + map.nbytes[row][col] + " bytes";
      tip.style.left = (event.clientX + 12) + "px";
      tip.style.top = (event.clientY + 12) + "px";
      tip.hidden = false;
    }

    function showLegend() {
      legend.textContent = "PSNR dB:";
      BINS.concat([[null, "exact", EXACT]]).forEach(function (bin) {
        var s = document.createElement("span");
        s.className = "swatch";
        s.style.background = bin[2];
        legend.appendChild(s);
        legend.appendChild(document.createTextNode(bin[1] + " "));
      });
      legend.appendChild(document.createTextNode("· kinds: " + index.kinds.join(", ")));
    }

    ["animation", "update-viewport", "resize", "open"].forEach(function (name) {
      viewer.addHandler(name, draw);
    });
    viewer.canvas.addEventListener("mousemove", hover);
    viewer.canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
    toggle.addEventListener("change", function () {
      canvas.hidden = legend.hidden = !toggle.checked;
      if (toggle.checked) { showLegend(); } else { tip.hidden = true; }
      draw();
    });

    return {
      // a newly opened slide: its /slides entry
      show: function (slide) {
        index = slide.fidelity || null;
        maps = {};
        toggle.parentNode.hidden = !index;
        if (!index) { toggle.checked = false; }
        canvas.hidden = legend.hidden = !toggle.checked;
        tip.hidden = true;
        if (index && toggle.checked) { showLegend(); }
        draw();
      }
    };
  };
})();
