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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lightning_mtp.data.files import ORIGIN_COLUMN, RecordPlace
from lightning_mtp.errors import UserInputError

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
    "require_usable",
]

FIELDS = ("auto", "prompt_response", "messages", "text")
LOSS_ON = ("response", "last_turn", "all")
TRUNCATIONS = ("right", "left", "drop")

# status codes of encoded records (the ``status`` column RecordEncoder writes)
KEPT, TRUNCATED, TOO_LONG, NO_TARGETS, EMPTY_RESPONSE, EMPTY_TEXT = 0, 1, 2, 3, 4, 5
STATUS_NAMES = {KEPT: "kept", TRUNCATED: "truncated", TOO_LONG: "dropped: too long",
                NO_TARGETS: "dropped: no response tokens", EMPTY_RESPONSE: "dropped: empty response",
                EMPTY_TEXT: "dropped: empty text"}
_FIXES = {  # what to do when every record was dropped for this reason
    "dropped: too long": "raise max_length, or use truncation='right' or 'left' instead of 'drop'",
    "dropped: no response tokens": "raise max_length or use truncation='left' (it keeps the response), and check "
                                   "that chats have assistant turns",
    "dropped: empty response": "fill the response field (or the assistant turns), or point response_field / "
                               "messages_field at the field that holds the answers",
    "dropped: empty text": "check text_field: it names a field whose values are empty",
}

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
            raise UserInputError(f"unknown fields {self.fields!r}; choose one of {list(FIELDS)}")
        if self.loss_on not in LOSS_ON:
            raise UserInputError(f"unknown loss_on {self.loss_on!r}; choose one of {list(LOSS_ON)}")

    @property
    def uses_chat_template(self) -> bool:
        return self.fields == "messages" or (self.fields == "prompt_response" and self.use_chat_template)

    def resolve(self, columns: Sequence[str], source: str, *, prompts_only: bool = False) -> RecordFormat:
        """This format with ``fields`` made concrete for data with ``columns``; a missing field is an error.

        ``prompts_only`` (self-distillation) needs no response field, and reads ``text`` records as prompts.
        """
        cols = set(columns) - {ORIGIN_COLUMN}  # load_source's bookkeeping, not a field of the data
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
                raise UserInputError(f"{source}: no known field among its fields {sorted(cols)}; expected {wanted}. "
                                     "Name yours with messages_field / prompt_field / response_field / text_field")
        needed = {"messages": [("messages_field", self.messages_field)],
                  "text": [("text_field", self.text_field)],
                  "prompt_response": [("prompt_field", self.prompt_field)]
                  + ([] if prompts_only else [("response_field", self.response_field)])}[kind]
        for arg, name in needed:
            if name not in cols:
                raise UserInputError(f"{source} has no field {name!r} (its fields: {sorted(cols)}); set {arg}")
        return replace(self, fields=kind)


def require_chat_template(tokenizer, fmt: RecordFormat, why: str) -> str:
    """The chat template to render with: ``fmt.chat_template`` or the tokenizer's; a clear error if neither."""
    template = fmt.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserInputError(f"{why} needs a chat template, but tokenizer {name!r} has none: pass chat_template "
                             "(a Jinja template string or a .jinja file), or use a tokenizer that has one")
    return template


