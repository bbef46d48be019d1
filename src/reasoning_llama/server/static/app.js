// The chat page: streams /v1/chat/completions and renders reasoning and answer.
// Safety rule: model and user text only ever reach the page through textContent /
// createTextNode; nothing here parses text as HTML.
"use strict";

const STORE = {
  conversation: "reasoning-llama.conversation",
  settings: "reasoning-llama.settings",
  apiKey: "reasoning-llama.api-key",
  answering: "reasoning-llama.answering", // {tab, since} while a tab streams a reply
};
// The page's tabs share one conversation, so one of them at a time gets a reply; a mark older than
// this is left by a tab that went away without clearing it.
const TAB = `${Date.now()}-${Math.random()}`;
const STALE_MARK_MS = 10 * 60 * 1000;

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  newChat: $("new-chat"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  systemPrompt: $("system-prompt"),
  apiKey: $("api-key"),
  apiKeyRow: $("api-key-row"),
  modelName: $("model-name"),
  status: $("status"),
};

let model = null;
let limits = { maxContext: null, defaultMaxTokens: null }; // from /health
// [{role, content, reasoning?, note?, dropped?}]; dropped: beyond the context, no longer sent
let conversation = loadConversation();
let controller = null; // the AbortController of the generation in flight
let streaming = null; // {chat, reply} of the generation in flight, kept if the page is left during it
const nodeOf = new WeakMap(); // message -> its bubble
// Errors that leaving out the oldest exchange can fix.
const TOO_MUCH_HISTORY = new Set(["context_length_exceeded", "too_many_messages", "prompt_too_long"]);

function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

// Keep the conversation for a reload (and for the page's other tabs). A browser's storage is a few
// MB: a conversation beyond it is kept on the page only, and the page says so.
// The stored conversation, without anything in it that is not a message (an older page's, or edited).
function loadConversation() {
  const stored = load(STORE.conversation, []);
  if (!Array.isArray(stored)) return [];
  const message = (m) =>
    m && typeof m === "object" && (m.role === "user" || m.role === "assistant") && typeof m.content === "string";
  return stored.filter(message);
}

function otherTabAnswering() {
  const mark = load(STORE.answering, null);
  return Boolean(mark && mark.tab !== TAB && Date.now() - mark.since < STALE_MARK_MS);
}

function markAnswering(answering) {
  try {
    if (answering) localStorage.setItem(STORE.answering, JSON.stringify({ tab: TAB, since: Date.now() }));
    else if (load(STORE.answering, null)?.tab === TAB) localStorage.removeItem(STORE.answering);
  } catch {
    // storage full or refused: the tabs then simply do not know of each other
  }
}

const WAIT_FOR_OTHER_TAB = "another tab of this page is getting a reply: wait for it to finish";

function save() {
  try {
    localStorage.setItem(STORE.conversation, JSON.stringify(conversation));
  } catch {
    setStatus("this conversation is too large for the browser to keep: it will not survive a reload");
  }
}

function saveSettings() {
  localStorage.setItem(
    STORE.settings,
    JSON.stringify({
      temperature: els.temperature.value,
      maxTokens: els.maxTokens.value,
      systemPrompt: els.systemPrompt.value,
    }),
  );
  localStorage.setItem(STORE.apiKey, els.apiKey.value);
}

function setStatus(text) {
  els.status.textContent = text;
}

