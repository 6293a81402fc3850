"""Chat prompts: the token ids we feed the model equal transformers' ``apply_chat_template`` for the
same conversation (the real SmolLM2-Instruct tokenizer, and tiny tokenizers with a template file, an
inline template and none)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import rewrite_bundle_file, served_agent

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "What is a valve?"},
     {"role": "assistant", "content": "A valve controls the flow of a fluid."},
     {"role": "user", "content": "And a pump?"}],
    [{"role": "user", "content": "Übersetze: «naïve café» 🙂"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "line one\n  line two\n"}],
]
TINY = Path(__file__).resolve().parents[1] / "data" / "tiny-bundle"


def reference_ids(tokenizer_dir, messages) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat_usage(url: str, messages) -> int:
    import urllib.request
    req = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": messages, "max_tokens": 1, "temperature": 0}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["usage"]["prompt_tokens"]


def test_smollm2_chat_prompt_matches_transformers(smollm2_bundle, smollm2_source, tmp_path):
    with served_agent(smollm2_bundle, tmp_path / "agent") as (agent, url):
        eng = agent.engine
        assert eng.chat_template()[1] == "tokenizer/chat_template.jinja"
        for messages in CONVERSATIONS:
            ours = eng.encode(eng.chat_prompt(messages))
            assert ours == reference_ids(smollm2_source, messages)
            assert chat_usage(url, messages) == len(ours)  # usage describes the prompt the model really saw
        # the model now answers a greeting as an assistant (it continued the word "hello" with Python before)
        import openai
        reply = openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=0)
        text = reply.choices[0].message.content
        assert "Python" not in text and any(w in text.lower() for w in ("hello", "hi", "help", "assist")), text


@pytest.fixture
def tiny_copy(tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(TINY, out)
    return out


def test_tiny_template_in_file_inline_and_missing(tiny_copy, tmp_path):
    from edge_runtime.engine import Engine
    tdir = tiny_copy / "tokenizer"
    template = (tdir / "chat_template.jinja").read_text()
    # 1. a template file (what current transformers writes)
    eng = Engine(tiny_copy)
    assert eng.chat_template()[1] == "tokenizer/chat_template.jinja"
    for messages in CONVERSATIONS:
        assert eng.encode(eng.chat_prompt(messages)) == reference_ids(tdir, messages)
    # 2. the same template inline in tokenizer_config.json (older exports)
    cfg = json.loads((tdir / "tokenizer_config.json").read_text())
    rewrite_bundle_file(tiny_copy, "tokenizer/tokenizer_config.json", json.dumps({**cfg, "chat_template": template}))
    rewrite_bundle_file(tiny_copy, "tokenizer/chat_template.jinja", None)
    eng = Engine(tiny_copy)
    assert eng.chat_template()[1] == "tokenizer_config.json"
    for messages in CONVERSATIONS:
        assert eng.encode(eng.chat_prompt(messages)) == reference_ids(tdir, messages)
    # 3. no template anywhere: the documented fallback, and /v1/models says so
    rewrite_bundle_file(tiny_copy, "tokenizer/tokenizer_config.json", json.dumps(cfg))
    with served_agent(tiny_copy, tmp_path / "agent") as (agent, url):
        assert agent.engine.chat_prompt(CONVERSATIONS[0]) == "user: hello\nassistant:"
        import urllib.request
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
            card = json.loads(r.read())["data"][0]
        assert card["chat_template"] == "fallback" and "no chat template" in card["warning"]


def test_template_errors_are_a_clear_400(tiny_copy, tmp_path):
    rewrite_bundle_file(tiny_copy, "tokenizer/chat_template.jinja",
                        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    import urllib.error
    import urllib.request
    with served_agent(tiny_copy, tmp_path / "agent") as (agent, url):
        req = urllib.request.Request(url + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": CONVERSATIONS[1], "max_tokens": 2}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400
        assert "System role not supported" in json.loads(err.value.read())["error"]["message"]
