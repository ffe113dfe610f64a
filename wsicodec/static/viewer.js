// wsicodec viewer: lists /slides and shows one with OpenSeadragon (served from
// /openseadragon/, installed from the npm registry by `npm ci --prefix wsicodec/static`).
// ?slide=NAME picks the slide to open; ?fidelity=1 turns the fidelity overlay on
// (fidelity.js) for slides that have a fidelity map.
(function () {
  "use strict";
  var message = document.getElementById("message");
  var select = document.getElementById("slides");
  var info = document.getElementById("info");
  var associated = document.getElementById("associated");
  var toggle = document.getElementById("fidelity");
  var viewer = null;
  var fidelity = null;

  function fail(text) {
    message.textContent = text;
    message.hidden = false;
    document.title = "wsicodec viewer: error";
  }

  if (typeof OpenSeadragon === "undefined") {
    fail("OpenSeadragon is not installed: run `npm ci --prefix wsicodec/static` " +
         "(the server serves it from /openseadragon/).");
    return;
  }

  function open(slide) {
    info.textContent = slide.width + " x " + slide.height + " px, " + slide.levels +
      " levels" + (slide.mpp ? ", " + slide.mpp.toFixed(3) + " µm/px" : "") +
      (slide.codec ? ", codec " + slide.codec : "");
    associated.textContent = "";   // label, macro, thumbnail: each opens in a new tab
    Object.keys(slide.associated_images || {}).forEach(function (name) {
      var a = document.createElement("a");
      a.href = slide.associated_images[name];
      a.textContent = name;
      a.target = "_blank";
      a.rel = "noopener";
      associated.appendChild(a);
    });
    if (viewer === null) {
      viewer = OpenSeadragon({
        id: "viewer",
        prefixUrl: "/openseadragon/images/",
        tileSources: slide.dzi,
        showNavigator: true,
        animationTime: 0.5,
        blendTime: 0,
        maxZoomPixelRatio: 2,
        timeout: 60000,
        drawer: "canvas"   // 2D canvas: works without a GPU (headless, remote desktops)
      });
      viewer.addHandler("open-failed", function (e) { fail("cannot open " + slide.dzi + ": " + e.message); });
      viewer.world.addHandler("add-item", function () { document.title = "wsicodec viewer: " + slide.name; });
      toggle.checked = new URLSearchParams(window.location.search).get("fidelity") === "1";
      fidelity = window.WsicodecFidelity(viewer, toggle, document.getElementById("fidelity-legend"),
                                         document.getElementById("fidelity-tip"));
    } else {
      viewer.open(slide.dzi);
    }
    fidelity.show(slide);
    var url = new URL(window.location.href);
    url.searchParams.set("slide", slide.name);
    window.history.replaceState(null, "", url.toString());
  }

  fetch("/slides").then(function (r) {
    if (!r.ok) { throw new Error("HTTP " + r.status); }
    return r.json();
  }).then(function (slides) {
    if (!slides.length) { fail("no slides"); return; }
    var wanted = new URLSearchParams(window.location.search).get("slide");
    var current = slides[0];
    slides.forEach(function (s) {
      var opt = document.createElement("option");
      opt.value = s.name;
      opt.textContent = s.name;
      select.appendChild(opt);
      if (s.name === wanted) { current = s; }
    });
    select.value = current.name;
    select.addEventListener("change", function () {
      slides.forEach(function (s) { if (s.name === select.value) { open(s); } });
    });
    open(current);
  }).catch(function (e) { fail("cannot list slides: " + e.message); });
})();