// ---- safe markdown: block structure, then inline code / bold / italic -------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Underscores inside a word (snake_case) stay underscores, as in CommonMark.
const INLINE =
  /(`+)([\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|\*(?=\S)([^*]*?\S)\*|(?<![\p{L}\p{N}_])_(?=\S)([^_]*?\S)_(?![\p{L}\p{N}_])/u;

function appendInline(parent, text) {
  while (text) {
    const m = INLINE.exec(text);
    if (!m) {
      parent.appendChild(document.createTextNode(text));
      return;
    }
    if (m.index > 0) parent.appendChild(document.createTextNode(text.slice(0, m.index)));
    if (m[2] !== undefined) parent.appendChild(el("code", null, m[2]));
    else if (m[3] !== undefined) appendInline(parent.appendChild(el("strong")), m[3]);
    else appendInline(parent.appendChild(el("em")), m[4] !== undefined ? m[4] : m[5]);
    text = text.slice(m.index + m[0].length);
  }
}

function appendLines(parent, lines) {
  lines.forEach((line, i) => {
    if (i > 0) parent.appendChild(el("br"));
    appendInline(parent, line);
  });
}

function renderMarkdown(text, container) {
  container.replaceChildren();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)/);
    if (fence) {
      const code = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) code.push(lines[i++]);
      i++; // the closing fence (absent while a block is still streaming)
      const pre = el("pre");
      const codeEl = el("code", fence[2] ? `language-${fence[2]}` : null, code.join("\n"));
      pre.appendChild(codeEl);
      container.appendChild(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      appendInline(container.appendChild(el(`h${Math.min(6, heading[1].length + 2)}`)), heading[2]);
      i++;
      continue;
    }
    const listItem = /^\s*([-*+]|\d+[.)])\s+/;
    if (listItem.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = container.appendChild(el(ordered ? "ol" : "ul"));
      if (ordered) list.start = parseInt(line, 10); // a list that goes on after a paragraph keeps its numbers
      while (i < lines.length && listItem.test(lines[i])) {
        appendInline(list.appendChild(el("li")), lines[i].replace(listItem, ""));
        i++;
      }
      continue;
    }
    if (/^\s*>/.test(line)) {
      const quote = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quote.push(lines[i++].replace(/^\s*>\s?/, ""));
      appendLines(container.appendChild(el("blockquote")), quote);
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const para = [];
    while (
      i < lines.length &&
      lines[i].trim() &&
      !/^\s*(```|~~~|#{1,6}\s|>|[-*+]\s|\d+[.)]\s)/.test(lines[i])
    ) {
      para.push(lines[i++]);
    }
    if (!para.length) para.push(lines[i++]);
    appendLines(container.appendChild(el("p")), para);
  }
}

// ---- the conversation on the page --------------------------------------------------------

function userBubble(message) {
  const node = els.messages.appendChild(el("div", "message user", message.content));
  nodeOf.set(message, node);
  if (message.dropped) node.classList.add("dropped");
  return node;
}

function assistantBubble(message) {
  const node = el("div", "message assistant");
  nodeOf.set(message, node);
  if (message.dropped) node.classList.add("dropped");
  const thinking = el("details", "thinking");
  thinking.appendChild(el("summary", null, "Thinking"));
  const reasoning = thinking.appendChild(el("div", "reasoning"));
  const answer = el("div", "answer");
  const note = el("div", "note");
  node.append(thinking, answer, note);
  els.messages.appendChild(node);
  return {
    node,
    show(message, streaming) {
      reasoning.textContent = message.reasoning || "";
      thinking.hidden = !message.reasoning && !streaming;
      renderMarkdown(message.content || "", answer);
      note.textContent = message.note || "";
    },
    thinking,
  };
}

function errorBubble(text) {
  return els.messages.appendChild(el("div", "message error", text));
}

function renderConversation() {
  els.messages.replaceChildren();
  for (const message of conversation) {
    if (message.role === "user") userBubble(message);
    else if (message.role === "assistant") assistantBubble(message).show(message, false);
  }
  scrollToEnd();
}

function scrollToEnd() {
  window.scrollTo(0, document.body.scrollHeight);
}

// Run `update`, then keep the page at its end if it was there (a reader who scrolled up stays put).
function following(update) {
  const atEnd = window.innerHeight + window.scrollY >= document.body.scrollHeight - 48;
  update();
  if (atEnd) scrollToEnd();
}

