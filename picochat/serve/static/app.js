// picochat web UI: conversations kept in localStorage, replies streamed from /v1/chat/completions (SSE).
// Plain JavaScript, no build step; replies become HTML in static/markdown.js (marked, highlight.js and
// DOMPurify, vendored in static/vendor/): the model's HTML is shown as text, never as markup, and
// only http(s) links are linked (new tab, rel=noopener).
// Each conversation streams on its own: switching to another one leaves a reply running in the background.
"use strict";

(() => {
  const STORE_KEY = "picochat.conversations";
  const CURRENT_KEY = "picochat.current";
  const SETTINGS_KEY = "picochat.settings";
  const DEFAULT_SETTINGS = { temperature: 0.8, topP: 1, maxTokens: 512, systemPrompt: "", apiKey: "" };
  const SUGGESTIONS = ["Why is the sky blue?", "What is 23 * 47?", "Write a short poem about the sea."];

  const ICONS = {
    plus: '<path d="M12 5v14M5 12h14"/>',
    settings: '<circle cx="12" cy="12" r="3"/><path d="M12 2v3M12 19v3M4.2 4.2l2.1 2.1M17.7 17.7l2.1 2.1M2 12h3M19 12h3M4.2 19.8l2.1-2.1M17.7 6.3l2.1-2.1"/>',
    menu: '<path d="M4 6h16M4 12h16M4 18h16"/>',
    send: '<path d="M12 19V5M5 12l7-7 7 7"/>',
    stop: '<rect x="7" y="7" width="10" height="10" rx="1.5" fill="currentColor"/>',
    trash: '<path d="M4 7h16M9 7V4h6v3M6 7l1 13h10l1-13"/>',
    edit: '<path d="M4 20h4L19 9l-4-4L4 16v4z"/>',
    copy: '<rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V5a1 1 0 0 1 1-1h9"/>',
    regenerate: '<path d="M20 12a8 8 0 1 1-2.3-5.7M20 4v5h-5"/>',
    tool: '<path d="M5 4h14v16H5zM8 8h8M8 12h2M12 12h2M8 16h2M12 16h2"/>',
  };

  const $ = (id) => document.getElementById(id);
  const els = {
    sidebar: $("sidebar"), backdrop: $("backdrop"), list: $("conversation-list"), thread: $("thread"),
    input: $("input"), composer: $("composer"), send: $("send"), stop: $("stop"), modelName: $("model-name"),
    status: $("status"), settings: $("settings"), settingsForm: $("settings-form"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"), apiKeyRow: $("api-key-row"),
    modelSelect: $("model-select"), topP: $("top-p"), systemPrompt: $("system-prompt"), maxTokensHint: $("max-tokens-hint"),
    confirmDelete: $("confirm-delete"), confirmDeleteTitle: $("confirm-delete-title"),
  };

  const state = {
    conversations: loadJSON(STORE_KEY, []),
    currentId: localStorage.getItem(CURRENT_KEY),
    settings: { ...DEFAULT_SETTINGS, ...loadJSON(SETTINGS_KEY, {}) },
    model: "picochat",
    models: [], // [{ id, max_context }] from /health
    maxContext: null, // the model's context in tokens, from /health: bounds the max-tokens setting
    streams: new Map(), // conversation id -> { controller, reply } while its reply is being generated
    editing: null, // index of the user message being edited, in the current conversation
    renderQueued: false,
  };

  // ------------------------------------------------------------------------------------------
  // Storage

  function loadJSON(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value ?? fallback;
    } catch {
      return fallback;
    }
  }

  function saveConversations() {
    localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations));
    if (state.currentId) localStorage.setItem(CURRENT_KEY, state.currentId);
    else localStorage.removeItem(CURRENT_KEY);
  }

  function current() {
    return state.conversations.find((c) => c.id === state.currentId) || null;
  }

  function currentStream() { // the reply streaming in the conversation on screen, if any
    return state.streams.get(state.currentId) || null;
  }

  function createConversation(title) {
    const conversation = { id: crypto.randomUUID?.() || String(Date.now() + Math.random()), title,
      messages: [], updated: Date.now() };
    state.conversations.unshift(conversation);
    state.currentId = conversation.id;
    return conversation;
  }

  const { escapeHtml, renderMarkdown } = window.picochatMarkdown; // static/markdown.js

  // ------------------------------------------------------------------------------------------
  // Rendering

  function icon(name) {
    return `<svg class="icon" viewBox="0 0 24 24" aria-hidden="true">${ICONS[name]}</svg>`;
  }

  function element(tag, attributes = {}, html = "") {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    node.innerHTML = html;
    return node;
  }

  function button(iconName, label, testId, onClick) {
    const node = element("button", { type: "button", class: "icon-button", "aria-label": label, title: label,
      "data-testid": testId }, icon(iconName));
    node.addEventListener("click", onClick);
    return node;
  }

  // Assistant parts -> HTML: text as markdown, each python call (+ its output) as a tool-call box.
  function partsHtml(parts, streaming) {
    const html = [];
    for (let i = 0; i < parts.length; i++) {
      const part = parts[i];
      if (part.type === "text") {
        html.push(renderMarkdown(part.text));
      } else if (part.type === "python") {
        const output = parts[i + 1]?.type === "python_output" ? parts[++i].text : null;
        const result = output !== null
          ? `<pre class="tool-output" data-testid="tool-output"><code>${escapeHtml(output)}</code></pre>`
          : `<div class="tool-pending">${streaming ? "running…" : "no result"}</div>`;
        html.push(`<div class="tool-call" data-testid="tool-call"><div class="tool-head">${icon("tool")}` +
          `Calculator (python)</div><pre class="tool-code" data-testid="tool-code"><code>` +
          `${escapeHtml(part.text)}</code></pre><div class="tool-label">Result</div>${result}</div>`);
      } else { // an output without its call (should not happen): still show it
        html.push(`<pre class="tool-output" data-testid="tool-output"><code>${escapeHtml(part.text)}</code></pre>`);
      }
    }
    return html.join("");
  }

  function userMessage(message, index) {
    const row = element("div", { class: "message user", "data-testid": "message-user" });
    if (state.editing === index) {
      const editor = element("form", { class: "edit-form" });
      const area = element("textarea", { "aria-label": "Edit message", "data-testid": "edit-input", rows: "3" });
      area.value = message.content;
      const actions = element("div", { class: "edit-actions" });
      const cancel = element("button", { type: "button", class: "secondary" }, "Cancel");
      const submit = element("button", { type: "submit", "data-testid": "edit-submit" }, "Save &amp; submit");
      cancel.addEventListener("click", () => { state.editing = null; render(); });
      editor.addEventListener("submit", (event) => { event.preventDefault(); submitEdit(index, area.value); });
      area.addEventListener("keydown", (event) => {
        if (event.key === "Enter" && !event.shiftKey && !event.isComposing) editor.requestSubmit();
        if (event.key === "Escape") cancel.click();
      });
      actions.append(cancel, submit);
      editor.append(area, actions);
      row.append(editor);
      requestAnimationFrame(() => area.focus());
      return row;
    }
    const bubble = element("div", { class: "bubble", "data-testid": "user-content" });
    bubble.textContent = message.content;
    const actions = element("div", { class: "actions" });
    const edit = button("edit", "Edit message", "edit-message", () => { state.editing = index; render(); });
    edit.disabled = Boolean(currentStream());
    actions.append(edit);
    row.append(bubble, actions);
    return row;
  }

  function assistantMessage(message, isLast) {
    const row = element("div", { class: "message assistant", "data-testid": "message-assistant" });
    const streaming = currentStream()?.reply === message;
    row.append(element("div", { class: "avatar", "aria-hidden": "true" }, "p"));
    const body = element("div", { class: "assistant-body" });
    const content = element("div", { class: "content", "data-testid": "assistant-content" },
      partsHtml(message.parts, streaming));
    if (streaming) { // a blinking dot at the end of the text, inside the last paragraph if there is one
      const last = content.lastElementChild;
      (last?.tagName === "P" ? last : content).append(element("span", { class: "cursor", "aria-hidden": "true" }));
    }
    body.append(content);
    for (const notice of message.notices || []) {
      body.append(element("div", { class: "notice", "data-testid": "notice" }, escapeHtml(notice)));
    }
    if (message.finish === "stopped") body.append(element("div", { class: "notice" }, "Stopped."));
    if (message.finish === "length") {
      body.append(element("div", { class: "notice" }, "Reply cut at the max tokens limit (see Settings)."));
    }
    if (message.error) {
      body.append(element("div", { class: "error", role: "alert", "data-testid": "error" },
        escapeHtml(message.error)));
    }
    if (isLast && !currentStream()) {
      const actions = element("div", { class: "actions" });
      const copy = button("copy", "Copy reply", "copy-reply", () => copyText(plainText(message), copy));
      actions.append(copy, button("regenerate", "Regenerate reply", "regenerate", regenerate));
      body.append(actions);
    }
    row.append(body);
    return row;
  }

  function emptyState() {
    const box = element("div", { class: "empty", "data-testid": "empty-state" },
      `<h2>What can I help with?</h2><p>Chatting with <strong>${escapeHtml(state.model)}</strong></p>`);
    const chips = element("div", { class: "suggestions" });
    for (const text of SUGGESTIONS) {
      const chip = element("button", { type: "button", class: "suggestion", "data-testid": "suggestion" },
        escapeHtml(text));
      chip.addEventListener("click", () => sendMessage(text));
      chips.append(chip);
    }
    box.append(chips);
    return box;
  }

  function renderSidebar() {
    els.list.replaceChildren();
    const conversations = [...state.conversations].sort((a, b) => b.updated - a.updated);
    for (const conversation of conversations) {
      const item = element("li", { class: "conversation" + (conversation.id === state.currentId ? " active" : "") +
        (state.streams.has(conversation.id) ? " streaming" : ""), "data-testid": "conversation-item" });
      const open = element("button", { type: "button", class: "conversation-title", title: conversation.title },
        escapeHtml(conversation.title));
      if (conversation.id === state.currentId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => selectConversation(conversation.id));
      item.append(open, button("trash", "Delete conversation", "delete-conversation",
        () => deleteConversation(conversation.id)));
      els.list.append(item);
    }
  }

  // followOutput: scroll to the end unless the reader scrolled up to read something earlier.
  function renderThread(followOutput = false) {
    const conversation = current();
    const nearBottom = els.thread.scrollHeight - els.thread.scrollTop - els.thread.clientHeight < 120;
    els.thread.replaceChildren();
    if (!conversation || !conversation.messages.length) {
      els.thread.append(emptyState());
      return;
    }
    const column = element("div", { class: "column" });
    const last = conversation.messages.length - 1;
    conversation.messages.forEach((message, i) => {
      column.append(message.role === "user" ? userMessage(message, i) : assistantMessage(message, i === last));
    });
    els.thread.append(column);
    if (!followOutput || nearBottom) els.thread.scrollTop = els.thread.scrollHeight;
  }

  function renderComposer() {
    const busy = Boolean(currentStream());
    els.send.hidden = busy;
    els.stop.hidden = !busy;
    els.send.disabled = !els.input.value.trim();
  }

  function render() {
    renderSidebar();
    renderThread();
    renderComposer();
  }

  function scheduleRender() { // at most one re-render per animation frame while tokens stream in
    if (state.renderQueued) return;
    state.renderQueued = true;
    requestAnimationFrame(() => { state.renderQueued = false; renderThread(true); });
  }

  // ------------------------------------------------------------------------------------------
  // Talking to the server

  // The thread in the API's format. A turn whose reply failed or was stopped before any text is left
  // out (user message included), so the roles still alternate and the model never sees an empty reply.
  function apiMessages(messages) {
    const system = state.settings.systemPrompt.trim();
    const result = system ? [{ role: "system", content: system }] : [];
    for (const m of messages) {
      if (m.role === "user") result.push({ role: "user", content: m.content });
      else if (m.parts.length) result.push({ role: "assistant", content: m.parts });
      else if (result.at(-1)?.role === "user") result.pop();
    }
    return result;
  }

  function headers() {
    const result = { "Content-Type": "application/json" };
    if (state.settings.apiKey) result.Authorization = `Bearer ${state.settings.apiKey}`;
    return result;
  }

  async function errorFrom(response) {
    let message = `HTTP ${response.status}`;
    try {
      message = (await response.json()).error?.message || message;
    } catch { /* not JSON: keep the status */ }
    if (response.status === 429) {
      const wait = response.headers.get("Retry-After") || "a few";
      return new Error(`The server is busy right now (429). Try again in ${wait} s.`);
    }
    if (response.status === 401) {
      els.apiKeyRow.hidden = false;
      return new Error(`${message} Open Settings to enter the API key.`);
    }
    return new Error(message);
  }

  // Parse a server-sent-events body, calling onData with each JSON `data:` payload until [DONE].
  async function readEvents(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data === "[DONE]") return;
        if (data) onData(JSON.parse(data));
      }
    }
  }

  function appendPart(reply, kind, text) {
    if (!text) return;
    const last = reply.parts[reply.parts.length - 1];
    if (last && last.type === kind) last.text += text;
    else reply.parts.push({ type: kind, text });
  }

  function applyChunk(reply, chunk) {
    if (chunk.error) throw new Error(chunk.error.message);
    const choice = chunk.choices?.[0];
    if (!choice) return;
    const delta = choice.delta || {};
    if (delta.picochat) {
      appendPart(reply, delta.picochat.kind, delta.picochat.text);
      if (delta.picochat.notice) (reply.notices ||= []).push(delta.picochat.notice);
    } else {
      appendPart(reply, "text", delta.content); // a server without the picochat extension
    }
    if (choice.finish_reason) reply.finish = choice.finish_reason;
    scheduleRender();
  }

  async function generateReply(conversation) {
    const reply = { role: "assistant", parts: [] };
    const history = apiMessages(conversation.messages);
    conversation.messages.push(reply);
    conversation.updated = Date.now();
    const controller = new AbortController();
    state.streams.set(conversation.id, { controller, reply });
    saveConversations();
    render();
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        signal: controller.signal,
        body: JSON.stringify({
          model: state.model, messages: history, stream: true,
          temperature: state.settings.temperature, top_p: state.settings.topP,
          max_tokens: boundedMaxTokens(),
        }),
      });
      if (!response.ok) throw await errorFrom(response);
      await readEvents(response.body, (chunk) => applyChunk(reply, chunk));
    } catch (error) {
      if (error.name === "AbortError") reply.finish = "stopped";
      else reply.error = error.message || String(error);
    } finally {
      state.streams.delete(conversation.id);
      conversation.updated = Date.now();
      saveConversations();
      render();
      if (conversation.id === state.currentId) els.input.focus();
    }
  }

  function stopStreaming() {
    currentStream()?.controller.abort();
  }

  function boundedMaxTokens() { // a setting saved for a bigger model must not exceed this one's context
    return state.maxContext ? Math.min(state.settings.maxTokens, state.maxContext) : state.settings.maxTokens;
  }

  function sendMessage(text) {
    text = text.trim();
    if (!text || currentStream()) return;
    const conversation = current() || createConversation(text.slice(0, 48));
    conversation.messages.push({ role: "user", content: text });
    els.input.value = "";
    autoGrow();
    generateReply(conversation);
  }

  function regenerate() {
    const conversation = current();
    if (!conversation || currentStream()) return;
    if (conversation.messages[conversation.messages.length - 1]?.role === "assistant") conversation.messages.pop();
    generateReply(conversation);
  }

  function submitEdit(index, text) {
    const conversation = current();
    text = text.trim();
    if (!conversation || !text || currentStream()) return;
    state.editing = null;
    conversation.messages = conversation.messages.slice(0, index); // drop the edited turn and all after it
    conversation.messages.push({ role: "user", content: text });
    if (index === 0) conversation.title = text.slice(0, 48);
    generateReply(conversation);
  }

  // ------------------------------------------------------------------------------------------
  // Conversations, settings, clipboard

  function selectConversation(id) { // a reply streaming in the conversation left goes on in the background
    state.currentId = id;
    state.editing = null;
    saveConversations();
    closeSidebar();
    render();
  }

  function newChat() {
    selectConversation(null);
    els.input.focus();
  }

  function confirmDelete(conversation) { // resolves true when the user confirms in the dialog
    els.confirmDeleteTitle.textContent = conversation.title;
    els.confirmDelete.returnValue = "";
    els.confirmDelete.showModal();
    return new Promise((resolve) => {
      els.confirmDelete.addEventListener("close", () => resolve(els.confirmDelete.returnValue === "delete"),
        { once: true });
    });
  }

  async function deleteConversation(id) {
    const conversation = state.conversations.find((c) => c.id === id);
    if (!conversation || !(await confirmDelete(conversation))) return;
    state.streams.get(id)?.controller.abort();
    state.conversations = state.conversations.filter((c) => c.id !== id);
    if (state.currentId === id) state.currentId = null;
    saveConversations();
    render();
  }

  function plainText(message) {
    return message.parts.map((p) => p.type === "python" ? `\n${p.text}\n` : p.text).join("");
  }

  async function copyText(text, target) {
    try {
      await navigator.clipboard.writeText(text);
    } catch { // no clipboard API (plain http on another host): fall back to a hidden textarea
      const area = element("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const label = target.textContent;
    target.classList.add("copied");
    if (label) target.textContent = "Copied";
    setTimeout(() => {
      target.classList.remove("copied");
      if (label) target.textContent = label;
    }, 1200);
  }

  function openSettings() {
    els.temperature.value = state.settings.temperature;
    els.topP.value = state.settings.topP;
    els.maxTokens.value = boundedMaxTokens();
    els.systemPrompt.value = state.settings.systemPrompt;
    els.apiKey.value = state.settings.apiKey;
    els.settings.showModal();
  }

  function saveSettings(event) {
    event.preventDefault();
    if (!els.settingsForm.checkValidity()) { // the inputs carry the bounds (max tokens: the context)
      els.settingsForm.reportValidity();
      return;
    }
    state.settings = {
      ...state.settings,
      temperature: Number(els.temperature.value), topP: Number(els.topP.value),
      maxTokens: Number(els.maxTokens.value), systemPrompt: els.systemPrompt.value,
      apiKey: els.apiKey.value.trim(),
    };
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
    els.settings.close();
  }

  function openSidebar() { els.sidebar.classList.add("open"); els.backdrop.hidden = false; }
  function closeSidebar() { els.sidebar.classList.remove("open"); els.backdrop.hidden = true; }

  function autoGrow() {
    els.input.style.height = "auto";
    els.input.style.height = `${Math.min(els.input.scrollHeight, 200)}px`;
    renderComposer();
  }

  function chooseModel(model) { // the model new replies come from, and its context bounding max tokens
    state.model = model.id;
    state.maxContext = model.max_context;
    els.maxTokens.max = model.max_context;
    els.maxTokensHint.textContent = `longest reply, in tokens (at most ${model.max_context}, this model's context)`;
    els.modelName.textContent = model.id;
  }

  async function loadServerInfo() {
    try {
      const health = await (await fetch("/health")).json();
      state.models = health.models || [{ id: health.model, max_context: health.max_context }];
      const saved = state.models.find((m) => m.id === state.settings.model);
      chooseModel(saved || state.models[0]);
      els.modelSelect.replaceChildren(...state.models.map((m) => element("option", { value: m.id }, escapeHtml(m.id))));
      els.modelSelect.value = state.model;
      els.modelSelect.hidden = state.models.length < 2; // a menu only when the server has several models
      els.modelName.hidden = !els.modelSelect.hidden;
      els.apiKeyRow.hidden = !health.auth_required;
      els.status.textContent = "";
      if (!current()?.messages.length) renderThread();
    } catch {
      els.status.textContent = "server unreachable";
    }
  }

  // ------------------------------------------------------------------------------------------
  // Wiring

  for (const slot of document.querySelectorAll("[data-icon]")) slot.outerHTML = icon(slot.dataset.icon);
  els.composer.addEventListener("submit", (event) => { event.preventDefault(); sendMessage(els.input.value); });
  els.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage(els.input.value);
    }
  });
  els.input.addEventListener("input", autoGrow);
  els.stop.addEventListener("click", stopStreaming);
  $("new-chat").addEventListener("click", newChat);
  $("open-settings").addEventListener("click", openSettings);
  $("cancel-settings").addEventListener("click", () => els.settings.close());
  els.modelSelect.addEventListener("change", () => {
    chooseModel(state.models.find((m) => m.id === els.modelSelect.value));
    state.settings.model = state.model;
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
    if (!current()?.messages.length) renderThread();
  });
  $("cancel-delete").addEventListener("click", () => els.confirmDelete.close("cancel"));
  els.settingsForm.addEventListener("submit", saveSettings);
  $("toggle-sidebar").addEventListener("click", openSidebar);
  els.backdrop.addEventListener("click", closeSidebar);
  els.thread.addEventListener("click", (event) => { // copy buttons live inside rendered markdown
    const copy = event.target.closest(".copy-code");
    if (copy) copyText(copy.closest(".code-block").querySelector("code").textContent, copy);
  });

  if (!current()) state.currentId = null;
  render();
  loadServerInfo();
  els.input.focus();
})();
