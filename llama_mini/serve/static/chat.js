// The chat page of llama-mini serve: talks to this server's OpenAI-compatible API, streams the answers
// (server-sent events over fetch), and with "Look inside" shades each generated token by its probability
// and lists the model's top alternatives on hover (the API's logprobs). Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const TOP_ALTERNATIVES = 5;

let history = []; // the chat so far: {role, content}
let controller = null; // the AbortController of the answer being streamed

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

function setStatus(text) {
  $("status").textContent = text;
}

function addMessage(kind, text) {
  const element = document.createElement("div");
  element.className = "message " + kind;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text || "";
  element.appendChild(body);
  conversation.appendChild(element);
  conversation.scrollTop = conversation.scrollHeight;
  return element;
}

function note(element, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  element.appendChild(span);
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      setStatus(response.status === 401 ? "This server needs an API key: enter it above." : "Could not list the model.");
      return;
    }
    const model = (await response.json()).data[0];
    $("model-name").textContent = model.id + " (context " + model.context_length + " tokens)";
    $("mode").value = model.chat_template ? "chat" : "completion";
    $("max-tokens").max = model.context_length;
    // A reply may take at most half the context by default, so a conversation has room to go on.
    const half = Math.max(1, Math.floor(model.context_length / 2));
    if (Number($("max-tokens").value) > half) $("max-tokens").value = half;
  } catch (error) {
    setStatus("The server is not answering: " + error);
  }
}

// ---------------------------------------------------------------------------------------------- look inside

// A token's colour: the less likely the model found it, the warmer and stronger the shade.
function shade(probability) {
  const hue = Math.round(120 * probability); // 0 red (unlikely) .. 120 green (certain)
  return "hsla(" + hue + ", 80%, 60%, " + (0.15 + 0.45 * (1 - probability)).toFixed(2) + ")";
}

function describe(token, logprob, alternatives) {
  const lines = [JSON.stringify(token) + "  p = " + Math.exp(logprob).toFixed(3)];
  for (const alternative of alternatives) {
    lines.push("  " + JSON.stringify(alternative.token).padEnd(14) + " " + Math.exp(alternative.logprob).toFixed(3));
  }
  return lines.join("\n");
}

function showTooltip(event) {
  const target = event.target.closest(".token");
  let tooltip = $("tooltip");
  if (!target) {
    if (tooltip) tooltip.remove();
    return;
  }
  if (!tooltip) {
    tooltip = document.createElement("div");
    tooltip.id = "tooltip";
    document.body.appendChild(tooltip);
  }
  tooltip.textContent = target.dataset.info;
  tooltip.style.left = Math.min(event.clientX + 12, window.innerWidth - 260) + "px";
  tooltip.style.top = event.clientY + 16 + "px";
}

// Scored tokens of one streamed chunk -> [{token, logprob, top: [{token, logprob}]}] for either endpoint.
function scoredTokens(choice) {
  const logprobs = choice.logprobs;
  if (!logprobs) return [];
  if (logprobs.content) {
    return logprobs.content.map((entry) => ({ token: entry.token, logprob: entry.logprob, top: entry.top_logprobs }));
  }
  return logprobs.tokens.map((token, i) => ({
    token: token,
    logprob: logprobs.token_logprobs[i],
    top: Object.entries(logprobs.top_logprobs[i] || {}).map(([text, logprob]) => ({ token: text, logprob: logprob })),
  }));
}

// ---------------------------------------------------------------------------------------------- streaming

// Reads a server-sent event stream, calling onChunk with each parsed JSON chunk until "data: [DONE]".
async function readEvents(response, onChunk) {
  const reader = response.body.getReader();
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
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

async function send(text) {
  const chat = $("mode").value === "chat";
  const inside = $("inside").checked;
  const temperature = Number($("temperature").value);
  const maxTokens = Number($("max-tokens").value);
  let body, path, answer, target;
  if (chat) {
    history.push({ role: "user", content: text });
    addMessage("user", text);
    answer = addMessage("assistant", "");
    target = answer.querySelector(".text");
    path = "/v1/chat/completions";
    body = { messages: history, temperature: temperature, max_tokens: maxTokens, stream: true };
    if (inside) Object.assign(body, { logprobs: true, top_logprobs: TOP_ALTERNATIVES });
  } else {
    answer = addMessage("assistant completion", "");
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = text;
    answer.insertBefore(prompt, answer.firstChild);
    target = answer.querySelector(".text");
    path = "/v1/completions";
    body = { prompt: text, temperature: temperature, max_tokens: maxTokens, stream: true };
    if (inside) body.logprobs = TOP_ALTERNATIVES;
  }
  body.stream_options = { include_usage: true };

  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating...");
  let reply = "";
  let finish = null;
  let usage = null;
  let pending = []; // scored tokens whose text has not appeared yet (part of a character)
  const started = performance.now();
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({ error: { message: response.statusText } }));
      throw new Error(error.error.message);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const piece = chat ? choice.delta.content || "" : choice.text || "";
        if (choice.finish_reason) finish = choice.finish_reason;
        pending = pending.concat(scoredTokens(choice));
        if (!piece) continue;
        reply += piece;
        if (inside && pending.length) {
          const span = document.createElement("span");
          span.className = "token";
          span.textContent = piece;
          const first = pending[0]; // the token that opened this piece
          span.style.background = shade(Math.exp(first.logprob));
          span.dataset.info = pending.map((t) => describe(t.token, t.logprob, t.top)).join("\n");
          target.appendChild(span);
          pending = [];
        } else {
          target.appendChild(document.createTextNode(piece));
        }
      }
      conversation.scrollTop = conversation.scrollHeight;
    });
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    const reason = finish === "length" ? "cut at max tokens" : "done";
    setStatus(reason + (tokens !== null ? ": " + tokens + " tokens in " + seconds.toFixed(1) + " s" : ""));
    if (finish === "length") note(answer, "(cut at max tokens)");
  } catch (error) {
    if (error.name === "AbortError") {
      note(answer, "(stopped)");
      setStatus("stopped");
    } else {
      answer.classList.add("error");
      note(answer, error.message);
      setStatus("error");
      if (chat) history.pop(); // the message that could not be answered leaves the conversation
      reply = null;
    }
  } finally {
    if (chat && reply !== null) history.push({ role: "assistant", content: reply.trim() });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    answer.dataset.done = "true";
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value;
  if (!text.trim() || controller) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => {
  if (controller) controller.abort();
});
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  conversation.textContent = "";
  setStatus("");
});
$("mode").addEventListener("change", () => $("new-chat").click());
$("api-key").addEventListener("change", loadModel);
conversation.addEventListener("mousemove", showTooltip);
conversation.addEventListener("mouseleave", () => $("tooltip") && $("tooltip").remove());
loadModel();
