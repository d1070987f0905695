"""Constrained decoding (engine/guided.py) and tool-call parsing (server/tool_calls.py).

The grammar's mask is checked against a naive reference (every vocabulary token decoded and tested as a prefix
of the allowed strings); the engine's outputs, sampled at temperature 1 from the bundled SmolLM2, must always
parse and validate; the Hermes tool-call parser against known texts."""
import json
import re

import pytest

from megactx.engine.guided import Guide
from megactx.errors import RequestError
from megactx.sampling import GuidedDecoding, SamplingParams
from megactx.server.tool_calls import ToolCallStream, parse_tool_calls, tool_choice_constraint

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from megactx.llm import LLM
    return LLM(smollm2_path, dtype="fp32", max_model_len=1024)


def person_ok(obj) -> bool:
    return (set(obj) == {"name", "age", "pets"} and isinstance(obj["name"], str) and len(obj["name"]) <= 12
            and isinstance(obj["age"], int) and isinstance(obj["pets"], list) and len(obj["pets"]) <= 3
            and all(p in ("cat", "dog") for p in obj["pets"]))


def test_mask_matches_naive_reference(llm):
    """At the start of guided_choice ["yes", "no", "maybe"] the allowed tokens are exactly those whose text is a
    non-empty prefix of a choice; after "ma", those that continue "maybe"."""
    tok = llm.engine.tokenizer
    vocab = llm.engine.model_config.vocab_size
    choices = ["yes", "no", "maybe"]
    texts = {i: tok.decode([i], skip_special_tokens=False) for i in range(len(tok.hf))}

    def reference(done: str) -> set[int]:
        return {i for i, t in texts.items() if t and any(c.startswith(done + t) for c in choices)}

    guide = Guide(tok, GuidedDecoding("choice", choices))
    assert set(guide.allowed(vocab).nonzero().flatten().tolist()) == reference("")
    ma = tok.encode("ma", add_special_tokens=False)
    assert len(ma) == 1
    guide.accept(ma[0])
    assert set(guide.allowed(vocab).nonzero().flatten().tolist()) == reference("ma")
    assert not guide.allowed(vocab)[len(tok.hf):].any()  # LM-head padding rows are never allowed


@pytest.mark.parametrize("seed", range(4))
def test_sampled_json_always_validates(llm, seed):
    tok = llm.engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Describe a person."}])
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=seed, guided=GuidedDecoding("json_schema", PERSON))
    c = llm.generate([prompt], params)[0].outputs[0]
    assert c.finish_reason == "stop", c.text  # ended by the grammar, within the budget
    assert person_ok(json.loads(c.text)), c.text


def test_regex_choice_and_json_object(llm):
    tok = llm.engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Call me."}])
    phone = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=1.0, seed=3,
                                                  guided=GuidedDecoding("regex", r"\+1-[0-9]{3}-[0-9]{4}")))
    assert re.fullmatch(r"\+1-[0-9]{3}-[0-9]{4}", phone[0].outputs[0].text)
    pick = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=3,
                                                 guided=GuidedDecoding("choice", ["red", "green", "blue"])))
    assert {c.text for c in pick[0].outputs} <= {"red", "green", "blue"}
    obj = llm.generate([prompt], SamplingParams(max_tokens=200, temperature=0,
                                                guided=GuidedDecoding("json_object")))[0].outputs[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict), obj.text


def test_bad_constraints_are_request_errors(llm):
    with pytest.raises(RequestError, match="Invalid type"):
        llm.generate(["x"], SamplingParams(guided=GuidedDecoding("json_schema", {"type": "objectx"})))
    with pytest.raises(RequestError, match="non-empty list"):
        GuidedDecoding("choice", [])
    with pytest.raises(RequestError, match="guided_regex"):
        llm.generate(["x"], SamplingParams(guided=GuidedDecoding("regex", "(", source="guided_regex")))


def test_parse_tool_calls():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    content, calls = parse_tool_calls(text)
    assert content == "Let me look."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[0]["type"] == "function" and calls[0]["id"] != calls[1]["id"]
    assert parse_tool_calls("no tools here") == ("no tools here", [])
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])  # left as the model wrote it
    _, unterminated = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}')
    assert unterminated[0]["function"]["name"] == "f"  # stopped by EOS before the closing tag


def test_tool_call_stream_holds_back_calls():
    text = 'Sure <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    s, sent = ToolCallStream(), ""
    for i in range(0, len(text), 3):  # arrives in 3-character pieces, "<tool_call>" split across them
        sent += s.feed(text[i:i + 3])
    rest, calls = s.finish()
    assert sent + rest == "Sure " and calls[0]["function"]["name"] == "f"
    s = ToolCallStream()
    assert s.feed("a <tool") == "a " and s.finish() == ("<tool", [])  # a held tail that never became a call


def test_required_tool_choice_forces_a_valid_call(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "get_time"}}]
    tok = llm.engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}])
    forced = tool_choice_constraint(tools, {"type": "function", "function": {"name": "get_weather"}}, True)
    for seed in range(2):
        c = llm.generate([prompt], SamplingParams(max_tokens=60, temperature=1.0, seed=seed, guided=forced))[0]
        content, calls = parse_tool_calls(c.outputs[0].text)
        assert content is None and len(calls) == 1, c.outputs[0].text
        assert calls[0]["function"]["name"] == "get_weather"
        assert isinstance(json.loads(calls[0]["function"]["arguments"])["city"], str)
    assert tool_choice_constraint(tools, "auto", True) is None