// ---- talking to the server ---------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = els.apiKey.value;
  if (key && !/^[\x21-\x7e]+$/.test(key)) {
    throw new Error("the API key in Settings may hold only ASCII letters, digits and punctuation");
  }
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function requestBody(withLimit = true) {
  const messages = [];
  if (els.systemPrompt.value.trim()) messages.push({ role: "system", content: els.systemPrompt.value });
  for (const m of conversation) {
    if (!m.dropped && (m.role === "user" || (m.role === "assistant" && m.content))) {
      messages.push({ role: m.role, content: m.content });
    }
  }
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat(els.temperature.value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const budget = withLimit ? replyBudget() : null;
  if (budget !== null) body.max_tokens = budget;
  return body;
}

function askedMaxTokens() {
  // As typed (1e3 is 1000; 1.5 goes to the server, which says it must be a whole number); NaN when
  // empty: Settings leaves it to the server.
  const value = els.maxTokens.value.trim();
  return value === "" ? NaN : Number(value);
}

// Room kept for the reply (older exchanges are left out to make room for it): what Settings asks
// for, else the server's default but at most half the context, as the terminal chat keeps it; null
// when the server's limits are unknown (the server then fits the reply itself).
function replyBudget() {
  const asked = askedMaxTokens();
  if (!Number.isNaN(asked)) return asked;
  if (!limits.maxContext || !limits.defaultMaxTokens) return null;
  return Math.max(1, Math.min(limits.defaultMaxTokens, Math.floor(limits.maxContext / 2)));
}

// Leave the oldest exchange still sent out of the requests (never the question being asked, the
// last message); returns the messages it marked, none when no older exchange is left.
function dropOldestExchange() {
  const first = conversation.findIndex((m) => !m.dropped);
  const last = conversation.length - 1;
  if (first < 0 || first >= last) return [];
  const marked = [];
  for (let i = first; i < last && (i === first || conversation[i].role !== "user"); i++) {
    conversation[i].dropped = true;
    marked.push(conversation[i]);
  }
  for (const m of marked) nodeOf.get(m)?.classList.add("dropped");
  return marked;
}

// Send `messages` again with the next question (and show them so).
function offerAgain(messages) {
  for (const m of messages) {
    delete m.dropped;
    nodeOf.get(m)?.classList.remove("dropped");
  }
}

async function apiError(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error;
  } catch {
    // not JSON: fall through
  }
  return { message: `${response.status} ${response.statusText}`, code: null };
}

// POST the conversation, leaving out its oldest exchanges while the server says it is too long. With
// none left to drop and no max tokens in Settings, the question alone is sent without a limit: the
// server then fits the reply into the room left, as for any client.
async function postConversation(signal) {
  const dropped = [];
  let withLimit = true;
  let reread = false;
  try {
    for (;;) {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(requestBody(withLimit)),
        signal,
      });
      if (response.ok) {
        if (dropped.length) {
          save();
          setStatus("older messages no longer fit the model's context: they are left out (faded)");
        }
        return response;
      }
      const error = await apiError(response);
      if (error.code === "model_not_found" && !reread) {
        // The server was restarted with another model since the page loaded: take its name and limits.
        reread = true;
        if (await readHealth()) continue;
      }
      if (TOO_MUCH_HISTORY.has(error.code)) {
        const marked = dropOldestExchange();
        if (marked.length) {
          dropped.push(...marked);
          continue;
        }
        if (withLimit && Number.isNaN(askedMaxTokens()) && error.code === "context_length_exceeded") {
          withLimit = false;
          continue;
        }
      }
      if (response.status === 401) els.apiKeyRow.hidden = false;
      throw new Error(error.message);
    }
  } catch (error) {
    offerAgain(dropped); // nothing was sent after all (refused, or stopped): the history stays as it was
    throw error;
  }
}

// Yields each SSE `data:` payload of a fetch response body.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

function setBusy(busy) {
  els.send.hidden = busy;
  els.stop.hidden = !busy;
  els.prompt.disabled = false;
}

async function send(text) {
  controller = new AbortController();
  setBusy(true);
  markAnswering(true);
  const chat = conversation; // "New chat" during the reply starts another: this reply then leaves it alone
  const user = { role: "user", content: text };
  chat.push(user);
  save();
  const userNode = userBubble(user);
  const reply = { role: "assistant", content: "", reasoning: "" };
  const bubble = assistantBubble(reply);
  bubble.thinking.open = true; // open while the reasoning streams
  bubble.show(reply, true);
  scrollToEnd();
  streaming = { chat, reply };
  setStatus("generating…");
  let finishReason = null;
  try {
    await ready; // the model's name and limits come from /health
    if (!model) await readHealth();
    if (!model) throw new Error("cannot reach the server");
    controller.signal.throwIfAborted();
    const response = await postConversation(controller.signal);
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
      if (delta.content) {
        if (!reply.content) bubble.thinking.open = false; // the answer begins; the reader may reopen it
        reply.content += delta.content;
      }
      if (choice.finish_reason) finishReason = choice.finish_reason;
      following(() => bubble.show(reply, true));
    }
    if (finishReason === "length") reply.note = "(stopped at the token limit)";
    else if (finishReason === null) reply.note = "(the reply ended early: the connection closed)";
    if (els.status.textContent === "generating…") setStatus("");
  } catch (error) {
    if (conversation !== chat) {
      // stopped by "New chat": the reply belonged to the conversation that was cleared
    } else if (error.name === "AbortError") {
      reply.note = "(stopped)";
      setStatus("stopped");
    } else {
      setStatus("");
      if (!reply.content && !reply.reasoning) {
        // Nothing came back: take the question out of the history and put it back in the box,
        // unless the next one is being typed there already.
        userNode.remove();
        bubble.node.remove();
        chat.pop();
        save();
        if (els.prompt.value.trim()) errorBubble(`Error: ${error.message} (not sent: “${text}”)`);
        else {
          errorBubble(`Error: ${error.message}`);
          els.prompt.value = text;
        }
        finish();
        return;
      }
      errorBubble(`Error: ${error.message}`);
      reply.note = "(interrupted)";
    }
  }
  streaming = null;
  if (conversation === chat) {
    bubble.show(reply, false);
    chat.push(reply);
    save();
  }
  finish();
}

