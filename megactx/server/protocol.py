"""OpenAI API request bodies (pydantic). Unknown fields are accepted and ignored, as OpenAI's own server does
for forward compatibility; wrong types and out-of-range values are 400s."""
from __future__ import annotations

import json
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from megactx.errors import RequestError
from megactx.sampling import SEED_RANGE, GuidedDecoding, SamplingParams


def clean_text(text: str) -> str:
    """A lone UTF-16 surrogate ('\\ud800' in JSON is valid JSON, but no UTF-8 text) becomes U+FFFD, as a UTF-8
    decoder does with invalid bytes; a surrogate pair becomes its character."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"this model takes text only; content parts of type {self.type!r} are not supported")
        if self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return clean_text(self.content)
        return clean_text("".join(p.text for p in self.content))


def _template_call(call: dict) -> dict:
    """An assistant's tool call as templates read it: OpenAI sends the arguments as a JSON string, templates
    (Qwen2.5's `arguments | tojson`) want the object, as vLLM gives them."""
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except ValueError:
            pass
    return {**call, "function": function}


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """What the chat template gets: role and text, and a tool conversation's fields where they are given."""
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.text()}
        for key in ("tool_calls", "tool_call_id", "name"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        if m.tool_calls:
            d["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        out.append(d)
    return out


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and not isinstance((self.json_schema or {}).get("schema"), dict):
            raise ValueError("type json_schema needs json_schema.schema, the JSON schema object")
        return self


UNSUPPORTED = {  # field -> why, in the error message
    "functions": "use tools (the legacy functions field is not read)",
    "function_call": "use tool_choice (the legacy function_call field is not read)",
    "audio": "this model takes and gives text only",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "there is no web search here",
    "suffix": "insertion (fill in the middle) is not implemented; send the prompt only",
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM's extra: the prompt tokens' logprobs
    logit_bias: dict[str, float] | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # structured output: OpenAI's response_format, or one of vLLM's guided_* extras
    response_format: ResponseFormat | None = None
    guided_json: Union[dict, str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # a Lark grammar (llguidance's dialect)

    def guided(self) -> GuidedDecoding | None:
        """The one output constraint asked for (400 when several are)."""
        asked = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            asked.append(GuidedDecoding("json_object", source="response_format"))
        elif rf is not None and rf.type == "json_schema":
            asked.append(GuidedDecoding("json_schema", rf.json_schema["schema"], source="response_format"))
        if self.guided_json is not None:
            spec = self.guided_json
            if isinstance(spec, str):
                try:
                    spec = json.loads(spec)
                except ValueError as e:
                    raise RequestError(f"guided_json: not JSON ({e})") from None
            asked.append(GuidedDecoding("json_schema", spec, source="guided_json"))
        for kind, value in (("regex", self.guided_regex), ("choice", self.guided_choice),
                            ("grammar", self.guided_grammar)):
            if value is not None:
                asked.append(GuidedDecoding(kind, value, source=f"guided_{kind}"))
        if len(asked) > 1:
            raise RequestError(f"give one output constraint, not {' and '.join(g.source for g in asked)}")
        return asked[0] if asked else None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        """OpenAI fields this server cannot honour are refused by name, not ignored (bookkeeping fields such as
        user, metadata, store and service_tier are accepted: they change nothing in the output)."""
        if not isinstance(data, dict):
            return data
        for field, why in UNSUPPORTED.items():
            if data.get(field) not in (None, False, [], {}):
                raise ValueError(f"{field} is not supported by this server: {why}")
        if any(m != "text" for m in data.get("modalities") or []):
            raise ValueError("modalities: this model takes and gives text only")
        if (data.get("best_of") or 1) > (data.get("n") or 1):
            raise ValueError("best_of above n is not supported; ask for n completions and pick one")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids (as strings, e.g. \"1234\"), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {bias}")
        return v

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(k): b for k, b in (self.logit_bias or {}).items()}, guided=self.guided())


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionSpec


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice(self):
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not name:
                raise ValueError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
            if name not in [t.function.name for t in self.tools or []]:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        elif choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    def tool_dicts(self) -> list[dict] | None:
        """The tools the template sees (none for tool_choice 'none', as vLLM does)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0: the prompt only, with echo or prompt_logprobs
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]