def normalize_messages(messages: Any, where: Any, field: str | None = None) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` from a chat record (ShareGPT ``from``/``value`` too); bad shapes name the record
    (``where``, a string or a :class:`~lightning_mtp.data.files.RecordPlace`, and the chat's ``field``)."""
    if not isinstance(messages, list) or not messages:
        raise UserInputError(f"{_at(where, field)}: expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserInputError(f"{_at(where, field)}: message {j} is a {type(m).__name__}, not a mapping with role and "
                                 "content")
        role = m.get("role") if m.get("role") is not None else _SHAREGPT_ROLES.get(m.get("from"), m.get("from"))
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if not isinstance(role, str) or not isinstance(content, str):
            raise UserInputError(f"{_at(where, field)}: message {j} needs a string 'role' and 'content' (or ShareGPT "
                                 f"'from' and 'value'); it has keys {sorted(k for k, v in m.items() if v is not None)}")
        out.append({"role": role, "content": content})
    return out


def _at(where: Any, field: str | None) -> str:
    """``where`` with the field named; called only to raise, as formatting a RecordPlace may read files."""
    return f"{where}, field {field!r}" if field is not None else str(where)


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
        raise UserInputError(f"{where}: the chat template failed: {type(err).__name__}: {err}") from None


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
            raise UserInputError(
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
    ``[bos] prompt``, as in training. Ids are None without a tokenizer (generation by a server). Errors name
    the record's file and line when it came from :func:`~lightning_mtp.data.files.load_source`, else ``where``.
    """
    where = RecordPlace(record.get(ORIGIN_COLUMN), None, where)
    history = None
    if fmt.fields == "messages":
        history = normalize_messages(record.get(fmt.messages_field), where, fmt.messages_field)
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not any(m["role"] != "system" for m in history):
            raise UserInputError(f"{where}: the chat in field {fmt.messages_field!r} has no user message to answer")
    else:
        field = fmt.prompt_field if fmt.fields == "prompt_response" else fmt.text_field
        text = record.get(field)
        if not isinstance(text, str) or not text:
            raise UserInputError(f"{where} has no {field!r} (a non-empty string), got {text!r}")
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

    A record whose trained text is empty (an empty response, empty assistant turns, an empty text) is dropped
    (``dropped: empty response`` / ``dropped: empty text``): it would teach nothing but the end token. Errors
    name the record by file and 1-based line (JSON Lines, text) or row (Parquet, Hub and saved datasets).

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
            raise UserInputError(f"unknown truncation {truncation!r}; choose one of {list(TRUNCATIONS)}")
        self.tokenizer, self.fmt, self.template = tokenizer, fmt, template
        self.max_length, self.truncation, self.source = max_length, truncation, source

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        tok = self.tokenizer
        pieces: list[list[tuple[str, bool]] | int] = []  # a record's segments, or the status it is dropped with
        for row, i in enumerate(indices):
            record = {k: v[row] for k, v in batch.items()}
            where = RecordPlace(record.get(ORIGIN_COLUMN), self.source, f"row {i + 1} of {self.source}")
            pieces.append(self._segments(record, where))
        flat = [text for segs in pieces if not isinstance(segs, int) for text, _ in segs]
        ids_flat = iter(tok(flat, add_special_tokens=False)["input_ids"] if flat else [])
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "targets": [], "status": []}
        for segs in pieces:
            ids, labels, status = ([], [], segs) if isinstance(segs, int) else self._encode(segs, ids_flat)
            targets = sum(1 for lab in labels[1:] if lab != -100)  # the first token is never predicted
            if status in (KEPT, TRUNCATED) and targets == 0:
                ids, labels, status = [], [], NO_TARGETS
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["targets"].append(targets if ids else 0)
            out["status"].append(status)
        return out

    def _encode(self, segs: list[tuple[str, bool]], ids_flat: Iterator[list[int]]) -> tuple[list, list, int]:
        """Token ids, labels and status of one record from its segments' token ids (the next ones in ``ids_flat``)."""
        tok, fmt = self.tokenizer, self.fmt
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and not fmt.uses_chat_template else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None and not fmt.uses_chat_template else []
        ids = list(bos)
        labels = list(bos) if fmt.loss_on == "all" else [-100] * len(bos)
        for _, trained in segs:
            seg = next(ids_flat)
            ids += seg
            labels += seg if trained else [-100] * len(seg)
        if eos:  # plain formats end with eos, trained whenever the text before it is
            ids += eos
            labels += eos if segs and segs[-1][1] else [-100]
        if len(ids) <= self.max_length:
            return ids, labels, KEPT
        if self.truncation == "drop":
            return [], [], TOO_LONG
        cut = slice(None, self.max_length) if self.truncation == "right" else slice(-self.max_length, None)
        return ids[cut], labels[cut], TRUNCATED

    def _segments(self, record: dict[str, Any], where: RecordPlace) -> list[tuple[str, bool]] | int:
        """The record's ``(text, trained)`` segments, or the status it is dropped with when its trained text is empty."""
        fmt = self.fmt
        if fmt.fields == "text":
            text = _string(record, fmt.text_field, where)
            return [(text, True)] if text.strip() else EMPTY_TEXT
        if fmt.fields == "messages":
            messages = normalize_messages(record.get(fmt.messages_field), where, fmt.messages_field)
            return self._chat(_with_system(messages, fmt.system_prompt), where)
        prompt = _string(record, fmt.prompt_field, where)
        response = _string(record, fmt.response_field, where)
        if not (response.strip() or (fmt.loss_on == "all" and prompt.strip())):
            return EMPTY_RESPONSE
        if fmt.use_chat_template:
            messages = _with_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                    fmt.system_prompt)
            return self._chat(messages, where)
        trained_prompt = fmt.loss_on == "all"
        return [(prompt, trained_prompt), (response, True)]

    def _chat(self, messages: list[dict[str, str]], where: RecordPlace) -> list[tuple[str, bool]] | int:
        """A chat's segments; EMPTY_RESPONSE when every message the loss covers is empty (the template's own
        tokens, end-of-turn markers, would be all it trains)."""
        loss_on = self.fmt.loss_on
        assistant = [m for m in messages if m["role"] == "assistant"]
        trained = messages if loss_on == "all" else assistant[-1:] if loss_on == "last_turn" else assistant
        if trained and not any(m["content"].strip() for m in trained):
            return EMPTY_RESPONSE
        return chat_segments(self.tokenizer, messages, self.template, loss_on, where)


def require_usable(source: str, stats: dict[str, int]) -> None:
    """Refuse data with no record left to train on, naming how many records were dropped for each reason and
    what to change. ``stats``: record counts by :data:`STATUS_NAMES` name (what ``SFTDataModule`` logs)."""
    if stats.get(STATUS_NAMES[KEPT], 0) or stats.get(STATUS_NAMES[TRUNCATED], 0):
        return
    fixes = [f"{reason}: {fix}" for reason, fix in _FIXES.items() if stats.get(reason)]
    raise UserInputError(f"{source}: no record left to train on ({stats}); " + "; ".join(fixes or ["check fields"]))


def _string(record: dict[str, Any], field: str, where: Any) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise UserInputError(f"{where} has no {field!r} (a string), got {value!r}")
    return value