function finish() {
  controller = null;
  markAnswering(false);
  setBusy(false);
  els.prompt.focus();
}

// ---- wiring --------------------------------------------------------------------------------

els.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = els.prompt.value.trim();
  if (!text || controller) return;
  if (otherTabAnswering()) {
    setStatus(WAIT_FOR_OTHER_TAB);
    return;
  }
  els.prompt.value = "";
  send(text);
});

els.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    els.composer.requestSubmit();
  }
});

els.stop.addEventListener("click", () => {
  if (controller) controller.abort();
});

els.newChat.addEventListener("click", () => {
  if (otherTabAnswering()) {
    setStatus(WAIT_FOR_OTHER_TAB);
    return;
  }
  conversation = []; // before the abort, so the reply in flight sees it is no longer this chat's
  if (controller) controller.abort();
  save();
  renderConversation();
  setStatus("");
  els.prompt.focus();
});

for (const input of [els.temperature, els.maxTokens, els.systemPrompt, els.apiKey]) {
  input.addEventListener("change", saveSettings);
}

// Less room for the reply or a shorter system prompt may leave room for older exchanges: they are
// offered again, and the next question leaves out only what still does not fit.
for (const input of [els.maxTokens, els.systemPrompt]) {
  input.addEventListener("change", () => {
    const faded = conversation.filter((m) => m.dropped);
    offerAgain(faded);
    if (faded.length) save();
  });
}

// Leaving the page during a reply keeps what came of it, marked, so the history stays question, reply.
window.addEventListener("pagehide", () => {
  markAnswering(false);
  if (!streaming || streaming.chat !== conversation) return;
  // A new array: the reply in flight, failing as the page goes, then leaves this one alone.
  conversation = [...conversation, { ...streaming.reply, note: "(interrupted: the page was left)" }];
  save();
});

// Another tab of this page changed the conversation, or began or ended a reply: follow it.
window.addEventListener("storage", (event) => {
  if (controller) return; // this tab is getting a reply: the others wait for it
  if (event.key === STORE.answering) {
    setStatus(otherTabAnswering() ? WAIT_FOR_OTHER_TAB : "");
  } else if (event.key === STORE.conversation) {
    conversation = loadConversation();
    renderConversation();
  }
});

async function readHealth() {
  try {
    const health = await (await fetch("/health")).json();
    model = health.model;
    limits = { maxContext: health.max_context, defaultMaxTokens: health.default_max_tokens };
    els.modelName.textContent = `${health.model} · context ${health.max_context} tokens`;
    els.maxTokens.max = String(health.max_context);
    return health;
  } catch {
    setStatus("cannot reach the server");
    return null;
  }
}

async function init() {
  const settings = load(STORE.settings, {});
  if (settings.temperature !== undefined) els.temperature.value = settings.temperature;
  if (settings.maxTokens !== undefined) els.maxTokens.value = settings.maxTokens;
  if (settings.systemPrompt !== undefined) els.systemPrompt.value = settings.systemPrompt;
  els.apiKey.value = localStorage.getItem(STORE.apiKey) || "";
  renderConversation();
  if (otherTabAnswering()) setStatus(WAIT_FOR_OTHER_TAB);
  const health = await readHealth();
  if (health && health.api_key_required) {
    els.apiKeyRow.hidden = false;
    if (!els.apiKey.value) {
      document.getElementById("settings").open = true;
      setStatus("this server needs an API key: enter it under Settings");
    }
  }
  document.body.dataset.ready = "true";
}

const ready = init();
