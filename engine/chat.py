"""Prompts and text, without I/O: chat templates (with tools), tool-call parsing, and the
incremental detokenizer streaming uses."""

from __future__ import annotations

import json
import uuid
from typing import Any

from lightloop.engine.errors import BadRequest

# Used when a model's own chat template ignores `tools` (SmolLM2's does): the Hermes format
# that vLLM's `hermes` tool parser reads, so tool calls work the same through both engines.
_TOOLS_PREAMBLE = (
    "You may call one or more functions to assist with the user query. Function signatures are "
    "within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise BadRequest("only text content parts are supported by this engine")
        return "".join(parts)
    raise BadRequest("message content must be a string or a list of content parts")


def normalise_messages(messages: list[dict[str, Any]], template_knows_tools: bool) -> list[dict[str, Any]]:
    """Messages as a plain-text template can render them: text content, tool calls inlined."""
    out = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise BadRequest("each message must be an object with a 'role'")
        m = dict(message)
        m["content"] = _text(m.get("content"))
        if not template_knows_tools and m.get("tool_calls"):
            calls = "".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                )
                + "\n</tool_call>"
                for c in m.pop("tool_calls")
            )
            m["content"] = (m["content"] + "\n" if m["content"] else "") + calls
        out.append(m)
    return out


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The prompt text the model sees, through the model's own chat template."""
    template = tokenizer.chat_template or ""
    knows_tools = "tools" in template
    msgs = normalise_messages(messages, knows_tools)
    if tools and not knows_tools:
        preamble = _TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t) for t in tools))
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + preamble}
        else:
            msgs.insert(0, {"role": "system", "content": preamble})
    try:
        text = tokenizer.apply_chat_template(
            msgs, tools=tools if knows_tools else None, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja2 errors for messages the template cannot render
        raise BadRequest(f"the chat template cannot render these messages: {exc}") from None
    return str(text)


def encode(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote any special tokens; adding BOS again would change the prompt.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split `<tool_call>{json}</tool_call>` blocks out of the text, as vLLM's hermes parser."""
    calls: list[dict[str, Any]] = []
    content_parts: list[str] = []
    rest = text
    while "<tool_call>" in rest:
        before, _, after = rest.partition("<tool_call>")
        body, found, rest = after.partition("</tool_call>")
        try:
            parsed = json.loads(body.strip())
            name = parsed["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return text, []  # not a well-formed call: leave the text as it is
        content_parts.append(before)
        arguments = parsed.get("arguments", {})
        calls.append(
            {
                "id": f"chatcmpl-tool-{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
        )
        if not found:
            break
    content_parts.append(rest)
    return "".join(content_parts).strip(), calls


class Detokenizer:
    """Text of a growing list of token ids, handing out only the new part each time. A token
    that ends inside a multi-byte character is held back until the character is complete.

    Incremental, as vLLM detokenizes: each step decodes only a short window (the tokens since the
    last text handed out, after the previous step's tokens as context, so that a word's leading
    space and a character split across tokens come out right), not the whole completion again,
    which made a long answer quadratic in its length."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: context, already turned into text
        self._read = 0  # window split: tokens before it are in `text`

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before: str = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after: str = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
