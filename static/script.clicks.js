// Click tracking, served after script.js in one file as /script.clicks.js (docs/events.md): it
// sends events through collector.event, so opted-out browsers and local pages send nothing here
// either. Kept out of /script.js, which holds its 1,000-byte budget without it.
// - Any element with data-collector-event="Name" sends that event when clicked, with its
//   data-collector-event-<prop>="value" attributes as properties.
// - With data-outbound-links on the script tag: "Outbound Link: Click" with the url, for a
//   link to another host.
// - With data-file-downloads: "File Download" with the url, for a link to a file of one of
//   FILE_TYPES, or of the types the attribute lists (data-file-downloads="pdf,zip").
// Links keep the page's own behaviour: nothing is prevented or delayed, and the event goes
// with fetch's keepalive, so it arrives even as the page is left.
(function () {
  "use strict";
  var w = window, d = document;
  var FILE_TYPES = "pdf,xlsx,xls,docx,doc,pptx,ppt,odt,ods,odp,rtf,txt,csv,epub,key,pps,zip,rar,7z,gz,tgz,bz2,xz," +
    "dmg,exe,msi,pkg,deb,rpm,apk,iso,mp3,wav,wma,flac,ogg,midi,mp4,mov,avi,wmv,mpeg,webm";
  try {
    var me = d.currentScript, collector = w.collector;
    // Loaded twice, or without its script.js part working: the first copy listens already.
    if (!collector || collector.clicks) return;
    collector.clicks = 1;
    var outbound = me.hasAttribute("data-outbound-links");
    var types = me.getAttribute("data-file-downloads");
    types = types == null ? [] : (types || FILE_TYPES).toLowerCase().split(/[\s,]+/);
    var prefix = "data-collector-event-";

    var isDownload = function (path) {
      path = path.toLowerCase();
      return types.some(function (type) {
        return type && path.slice(-type.length - 1) == "." + type;
      });
    };

    var tagged = function (element) {
      var props = {};
      [].forEach.call(element.attributes, function (attribute) {
        if (attribute.name.indexOf(prefix) == 0) props[attribute.name.slice(prefix.length)] = attribute.value;
      });
      collector.event(element.getAttribute("data-collector-event"), props);
    };

    // One event per link click: a download on another host is a download.
    var link = function (a) {
      if (!/^https?:$/.test(a.protocol)) return;
      // Like the page view's path: the query and the fragment can carry tokens, so they stay.
      var url = a.protocol + "//" + a.host + a.pathname;
      if (isDownload(a.pathname)) collector.event("File Download", { url: url });
      else if (outbound && a.hostname != location.hostname) collector.event("Outbound Link: Click", { url: url });
    };

    // In the capture phase, so that a page's stopPropagation cannot hide a click. auxclick with
    // the middle button: it opens a link too (in a new tab), without a click event.
    var clicked = function (event) {
      try {
        if (event.type == "auxclick" && event.button != 1) return;
        var target = event.target, element = target.closest && target.closest("[data-collector-event]");
        var a = target.closest && target.closest("a[href]");
        if (element) tagged(element);
        if (a) link(a);
      } catch (e) {}
    };
    d.addEventListener("click", clicked, true);
    d.addEventListener("auxclick", clicked, true);
  } catch (e) {}
})();
