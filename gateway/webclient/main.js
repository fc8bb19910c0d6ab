// ChatStream web client: plain ES modules, no build step. This module boots the page and wires the DOM;
// state.js holds the state, render.js draws it, events.js applies live frames, actions.js does what the
// user asks. docs/api.md and docs/protocol.md are the contracts it reads.
import { api, tokensLoad, tokensSave } from "./api.js";
import { LiveSocket } from "./socket.js";
import { $, state, resumeState } from "./state.js";
import { notice, explain, setConnection, renderMessages, renderTyping } from "./render.js";
import { handleEvent, setAuthLostHandler } from "./events.js";
import {
  loadConversations, loadPage, openConversation, closeConversation, scheduleRead, messageSend, typingSignal, groupAction,
} from "./actions.js";
import { searchRun } from "./finders.js";
import { reactionSetLoad } from "./replies.js";

function showAuth() {
  $("auth-view").hidden = false;
  $("chat-view").hidden = true;
  $("login-username").focus();
}

async function showChat() {
  $("auth-view").hidden = true;
  $("chat-view").hidden = false;
  try {
    state.me = await api("GET", "/api/v1/users/me");
  } catch {
    tokensSave(null);
    return showAuth();
  }
  state.names.set(String(state.me.id), state.me.username);
  $("me").textContent = `@${state.me.username}`;
  await Promise.all([loadConversations(), reactionSetLoad()]);
  state.socket = new LiveSocket({ onEvent: handleEvent, onState: setConnection, resumeState });
  state.socket.connect();
}

async function loginWith(username, password) {
  tokensSave(await api("POST", "/api/v1/auth/login", { username, password }, { auth: false }));
  showChat();
}

function wire() {
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try { await loginWith($("login-username").value.trim(), $("login-password").value); } catch (err) { notice(explain(err), "error"); }
  });
  $("register-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const username = $("register-username").value.trim();
    const password = $("register-password").value;
    try {
      await api("POST", "/api/v1/auth/register", { username, email: $("register-email").value.trim(), password }, { auth: false });
      await loginWith(username, password);
    } catch (err) { notice(explain(err), "error"); }
  });
  $("logout").addEventListener("click", async () => {
    const tokens = tokensLoad();
    if (state.socket) state.socket.close();
    try { if (tokens) await api("POST", "/api/v1/auth/logout", { refresh: tokens.refresh }); } catch { /* logging out anyway */ }
    tokensSave(null);
    location.reload();
  });
  $("new-chat-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const chat = await api("POST", "/api/v1/chats/single", { username: $("new-chat-username").value.trim() });
      $("new-chat-username").value = "";
      await loadConversations();
      openConversation(String(chat.conversation_id));
    } catch (err) { notice(explain(err), "error"); }
  });
  $("new-group-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const members = $("new-group-members").value.split(",").map((s) => s.trim()).filter(Boolean);
    try {
      const chat = await api("POST", "/api/v1/chats/group", { name: $("new-group-name").value.trim(), members });
      $("new-group-name").value = ""; $("new-group-members").value = "";
      await loadConversations();
      openConversation(String(chat.conversation_id));
    } catch (err) { notice(explain(err), "error"); }
  });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); messageSend(); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); searchRun($("search-input").value); });
  $("search-more").addEventListener("click", () => searchRun("", { more: true }));
  $("composer-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); messageSend(); return; }
    typingSignal();
  });
  $("messages").addEventListener("scroll", async () => {
    const list = $("messages");
    const id = state.current;
    if (!id || list.scrollTop > 40 || state.exhausted.has(id) || list.dataset.loading) return;
    list.dataset.loading = "1";
    const fromBottom = list.scrollHeight - list.scrollTop;
    try {
      await loadPage(id, { before: state.oldestSeq.get(id) });
      renderMessages({ keepOffsetFrom: fromBottom });
    } catch (err) { notice(explain(err), "error"); } finally { delete list.dataset.loading; }
  });
  $("back").addEventListener("click", closeConversation);
  $("group-rename").addEventListener("click", () => groupAction("rename"));
  $("group-add-member").addEventListener("click", () => groupAction("member"));
  $("group-add-admin").addEventListener("click", () => groupAction("admin"));
  $("group-leave").addEventListener("click", () => groupAction("leave"));
  $("group-delete").addEventListener("click", () => groupAction("delete"));
  document.addEventListener("visibilitychange", scheduleRead);
  setInterval(renderTyping, 1000);
  setAuthLostHandler(showAuth);
}

wire();
if (tokensLoad()) showChat(); else showAuth();
