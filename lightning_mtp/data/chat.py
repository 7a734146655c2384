"""From a record to token ids and labels: prompt/response pairs, chat ``messages``, or plain text.

Three record kinds (:class:`RecordFormat` says which fields hold them):

- ``prompt_response``: ``[bos] prompt response [eos]``, or, with ``use_chat_template``, a one-turn chat
  (optional system prompt, user = prompt, assistant = response) rendered with the tokenizer's template;
- ``messages``: a chat (``[{"role": ..., "content": ...}, ...]``; ShareGPT's ``from``/``value`` with roles
  ``human``/``gpt`` are accepted too) rendered with the tokenizer's chat template (``apply_chat_template``);
- ``text``: ``[bos] text [eos]``, every token trained.

Labels are the input ids with -100 where no loss belongs. With ``loss_on="response"`` that is everything
but the responses: the assistant turns of a chat (their end-of-turn token included, so the model learns
to stop) or the response and its eos. ``"last_turn"`` trains only the final assistant turn; ``"all"``
trains every token.

Chats are located in token space by rendering prefixes: assistant turn i spans from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i+1])``, and each
text segment is tokenised on its own. That is how the model meets the text at inference (the prompt is
rendered with the generation prompt and tokenised alone; generated tokens follow), and it needs no
``{% generation %}`` markers in the template. Templates that rewrite earlier assistant turns once later
ones follow (Qwen3's drops earlier reasoning) cannot be split this way for every turn: a clear error says
to use ``loss_on="last_turn"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "FIELDS",
    "LOSS_ON",
    "TRUNCATIONS",
    "RecordEncoder",
    "RecordFormat",
    "chat_segments",
    "normalize_messages",
    "prompt_of",
    "render_chat",
    "require_chat_template",
]

FIELDS = ("auto", "prompt_response", "messages", "text")
LOSS_ON = ("response", "last_turn", "all")
TRUNCATIONS = ("right", "left", "drop")

# status codes of encoded records (the ``status`` column RecordEncoder writes)
KEPT, TRUNCATED, TOO_LONG, NO_TARGETS = 0, 1, 2, 3
STATUS_NAMES = {KEPT: "kept", TRUNCATED: "truncated", TOO_LONG: "dropped: too long", NO_TARGETS: "dropped: no response tokens"}

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "tool": "tool", "function": "tool"}


@dataclass(frozen=True)
class RecordFormat:
    """Which fields of a record hold the data, and how they become a training sequence."""

    fields: str = "auto"
    """``prompt_response``, ``messages``, ``text``, or ``auto`` (the first of those whose field the data has)."""
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    use_chat_template: bool = False
    """Render prompt/response pairs as a one-turn chat with the chat template (chats always are)."""
    chat_template: str | None = None
    """A Jinja chat template used instead of the tokenizer's own."""
    system_prompt: str | None = None
    """Put first in every chat that has no system message."""
    loss_on: str = "response"
    """``response`` (assistant turns / responses), ``last_turn`` (the final assistant turn), ``all``."""

    def __post_init__(self) -> None:
        if self.fields not in FIELDS:
            raise ValueError(f"unknown fields {self.fields!r}; choose one of {list(FIELDS)}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"unknown loss_on {self.loss_on!r}; choose one of {list(LOSS_ON)}")

    @property
    def uses_chat_template(self) -> bool:
        return self.fields == "messages" or (self.fields == "prompt_response" and self.use_chat_template)

    def resolve(self, columns: Sequence[str], source: str, *, prompts_only: bool = False) -> RecordFormat:
        """This format with ``fields`` made concrete for data with ``columns``; a missing field is an error.

        ``prompts_only`` (self-distillation) needs no response field, and reads ``text`` records as prompts.
        """
        cols = set(columns)
        kind = self.fields
        if kind == "auto":
            if self.messages_field in cols:
                kind = "messages"
            elif self.prompt_field in cols and (prompts_only or self.response_field in cols):
                kind = "prompt_response"
            elif self.text_field in cols:
                kind = "text"
            else:
                wanted = (f"{self.messages_field!r} (chat), {self.prompt_field!r}"
                          + ("" if prompts_only else f" + {self.response_field!r}") + f", or {self.text_field!r}")
                raise ValueError(f"{source}: no known field among its fields {sorted(cols)}; expected {wanted}. "
                                 "Name yours with messages_field / prompt_field / response_field / text_field")
        needed = {"messages": [("messages_field", self.messages_field)],
                  "text": [("text_field", self.text_field)],
                  "prompt_response": [("prompt_field", self.prompt_field)]
                  + ([] if prompts_only else [("response_field", self.response_field)])}[kind]
        for arg, name in needed:
            if name not in cols:
                raise ValueError(f"{source} has no field {name!r} (its fields: {sorted(cols)}); set {arg}")
        return replace(self, fields=kind)


def require_chat_template(tokenizer, fmt: RecordFormat, why: str) -> str:
    """The chat template to render with: ``fmt.chat_template`` or the tokenizer's; a clear error if neither."""
    template = fmt.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"{why} needs a chat template, but tokenizer {name!r} has none: pass chat_template "
                         "(a Jinja template string or a .jinja file), or use a tokenizer that has one")
    return template


