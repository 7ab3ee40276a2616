// fleetrun console: live updates only. Every page works without this script.
"use strict";

// A running job's page: the server says when the job changed (server-sent events from the
// store's job watch); the live part of the page is then fetched again and swapped in.
function followJob(section) {
  if (section.dataset.running !== "1" || !window.EventSource) return;
  const id = section.dataset.job;
  let fetching = false, again = false;
  async function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      const url = new URL(window.location.href);
      url.searchParams.set("fragment", "1");
      url.hash = "";
      const reply = await fetch(url, { credentials: "same-origin" });
      if (reply.ok) section.innerHTML = await reply.text();
    } finally {
      fetching = false;
      if (again) { again = false; refresh(); }
    }
  }
  const events = new EventSource("/console/jobs/" + encodeURIComponent(id) + "/events");
  events.addEventListener("changed", refresh);
  events.addEventListener("ended", () => {
    events.close();
    // The whole page: its status, duration and actions (retry) change at the end too.
    window.location.reload();
  });
}

// A host's log while its task runs: ask for the bytes after the last ones shown.
function tailLog(pre) {
  if (pre.dataset.running !== "1") return;
  let from = Number(pre.dataset.from || "0");
  async function poll() {
    try {
      const reply = await fetch(pre.dataset.tail + "?from=" + from, { credentials: "same-origin" });
      if (!reply.ok) return;
      const text = await reply.text();
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      if (text) pre.append(document.createTextNode(text));
      if (atBottom) pre.scrollTop = pre.scrollHeight;
      from = Number(reply.headers.get("x-log-end") || from);
      if (reply.headers.get("x-log-finished") === "1" && !text) {
        window.location.reload();
        return;
      }
    } catch (e) { /* the next poll tries again */ }
    setTimeout(poll, 1000);
  }
  setTimeout(poll, 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live) followJob(live);
  const log = document.getElementById("log");
  if (log && log.dataset.tail) tailLog(log);
});
