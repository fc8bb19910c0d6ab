// Mentions, search and read-by (docs/api.md: GET /search; docs/protocol.md: mentions in message.new).
// Everything drawn here goes in with textContent or as elements (never innerHTML).
import { api, listOf } from "./api.js";
import { $, state, myId } from "./state.js";
import { notice, explain } from "./render.js";
import { openConversation } from "./actions.js";

const readersOpen = new Set(); // message ids whose "read by" list is open (kept across redraws)
let searchQuery = "";
let searchCursor = null;

// The body of message `m`: its text, with "@<my username>" marked when the message mentions me.
export function mentionsMark(body, m) {
  const me = state.me && state.me.username;
  if (!me || !m.mentions || !m.mentions.includes(myId())) { body.textContent = m.content; return; }
  body.classList.add("mentions-me");
  const pattern = new RegExp(`@${me.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}(?![\\w])`, "gi");
  let at = 0;
  for (const match of m.content.matchAll(pattern)) {
    body.append(m.content.slice(at, match.index));
    const mark = document.createElement("mark");
    mark.className = "mention";
    mark.textContent = match[0];
    body.append(mark);
    at = match.index + match[0].length;
  }
  body.append(m.content.slice(at));
  const hint = document.createElement("span");
  hint.className = "visually-hidden";
  hint.textContent = " (mentions you)";
  body.append(hint);
}

// "read by N of M" under my message in a group, opening the list of who read it.
export function readersDetails(m, receipt) {
  const details = document.createElement("details");
  details.className = "readers";
  details.open = readersOpen.has(m.id);
  details.addEventListener("toggle", () => { if (details.open) readersOpen.add(m.id); else readersOpen.delete(m.id); });
  const summary = document.createElement("summary");
  summary.className = "seen";
  summary.textContent = receipt.text;
  const list = document.createElement("ul");
  list.setAttribute("aria-label", "Read by");
  for (const name of receipt.readers) {
    const li = document.createElement("li");
    li.textContent = name;
    list.append(li);
  }
  details.append(summary, list);
  return details;
}

// A search hit's content with its highlights (offsets in Unicode code points) marked.
function hitBody(hit) {
  const span = document.createElement("span");
  span.className = "hit-content";
  const chars = Array.from(hit.content);
  let at = 0;
  for (const [start, end] of hit.highlights || []) {
    if (start < at) continue;
    span.append(chars.slice(at, start).join(""));
    const mark = document.createElement("mark");
    mark.textContent = chars.slice(start, end).join("");
    span.append(mark);
    at = end;
  }
  span.append(chars.slice(at).join(""));
  return span;
}

function hitItem(hit) {
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  const c = state.conversations.get(hit.conversation_id);
  const where = document.createElement("span");
  where.className = "hit-where";
  where.textContent = c ? c.title : "conversation";
  b.append(where, " ", hitBody(hit));
  b.setAttribute("aria-label", `${where.textContent}: ${hit.content}`);
  b.addEventListener("click", () => openConversation(hit.conversation_id));
  li.append(b);
  return li;
}

// GET /search: the first page for a new query, the next one for "More results".
export async function searchRun(query, { more = false } = {}) {
  const list = $("search-results");
  const status = $("search-status");
  if (!more) { searchQuery = query.trim(); searchCursor = null; list.replaceChildren(); }
  if (!searchQuery) { status.textContent = ""; $("search-more").hidden = true; return; }
  const params = new URLSearchParams({ q: searchQuery, limit: "20" });
  if (more && searchCursor) params.set("cursor", searchCursor);
  status.textContent = "searching…";
  try {
    const data = await api("GET", `/api/v1/search?${params}`);
    for (const hit of listOf(data)) list.append(hitItem(hit));
    searchCursor = data.next_cursor || null;
    const n = list.children.length;
    status.textContent = n ? `${n} result${n > 1 ? "s" : ""}${searchCursor ? " so far" : ""}` : searchCursor ? "nothing yet" : "no results";
    $("search-more").hidden = !searchCursor;
  } catch (err) {
    status.textContent = "";
    notice(explain(err), "error");
  }
}