def normalize_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` from a chat record (ShareGPT ``from``/``value`` too); bad shapes name the record."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {j} is a {type(m).__name__}, not a mapping with role and content")
        role = m.get("role") if m.get("role") is not None else _SHAREGPT_ROLES.get(m.get("from"), m.get("from"))
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"{where}: message {j} needs a string 'role' and 'content' (or ShareGPT 'from' and "
                             f"'value'); it has keys {sorted(k for k, v in m.items() if v is not None)}")
        out.append({"role": role, "content": content})
    return out


def _with_system(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def render_chat(tokenizer, messages: list[dict[str, str]], template: str, where: str,
                add_generation_prompt: bool = False) -> str:
    """``apply_chat_template`` to text; a template error (e.g. roles must alternate) names the record."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja2 raises TemplateError subclasses, templates raise their own messages
        raise ValueError(f"{where}: the chat template failed: {type(err).__name__}: {err}") from None


def chat_segments(tokenizer, messages: list[dict[str, str]], template: str, loss_on: str,
                  where: str) -> list[tuple[str, bool]]:
    """Split the rendered chat into ``(text, trained)`` segments; see the module docstring for how."""
    full = render_chat(tokenizer, messages, template, where)
    if loss_on == "all":
        return [(full, True)]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_turn":
        turns = turns[-1:]
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i in turns:
        prefix = render_chat(tokenizer, messages[:i], template, where, add_generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1], template, where)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= pos):
            raise ValueError(
                f"{where}: the chat template renders assistant message {i} differently once later turns follow "
                "(it rewrites earlier turns, e.g. drops their reasoning), so the turn cannot be located in the "
                "rendered chat; train on the final assistant turn only with loss_on='last_turn'"
            )
        segments += [(full[pos : len(prefix)], False), (full[len(prefix) : len(upto)], True)]
        pos = len(upto)
    segments.append((full[pos:], False))
    return [s for s in segments if s[0]]


def prompt_of(record: dict[str, Any], fmt: RecordFormat, tokenizer, template: str | None,
              where: str) -> tuple[list[int] | None, str, list[dict[str, str]] | None]:
    """What a backbone is asked to answer, for self-distillation: ``(token ids, text, chat history or None)``.

    A chat is cut after its last non-assistant message (trailing assistant turns are what gets regenerated).
    Chats, and prompts with ``use_chat_template``, are rendered with the generation prompt; plain prompts are
    ``[bos] prompt``, as in training. Ids are None without a tokenizer (generation by a server).
    """
    history = None
    if fmt.fields == "messages":
        history = normalize_messages(record.get(fmt.messages_field), f"{where}, field {fmt.messages_field!r}")
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not any(m["role"] != "system" for m in history):
            raise ValueError(f"{where}: the chat in field {fmt.messages_field!r} has no user message to answer")
    else:
        field = fmt.prompt_field if fmt.fields == "prompt_response" else fmt.text_field
        text = record.get(field)
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where} has no {field!r} (a non-empty string), got {text!r}")
        if fmt.use_chat_template:
            history = [{"role": "user", "content": text}]
    if history is not None:
        history = _with_system(history, fmt.system_prompt)
        if tokenizer is None:
            return None, "", history
        text = render_chat(tokenizer, history, template, where, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], text, history
    if tokenizer is None:
        return None, text, None
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"], text, None


class RecordEncoder:
    """``datasets.map(batched=True, with_indices=True)`` function: records -> ``input_ids``, ``labels``,
    ``length``, ``targets`` (tokens with a loss) and ``status`` (kept, truncated, or why dropped).

    Args:
        tokenizer: the backbone's tokenizer.
        fmt: a resolved :class:`RecordFormat` (``fields`` not ``auto``).
        template: the chat template, when ``fmt`` renders chats.
        max_length: longest sequence kept.
        truncation: ``right`` (cut the end), ``left`` (cut the start, keeping the response), ``drop``.
        source: how errors name the data (``"train data 'x.jsonl'"``).
    """

    def __init__(self, tokenizer, fmt: RecordFormat, template: str | None, max_length: int, truncation: str,
                 source: str) -> None:
        if truncation not in TRUNCATIONS:
            raise ValueError(f"unknown truncation {truncation!r}; choose one of {list(TRUNCATIONS)}")
        self.tokenizer, self.fmt, self.template = tokenizer, fmt, template
        self.max_length, self.truncation, self.source = max_length, truncation, source

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        fmt, tok = self.fmt, self.tokenizer
        pieces: list[list[tuple[str, bool]]] = []
        for row, i in enumerate(indices):
            where = f"record {i} of {self.source}"
            pieces.append(self._segments({k: v[row] for k, v in batch.items()}, where))
        flat = [text for segs in pieces for text, _ in segs]
        ids_flat = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and not fmt.uses_chat_template else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None and not fmt.uses_chat_template else []
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "targets": [], "status": []}
        k = 0
        for segs in pieces:
            ids = list(bos)
            labels = list(bos) if fmt.loss_on == "all" else [-100] * len(bos)
            for _, trained in segs:
                ids += ids_flat[k]
                labels += ids_flat[k] if trained else [-100] * len(ids_flat[k])
                k += 1
            if eos:  # plain formats end with eos, trained whenever the text before it is
                ids += eos
                labels += eos if segs and segs[-1][1] else [-100]
            status = KEPT
            if len(ids) > self.max_length:
                if self.truncation == "drop":
                    ids, labels, status = [], [], TOO_LONG
                else:
                    cut = slice(None, self.max_length) if self.truncation == "right" else slice(-self.max_length, None)
                    ids, labels, status = ids[cut], labels[cut], TRUNCATED
            targets = sum(1 for lab in labels[1:] if lab != -100)  # the first token is never predicted
            if status != TOO_LONG and targets == 0:
                ids, labels, status = [], [], NO_TARGETS
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["targets"].append(targets if ids else 0)
            out["status"].append(status)
        return out

    def _segments(self, record: dict[str, Any], where: str) -> list[tuple[str, bool]]:
        fmt = self.fmt
        if fmt.fields == "text":
            return [(_string(record, fmt.text_field, where), True)]
        if fmt.fields == "messages":
            messages = normalize_messages(record.get(fmt.messages_field), f"{where}, field {fmt.messages_field!r}")
            return chat_segments(self.tokenizer, _with_system(messages, fmt.system_prompt), self.template,
                                 fmt.loss_on, where)
        prompt = _string(record, fmt.prompt_field, where)
        response = _string(record, fmt.response_field, where)
        if fmt.use_chat_template:
            messages = _with_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                    fmt.system_prompt)
            return chat_segments(self.tokenizer, messages, self.template, fmt.loss_on, where)
        trained_prompt = fmt.loss_on == "all"
        return [(prompt, trained_prompt), (response, True)]


def _string(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise ValueError(f"{where} has no {field!r} (a string), got {value!r}")
    return value
