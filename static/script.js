// The collector's tracker: one anonymous page view per page shown, SPA navigations included,
// and collector.event() for custom events (docs/events.md; click tracking is in script.clicks.js).
// No cookie, no storage, and nothing thrown into the page. docs/tracker.md documents the
// attributes. Kept readable: the collector strips these line comments and the
// indentation when it serves the file, and a test holds the gzipped result under 1,000 bytes.
(function () {
  var w = window, d = document, l = location, h = history;
  try {
    // Included twice: the first copy already counts.
    if (w.collector) return;
    var me = d.currentScript;
    var attr = function (name) { return me.getAttribute("data-" + name); };
    var api = attr("api") || new URL(me.src, l).origin + "/api/pageview";
    var domain = attr("domain") || l.hostname;
    var skipped = attr("include-localhost") == null &&
      (/^(localhost|127(\.\d+){3}|\[::1\])$/.test(l.hostname) || l.protocol == "file:");
    // Query strings and fragments carry tokens, e-mail addresses and click ids: never sent.
    var bare = function (url) { return url.replace(/[?#].*/, ""); };
    // Only the campaign parameters leave the query string (ref and source stand for utm_source),
    // each cut to the collector's 256 characters without splitting a surrogate pair.
    var campaign = function (utm, v, q) {
      q = new URLSearchParams(l.search);
      ["source", "medium", "campaign", "term", "content"].forEach(function (k) {
        if (v = q.get("utm_" + k) || k == "source" && (q.get("ref") || q.get(k)))
          (utm = utm || {})[k] = v.slice(0, 256).replace(/[\ud800-\udbff]$/, "");
      });
      return utm;
    };
    var last = bare(d.referrer), path, waiting = 1;

    // Opted out or local: nothing leaves. A string body goes as text/plain: a simple request, so
    // no CORS preflight; keepalive: it outlives the page, so a click that navigates is still sent.
    var send = function (url, data) {
      try {
        if (skipped || localStorage.collector_ignore == "true") return;
        // Storage blocked: no opt-out can have been set in it, so send.
      } catch (e) {}
      try {
        data.domain = domain;
        data = JSON.stringify(data);
        fetch(url, { method: "POST", body: data, keepalive: true }).catch(function () {});
      } catch (e) {}
    };

    var pageview = function (pathname, referrer) {
      path = l.pathname;
      send(api, { pathname: pathname || path, referrer: referrer == null ? last : referrer, utm: campaign() });
      last = bare(l.href);
    };

    // SPA navigation: count a view when the path changes, not on every state update.
    var navigated = function () {
      if (!waiting && path != l.pathname) pageview();
    };
    ["pushState", "replaceState"].forEach(function (name) {
      var original = h[name];
      h[name] = function () {
        var r = original.apply(this, arguments);
        navigated();
        return r;
      };
    });
    w.addEventListener("popstate", navigated);
    // Restored from the back/forward cache: shown again, but the script does not run again.
    w.addEventListener("pageshow", function (e) {
      if (e.persisted) pageview();
    });

    // A prerendered page or one opened in a background tab counts once it is first shown.
    var shown = function () {
      if (waiting && !d.hidden && !d.prerendering) {
        waiting = 0;
        pageview();
      }
    };
    d.addEventListener("visibilitychange", shown);
    d.addEventListener("prerenderingchange", shown);
    shown();

    // Custom events go to the page views' address with "event" as its last segment.
    var event = function (name, props) {
      send(api.replace(/[^/]*$/, "event"), { name: name, pathname: l.pathname, props: props || {} });
    };

    w.collector = { pageview: pageview, event: event };
    // The name that pages written for the original collector call.
    w.trackPageview = pageview;
  } catch (e) {}
})();
