// tinyci web: live updates on top of pages that work without this script.
// No framework, no build step. Every piece of HTML inserted here was
// rendered (and escaped) by the server.
"use strict";

(function () {
  var refreshing = false, pending = false;

  function age(ts) {
    var s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return Math.floor(s) + "s ago";
    if (s < 3600) return Math.floor(s / 60) + "m ago";
    if (s < 172800) return Math.floor(s / 3600) + "h ago";
    return Math.floor(s / 86400) + "d ago";
  }

  function ages() {
    var times = document.querySelectorAll("time[data-ts]");
    for (var i = 0; i < times.length; i++) {
      times[i].textContent = age(parseFloat(times[i].getAttribute("data-ts")));
    }
  }

  function setConn(up, why) {
    var conn = document.getElementById("conn");
    if (!conn) return;
    conn.className = "conn " + (up ? "up" : "down");
    conn.textContent = up ? "live" : "disconnected";
    if (why) conn.title = why;
  }

  // Fetch this page again and swap every part marked data-refresh.
  function refresh() {
    if (refreshing) { pending = true; return; }
    refreshing = true;
    fetch(location.href, {credentials: "same-origin", cache: "no-store", headers: {"X-Requested-With": "tinyci"}})
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        var parts = doc.querySelectorAll("[data-refresh][id]");
        for (var i = 0; i < parts.length; i++) {
          var old = document.getElementById(parts[i].id);
          if (old) old.replaceWith(document.importNode(parts[i], true));
        }
        document.body.setAttribute("data-version", doc.body.getAttribute("data-version") || "");
        ages();
      })
      .catch(function () {})
      .then(function () {
        refreshing = false;
        if (pending) { pending = false; setTimeout(refresh, 300); }
      });
  }

  function watchPage() {
    if (document.body.getAttribute("data-live") !== "page" || !window.EventSource) return;
    var version = document.body.getAttribute("data-version") || "";
    var source = new EventSource("/events?v=" + encodeURIComponent(version));
    source.addEventListener("open", function () { setConn(true); });
    source.addEventListener("change", function () { refresh(); });
    source.addEventListener("error", function () { setConn(false, "lost the web server; retrying"); });
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
  }

  // Follow a running build's log: new lines arrive rendered; reopen from the
  // last offset when the stream breaks (never from the first one again).
  function followLog() {
    var log = document.getElementById("log");
    if (!log || !log.getAttribute("data-follow") || !window.EventSource) return;
    var state = document.getElementById("follow-state");
    var url = log.getAttribute("data-follow");
    var retry = 500;

    function open() {
      var offset = log.getAttribute("data-offset"), line = log.getAttribute("data-line");
      var source = new EventSource(url + "?offset=" + offset + "&line=" + line);
      function append(html) {
        if (!html) return;
        var stick = nearBottom();
        var box = document.createElement("div");
        box.innerHTML = html;
        var empty = document.getElementById("log-empty");
        if (empty) empty.remove();
        while (box.firstChild) {
          var node = box.firstChild;
          if (node.nodeType === 1) node.classList.add("new");
          log.appendChild(node);
        }
        if (stick) window.scrollTo(0, document.documentElement.scrollHeight);
      }
      source.addEventListener("open", function () { retry = 500; if (state) state.textContent = "following"; });
      source.addEventListener("lines", function (e) {
        var msg = JSON.parse(e.data);
        append(msg.html);
        log.setAttribute("data-offset", msg.offset);
        log.setAttribute("data-line", msg.line);
      });
      source.addEventListener("end", function (e) {
        var msg = JSON.parse(e.data);
        append(msg.html);
        source.close();
        log.removeAttribute("data-follow");
        if (state) state.textContent = "ended: " + msg.status;
        refresh();
      });
      source.addEventListener("error", function () {
        source.close();
        if (state) state.textContent = "reconnecting";
        setTimeout(open, retry);
        retry = Math.min(retry * 2, 10000);
      });
    }
    open();
  }

  // #L120 for a line outside the window shown: ask for the window at that line.
  function jumpToLine() {
    var m = /^#L(\d+)$/.exec(location.hash);
    if (!m || !document.getElementById("log") || document.getElementById("L" + m[1])) return;
    if (new URLSearchParams(location.search).get("line") === m[1]) return;   // asked already: past the end
    location.replace(location.pathname + "?line=" + m[1] + location.hash);
  }

  // Filters left empty stay out of the URL: /builds?status=failed, not ?branch=&status=failed&...
  function tidyFilters() {
    var forms = document.querySelectorAll("form.filters");
    for (var i = 0; i < forms.length; i++) {
      forms[i].addEventListener("submit", function (e) {
        var fields = e.target.querySelectorAll("input[name], select[name]");
        for (var j = 0; j < fields.length; j++) {
          if (!fields[j].value) fields[j].disabled = true;
        }
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    jumpToLine();
    tidyFilters();
    ages();
    setInterval(ages, 5000);
    watchPage();
    followLog();
  });
})();
