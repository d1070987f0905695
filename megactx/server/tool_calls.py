"""Tool calling in the Hermes format that Qwen2.5's chat templates teach their models:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The tools go to the chat template; the generated text is parsed into OpenAI `tool_calls` (whole responses and
streams); tool_choice "required" or a named function constrains decoding to such blocks with a grammar whose
JSON part is the tools' parameter schemas, so the call always parses and validates.
"""
from __future__ import annotations

import json
import re
import uuid

from megactx.sampling import GuidedDecoding

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def call_schema(tool: dict) -> dict:
    function = tool["function"]
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_choice_constraint(tools: list[dict], tool_choice, parallel: bool) -> GuidedDecoding | None:
    """A grammar for tool_choice "required" (one call or more, of any tool) or {"type": "function", "function":
    {"name": ...}} (one call of that tool); None for "auto" and "none"."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        chosen = tools
    else:
        name = tool_choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == name]
        parallel = False
    schemas = [call_schema(t) for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema["x-guidance"] = {"whitespace_flexible": False}
    repeat = ' ("\\n" call)*' if parallel else ""
    grammar = (f'start: call{repeat}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}')
    return GuidedDecoding("grammar", grammar, source="tool_choice")


def _call(body: str) -> dict | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """-> (the content before the first call, or None when there is none; the calls). Text whose blocks do not
    parse stays content, as the model wrote it."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    calls = [_call(m.group(1)) for m in _BLOCK.finditer(text, start)]
    if not calls or any(c is None for c in calls):
        return text, []
    content = text[:start].strip()
    return content or None, calls


class ToolCallStream:
    """A streamed choice's text: content goes out as it comes, except from the first <tool_call> on (and a tail
    that may be the start of one), which is held and parsed when the choice ends."""

    def __init__(self):
        self.text = ""
        self.sent = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        hold = self.text.find(OPEN, self.sent)
        if hold < 0:  # keep back a tail that could still become "<tool_call>"
            hold = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text) - self.sent), 0, -1):
                if OPEN.startswith(self.text[-k:]):
                    hold = len(self.text) - k
                    break
        out = self.text[self.sent:hold]
        self.sent = hold
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """-> (content not yet sent, the tool calls)."""
        content, calls = parse_tool_calls(self.text)
        if not calls:
            rest = self.text[self.sent:]
            self.sent = len(self.text)
            return rest, []
        return "", calls
