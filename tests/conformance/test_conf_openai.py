"""The OpenAI API with the official client: every documented parameter of completions, chat and
embeddings is honoured with OpenAI's meaning (checked against transformers where it is a number) or
refused with a 400 that names it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import served_agent, tiny_bundle

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MSG = [{"role": "user", "content": "the pump in hall b"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_llama_dir):
    bundle = tiny_bundle(tmp_path_factory.getbasetemp(), tiny_llama_dir, "fp32")
    with served_agent(bundle, tmp_path_factory.mktemp("agent")) as (agent, url):
        yield agent, openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)


def refused(call, param):
    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert err.value.body.get("param") == param, err.value.body
    return err.value.body["message"]


# (endpoint, parameter, value): each must be refused with a 400 naming the parameter
REFUSED = [
    ("completions", "suffix", "tail"), ("completions", "best_of", 2), ("completions", "n", 9),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}), ("chat", "modalities", ["text", "audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}), ("chat", "reasoning_effort", "high"),
    ("chat", "web_search_options", {}), ("chat", "store", True), ("chat", "tool_choice", "required"),
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),   # template has no tools
    ("chat", "functions", [{"name": "f", "parameters": {}}]), ("chat", "top_logprobs", 3),      # without logprobs
    ("chat", "stream_options", {"include_usage": True}),                                        # without stream
    ("chat", "logit_bias", {"999999": 5}), ("chat", "presence_penalty", 3.0),
    ("chat", "response_format", {"type": "yaml"}),
]


@pytest.mark.parametrize("endpoint,param,value", REFUSED)
def test_refused_parameters_name_themselves(tiny, endpoint, param, value):
    _, client = tiny
    if endpoint == "completions":
        refused(lambda: client.completions.create(model="x", prompt="valve", max_tokens=2, **{param: value}), param)
    else:
        refused(lambda: client.chat.completions.create(model="x", messages=MSG, max_tokens=2, **{param: value}), param)


def test_unknown_parameters_are_refused(tiny):
    _, client = tiny
    msg = refused(lambda: client.chat.completions.create(model="x", messages=MSG, max_tokens=2,
                                                         extra_body={"temprature": 0.5}), "temprature")
    assert "unrecognized" in msg


def test_inert_and_null_parameters_are_accepted(tiny):
    _, client = tiny
    r = client.chat.completions.create(model="x", messages=MSG, max_tokens=3, user="u1", metadata={"k": "v"},
                                       service_tier="auto", store=False, n=None, stop=None, seed=None, tools=None,
                                       parallel_tool_calls=None, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_equal_transformers(tiny, tiny_llama_dir):
    agent, client = tiny
    r = client.chat.completions.create(model="x", messages=MSG, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    eng = agent.engine
    prompt = eng.encode(eng.chat_prompt(MSG))
    gen = [c.top_logprobs[0] for c in content]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    greedy = list(eng.generate(prompt, max_new_tokens=6))
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + greedy])).logits[0].double()
    ref = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    for k, (tok, c) in enumerate(zip(greedy, content)):
        assert abs(c.logprob - float(ref[k, tok])) < 1e-3
        assert c.logprob == pytest.approx(gen[k].logprob)  # greedy: the chosen token is the top alternative
        top3 = torch.topk(ref[k], 3).values.numpy()
        np.testing.assert_allclose([t.logprob for t in c.top_logprobs], top3, atol=1e-3)


def test_completion_logprobs_echo_n_and_batched_prompts(tiny):
    agent, client = tiny
    r = client.completions.create(model="x", prompt="valve", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    e = client.completions.create(model="x", prompt="valve", max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text == "valve" + r.choices[0].text
    ids = agent.engine.encode("valve")
    t = client.completions.create(model="x", prompt=ids, max_tokens=4, temperature=0)
    assert t.choices[0].text == r.choices[0].text  # token-id prompts are the same prompt
    b = client.completions.create(model="x", prompt=["valve", "pump"], max_tokens=4, temperature=0.9, seed=3, n=2)
    assert [c.index for c in b.choices] == [0, 1, 2, 3]
    assert b.usage.prompt_tokens == len(ids) + len(agent.engine.encode("pump"))
    assert b.choices[0].text != b.choices[1].text or b.choices[2].text != b.choices[3].text  # n samples differ


def test_logit_bias_and_penalties(tiny):
    agent, client = tiny
    eng = agent.engine
    base = client.completions.create(model="x", prompt="valve", max_tokens=12, temperature=0)
    forced = eng.encode(" pump")[0]
    b = client.completions.create(model="x", prompt="valve", max_tokens=3, temperature=0, logit_bias={str(forced): 100})
    assert b.choices[0].text == eng.decode([forced] * 3)
    first = eng.encode("valve" + base.choices[0].text)[len(eng.encode("valve"))]
    banned = client.completions.create(model="x", prompt="valve", max_tokens=1, temperature=0, logit_bias={str(first): -100})
    assert banned.choices[0].text != eng.decode([first])
    # a strong frequency penalty: no token repeats more than the greedy baseline does
    p = client.completions.create(model="x", prompt="valve", max_tokens=12, temperature=0, frequency_penalty=2.0,
                                  presence_penalty=2.0)
    def repeats(text):
        ids = eng.encode(text)
        return len(ids) - len(set(ids))
    assert repeats(p.choices[0].text) <= repeats(base.choices[0].text)


def test_stream_include_usage(tiny):
    _, client = tiny
    for stream in (client.chat.completions.create(model="x", messages=MSG, max_tokens=4, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}),
                   client.completions.create(model="x", prompt="valve", max_tokens=4, temperature=0, stream=True,
                                             stream_options={"include_usage": True})):
        chunks = list(stream)
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
        assert all(c.usage is None for c in chunks[:-1])


def test_models_retrieve_and_assistant_tool_call_messages(tiny):
    _, client = tiny
    mid = client.models.list().data[0].id
    assert client.models.retrieve(mid).id == mid
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    msgs = MSG + [{"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    r = client.chat.completions.create(model="x", messages=msgs, max_tokens=2)
    assert r.choices[0].message.role == "assistant"


def test_json_schema_output_parses_and_validates(smollm2_bundle, tmp_path):
    """Structured output on the real model: constrained by llguidance, the reply parses and validates."""
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
              "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}}}
    with served_agent(smollm2_bundle, tmp_path / "agent") as (agent, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        r = client.chat.completions.create(
            model="x", max_tokens=48, temperature=0,
            messages=[{"role": "user", "content": "Name a large city and its population as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        obj = json.loads(r.choices[0].message.content)
        assert set(obj) == {"city", "population"} and isinstance(obj["population"], int) and len(obj["city"]) <= 20
        j = client.chat.completions.create(model="x", max_tokens=48, temperature=0.7, seed=1,
                                           messages=[{"role": "user", "content": "Describe a cat in JSON."}],
                                           response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        if j.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(j.choices[0].message.content), dict)
        else:  # cut by max_tokens: what came is still a valid JSON prefix (nothing outside the grammar)
            assert j.choices[0].message.content.lstrip().startswith("{")


def test_embeddings_parameters(minilm_bundles, tmp_path):
    with served_agent(minilm_bundles["int8"], tmp_path / "agent") as (agent, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        f = client.embeddings.create(model="x", input=["a", "b"], encoding_format="float")
        b64 = client.embeddings.create(model="x", input=["a", "b"])  # the client asks for base64 by default
        np.testing.assert_allclose(f.data[0].embedding, b64.data[0].embedding, atol=1e-6)
        assert len(client.embeddings.create(model="x", input="a", dimensions=384).data[0].embedding) == 384
        refused(lambda: client.embeddings.create(model="x", input="a", dimensions=128), "dimensions")


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tool_calls_with_a_tool_trained_template(tmp_path):
    """Tools are rendered by the template exactly as transformers renders them, and a model reply in the
    template's call format comes back as OpenAI tool_calls (the reply is steered into that format with
    a JSON schema so that the tiny random model produces one)."""
    import shutil
    from helpers import rewrite_bundle_file
    bundle = tmp_path / "bundle"
    shutil.copytree(Path(__file__).resolve().parents[1] / "data" / "tiny-bundle", bundle)
    rewrite_bundle_file(bundle, "tokenizer/chat_template.jinja", TOOL_TEMPLATE)
    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    ref = transformers.AutoTokenizer.from_pretrained(bundle / "tokenizer").apply_chat_template(
        msgs, tools=[WEATHER], add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    call_schema = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                   "properties": {"name": {"const": "get_weather"},
                                  "arguments": {"type": "object", "additionalProperties": False, "required": ["city"],
                                                "properties": {"city": {"enum": ["Oslo", "Paris"]}}}}}
    with served_agent(bundle, tmp_path / "agent") as (agent, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="local", max_retries=0)
        r = client.chat.completions.create(model="x", messages=msgs, tools=[WEATHER], max_tokens=150, temperature=0,
                                           response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": call_schema}})
        assert r.usage.prompt_tokens == len(ref)
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Oslo", "Paris")
        # the call and its result go back in: rendered as the template asks, and accepted
        follow = client.chat.completions.create(model="x", max_tokens=3, tools=[WEATHER], messages=msgs + [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
        assert follow.choices[0].message.role == "assistant"
        assert client.chat.completions.create(model="x", messages=msgs, tools=[WEATHER], tool_choice="none",
                                              max_tokens=2).choices[0].message.tool_calls is None


def test_parse_tool_calls_table():
    from edge_runtime.openai_api import parse_tool_calls
    tools = [WEATHER]
    content, calls = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', tools)
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    content, calls = parse_tool_calls('Let me check. <tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', tools)
    assert content == "Let me check." and len(calls) == 1
    assert parse_tool_calls('{"name": "get_weather", "parameters": {"city": "x"}}', tools)[1][0]["function"]["arguments"] == '{"city": "x"}'
    assert parse_tool_calls('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', tools)[1] == []   # not offered
    assert parse_tool_calls("<tool_call>{broken</tool_call>", tools)[1] == []
    assert parse_tool_calls("plain answer", tools) == ("plain answer", [])
