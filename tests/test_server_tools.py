"""Tools through the real server: a tiny random checkpoint whose chat template renders tools the way Qwen2.5's
does (Hermes <tool_call> blocks), driven by the openai client. A random model never calls a tool by itself, so
the calls come from tool_choice "required" or a named function, which the grammar forces into valid calls."""
import json
import os
import shutil

import httpx
import openai
import pytest

from test_server import KEY, serving

HERMES = """{%- if tools %}<|im_start|>system
You may call one or more functions to assist with the user query.
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{{ m.content }}{% for tc in m.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tools-model"))
    shutil.copytree(tiny_dir("llama"), path, dirs_exist_ok=True)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["chat_template"] = HERMES
    with open(config_file, "w") as f:
        json.dump(config, f)
    if os.path.exists(os.path.join(path, "chat_template.jinja")):
        os.remove(os.path.join(path, "chat_template.jinja"))
    yield from serving("--model", path, "--max-model-len", "512", "--served-model-name", "m")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def valid_weather(arguments: str) -> bool:
    args = json.loads(arguments)
    return (set(args) == {"city", "days"} and isinstance(args["city"], str) and len(args["city"]) <= 16
            and isinstance(args["days"], int) and 1 <= args["days"] <= 7)


def test_named_tool_choice_returns_a_valid_call(client):
    out = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], max_tokens=80, seed=1,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert valid_weather(call.function.arguments), call.function.arguments


def test_required_tool_choice_streams_tool_calls(client):
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], max_tokens=120,
                                                 tool_choice="required", parallel_tool_calls=False, seed=2,
                                                 stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"] and len(calls) == 1, chunks
    assert calls[0].index == 0 and calls[0].function.name in ("get_weather", "get_time")
    args = json.loads(calls[0].function.arguments)
    assert valid_weather(calls[0].function.arguments) if calls[0].function.name == "get_weather" else \
        args["zone"] in ("UTC", "CET")
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in content  # the block went out as tool_calls, not as text


def test_tool_conversation_reaches_the_template(server):
    """The assistant's call (arguments as OpenAI's JSON string) and the tool's answer are rendered, the arguments
    as an object, not a string inside a string."""
    messages = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    auth = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(server + "/tokenize", json={"messages": messages}, headers=auth).json()["tokens"]
    text = httpx.post(server + "/detokenize", json={"tokens": ids}, headers=auth).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text


def test_tool_choice_none_and_bad_tool_choice(client):
    out = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=5)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="both constrain"):
        client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=5, tool_choice="required",
                                       response_format={"type": "json_object"})
