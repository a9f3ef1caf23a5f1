// The collector's tracker: one anonymous page view per page shown, SPA navigations included,
// and collector.event() for custom events (docs/events.md; click tracking is in script.clicks.js).
// No cookie, no storage, and nothing thrown into the page. docs/tracker.md documents the
// attributes. Kept readable: the collector strips these line comments and the
// indentation when it serves the file, and a test holds the gzipped result under 1,000 bytes.
(function () {
  "use strict";
  var w = window, d = document, l = location, h = history;
  try {
    // Included twice: the first copy already counts.
    if (w.collector) return;
    var me = d.currentScript;
    var attr = function (name) { return me.getAttribute("data-" + name); };
    var api = attr("api") || new URL(me.src, l).origin + "/api/pageview";
    var domain = attr("domain") || l.hostname;
    var skipped = !me.hasAttribute("data-include-localhost") &&
      (/^(localhost|127(\.\d+){3}|\[::1\])$/.test(l.hostname) || l.protocol == "file:");
    // Query strings and fragments carry tokens, e-mail addresses and click ids: never sent.
    var bare = function (url) { return url.replace(/[?#].*/, ""); };
    var last = bare(d.referrer), path, waiting = 1;

    var ignored = function () {
      try {
        return localStorage.collector_ignore == "true";
      } catch (e) {
        // Storage is blocked, so no opt-out can have been set in it.
        return false;
      }
    };

    // Opted out or local: nothing leaves. A string body goes as text/plain: a simple request, so
    // no CORS preflight; keepalive: it outlives the page, so a click that navigates is still sent.
    var send = function (url, body) {
      if (skipped || ignored()) return;
      try {
        fetch(url, { method: "POST", body: body, keepalive: true }).catch(function () {});
      } catch (e) {
        navigator.sendBeacon(url, body);
      }
    };

    var pageview = function (pathname, referrer) {
      try {
        var body = JSON.stringify({
          pathname: pathname || l.pathname,
          referrer: referrer == null ? last : referrer,
          domain: domain
        });
        path = l.pathname;
        last = bare(l.href);
        send(api, body);
      } catch (e) {}
    };

    // SPA navigation: count a view when the path changes, not on every state update.
    var navigated = function () {
      if (!waiting && path != l.pathname) pageview();
    };
    ["pushState", "replaceState"].forEach(function (name) {
      var original = h[name];
      h[name] = function () {
        var result = original.apply(this, arguments);
        navigated();
        return result;
      };
    });
    w.addEventListener("popstate", navigated);
    // Restored from the back/forward cache: shown again, but the script does not run again.
    w.addEventListener("pageshow", function (event) {
      if (event.persisted) pageview();
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
      try {
        send(api.replace(/[^/]*$/, "event"), JSON.stringify({
          name: name,
          pathname: l.pathname,
          domain: domain,
          props: props || {}
        }));
      } catch (e) {}
    };

    w.collector = { pageview: pageview, event: event };
    // The name that pages written for the original collector call.
    w.trackPageview = pageview;
  } catch (e) {}
})();
