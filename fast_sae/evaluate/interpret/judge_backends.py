"""Judge backends: a local transformers chat model, or any OpenAI-compatible HTTP endpoint.

Both expose the same small interface, used by ``judge.ask``:
``kind`` ("local" | "openai"), ``model``, ``settings()`` (what else changes a reply; part of the
cache key), ``complete(messages, attempt) -> str`` and ``calls`` (how many requests were really made).
Attempt 0 is greedy / temperature 0, so a judge is reproducible; a retry after a malformed reply
samples (``retry_temperature``, seeded by the attempt number where the backend allows), otherwise a
deterministic judge would repeat the same malformed answer.

Why the standard library and not an SDK: the only protocol needed is one POST to
``/v1/chat/completions`` (http_client.py, with a total deadline, a size cap and no cross-origin
redirects); it works with vLLM, llama.cpp, Ollama and hosted APIs alike.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
from typing import Any

import torch

from fast_sae.lm import EMBEDDED_MODEL, load_model, load_tokenizer

from .config import JudgeConfig
from .http_client import HTTPFailure, post
from .judge import BackendError, is_placeholder

PLACEHOLDER_REDRAWS = 4

MAX_REPLY_BYTES = 4 << 20  # a chat completion is a few kB; a larger reply is a misbehaving server


def _cache_arg(model: Any) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers 5, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class LocalBackend:
    """A transformers chat model run here (default: the embedded SmolLM2-135M-Instruct).

    ``constrained`` (default on): when the caller passes the prompt's AnswerForm, the reply is
    built in that format instead of generated freely: the choice (score) is the one with the highest
    log-likelihood of ``choice + "]]"`` after the chat prompt and the form's prefix (scored in one
    batched forward pass), and only the free-text field (the feature name) is generated, up to its
    closing ``]]``. Why: a small local model understands the rubric a little but almost never
    writes the verdict line, so unconstrained it would leave every feature unscored. The reply still
    goes through the same strict parser (an empty or placeholder name is still rejected); a name that
    is a placeholder (NAME, Names, S ...) is banned and redrawn, up to ``PLACEHOLDER_REDRAWS`` times.
    """

    kind = "local"

    def __init__(self, model_id: str, *, max_new_tokens: int = 64, retry_temperature: float = 0.7,
                 device: str = "cpu", constrained: bool = True, model: Any = None, tokenizer: Any = None) -> None:
        self.model_id = self.model = model_id
        self.max_new_tokens, self.retry_temperature, self.device = max_new_tokens, retry_temperature, device
        self.constrained = constrained
        self._lm, self._tok = model, tokenizer  # a preloaded (model, tokenizer) saves a second load
        self.calls = 0

    def settings(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "retry_temperature": self.retry_temperature,
                "constrained": self.constrained}

    def _load(self) -> tuple[Any, Any]:
        if self._lm is None:
            self._lm = load_model(self.model_id, device=self.device)
        if self._tok is None:
            self._tok = load_tokenizer(self.model_id)
        return self._lm, self._tok

    def _ids(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def _generate(self, text: str, attempt: int, max_new_tokens: int, banned: tuple[str, ...] = (),
                  banned_ids: list[list[int]] | None = None) -> tuple[str, list[int]]:
        """Greedy (attempt 0) or sampled continuation of ``text``: (decoded text, new token ids)."""
        model, tok = self._lm, self._tok
        input_ids = torch.tensor([self._ids(text)], device=model.device)
        kwargs: dict[str, Any] = {"do_sample": False}
        if banned or banned_ids:  # small models copy the prompt's placeholders ("[[NAME]]", "[[S]]")
            words = dict.fromkeys(w for v in banned for c in (v, v.capitalize(), v.lower()) if len(c) > 1 or c == v
                                  for w in (c, " " + c))
            kwargs["bad_words_ids"] = [self._ids(w) for w in words] + list(banned_ids or [])
        if attempt > 0 and self.retry_temperature > 0:
            torch.manual_seed(attempt)
            kwargs.update(do_sample=True, temperature=self.retry_temperature, top_p=1.0, top_k=0)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             **kwargs)
        new = out[0, input_ids.shape[1]:]
        return tok.decode(new, skip_special_tokens=True), new.tolist()

    def _best_choice(self, context: str, choices: tuple[str, ...]) -> str:
        """The choice maximising log P(choice + ']]' | context).

        The context runs once; each choice's few tokens then run on a copy of its KV cache. If the
        tokenizer merges a choice into the context's last token, every choice is instead scored by a
        full forward pass after the longest common token prefix (slower, same quantity).
        """
        model = self._lm
        base = self._ids(context)
        seqs = [self._ids(context + c + "]]") for c in choices]
        if all(len(s) > len(base) and s[:len(base)] == base for s in seqs):
            out = model(input_ids=torch.tensor([base], device=model.device), use_cache=True)
            first = out.logits[0, -1].float().log_softmax(-1)
            scores = []
            for s in seqs:
                tail = s[len(base):]
                total = float(first[tail[0]])
                if len(tail) > 1:
                    more = model(input_ids=torch.tensor([tail[:-1]], device=model.device),
                                 **{_cache_arg(model): copy.deepcopy(_cache_of(out))}, use_cache=True)
                    logp = more.logits[0].float().log_softmax(-1)
                    total += float(sum(logp[j, tail[j + 1]] for j in range(len(tail) - 1)))
                scores.append(total)
            return choices[max(range(len(choices)), key=lambda i: scores[i])]
        common = 0
        while all(len(s) > common for s in seqs) and len({s[common] for s in seqs}) == 1:
            common += 1
        scores = []
        for s in seqs:
            logp = model(input_ids=torch.tensor([s], device=model.device)).logits[0].float().log_softmax(-1)
            scores.append(float(sum(logp[j - 1, s[j]] for j in range(max(common, 1), len(s)))))
        return choices[max(range(len(choices)), key=lambda i: scores[i])]

    @torch.no_grad()
    def complete(self, messages: list[dict], attempt: int = 0, form: Any = None) -> str:
        _, tok = self._load()
        self.calls += 1
        chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if form is None or not self.constrained:
            return self._generate(chat, attempt, self.max_new_tokens)[0]
        choice = self._best_choice(chat + form.prefix, form.choices)
        reply = form.prefix + choice + form.after_choice
        if form.free_text_end is None:
            return reply
        banned_ids: list[list[int]] = []
        for _ in range(PLACEHOLDER_REDRAWS):  # a placeholder copied from the prompt: its first token is banned
            text, ids = self._generate(chat + reply, attempt, self.max_new_tokens, banned=form.placeholders,
                                       banned_ids=banned_ids)
            free = text.split(form.free_text_end)[0].split("\n")[0].strip()
            if not is_placeholder(free) or not ids:
                break
            banned_ids.append(ids[:1])
        return reply + free + form.free_text_end


def answer_regex(form: Any) -> str:
    """The regular expression of an AnswerForm's replies: prefix, one choice, and the free-text field
    (a letter first, no brackets or newline, at most 40 characters) when the form has one."""
    def esc(literal: str) -> str:  # only the metacharacters: servers' regex engines differ on escaped spaces
        return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", literal)

    text = esc(form.prefix) + "(" + "|".join(esc(c) for c in form.choices) + ")" + esc(form.after_choice)
    if form.free_text_end is not None:
        text += r"[A-Za-z][^\[\]\n]{0,39}" + esc(form.free_text_end)
    return text


class OpenAIBackend:
    """Any server speaking the OpenAI chat-completions protocol (vLLM, llama.cpp, hosted APIs).

    Each reply must arrive within ``timeout_s`` in total and ``max_reply_bytes``; the API key is
    sent only to the configured origin (http_client.py). Every failure is a ``BackendError``.
    """

    kind = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 max_new_tokens: int = 64, timeout_s: float = 120.0, retry_temperature: float = 0.7,
                 max_reply_bytes: int = MAX_REPLY_BYTES, structured: bool = False) -> None:
        root = base_url.rstrip("/")
        self.url = root + ("/chat/completions" if root.endswith("/v1") else "/v1/chat/completions")
        self.model = model
        self.api_key_env = api_key_env
        self.max_new_tokens, self.timeout_s, self.retry_temperature = max_new_tokens, timeout_s, retry_temperature
        self.max_reply_bytes = max_reply_bytes
        self.structured = structured
        self.calls = 0

    def settings(self) -> dict:
        # not the URL: the same served model at another address gives the same answers
        return {"max_new_tokens": self.max_new_tokens, "retry_temperature": self.retry_temperature} | (
            {"structured": True} if self.structured else {})

    def complete(self, messages: list[dict], attempt: int = 0, form: Any = None) -> str:
        """One chat completion. With ``structured`` and the prompt's ``form``, the server is asked to
        decode only replies matching the answer format (vLLM's ``structured_outputs`` regex extension;
        hosted APIs reject the field, so it is off by default and the reply is parsed strictly either way)."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens,
                                "temperature": 0.0 if attempt == 0 else self.retry_temperature, "seed": attempt}
        if self.structured and form is not None:
            body["structured_outputs"] = {"regex": answer_regex(form)}
            # a constrained small model may spell the format's literal text one character a token
            literal = len(form.prefix) + len(form.after_choice) + len(form.free_text_end or "") + 2
            body["max_tokens"] = self.max_new_tokens + literal
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.calls += 1
        try:
            status, data = post(self.url, json.dumps(body).encode(), headers, self.timeout_s, self.max_reply_bytes)
        except HTTPFailure as exc:
            raise BackendError(str(exc)) from None
        if status >= 400:
            detail = data.decode("utf-8", "replace")[:200]
            raise BackendError(f"{self.url}: HTTP {status}: {detail}")
        try:
            payload = json.loads(data.decode("utf-8"))
        except ValueError as exc:
            raise BackendError(f"{self.url}: response is not JSON ({exc})") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.url}: response lacks choices[0].message.content: {str(payload)[:200]}") from None
        if not isinstance(content, str):
            raise BackendError(f"{self.url}: message content is {type(content).__name__}, expected text")
        return content


def make_backend(cfg: JudgeConfig, *, model: Any = None, tokenizer: Any = None) -> LocalBackend | OpenAIBackend:
    """The backend a JudgeConfig describes; ``model``/``tokenizer`` reuse an already loaded local model."""
    if cfg.backend == "local":
        return LocalBackend(cfg.model or EMBEDDED_MODEL, max_new_tokens=cfg.max_new_tokens,
                            retry_temperature=cfg.retry_temperature, device=cfg.device,
                            constrained=cfg.constrained, model=model, tokenizer=tokenizer)
    return OpenAIBackend(cfg.base_url or "", cfg.model or "", api_key_env=cfg.api_key_env,
                         max_new_tokens=cfg.max_new_tokens, timeout_s=cfg.timeout_s,
                         retry_temperature=cfg.retry_temperature, structured=cfg.structured)
