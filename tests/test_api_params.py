"""OpenAI request parameters: what the official clients send is accepted, and errors name the parameter."""
from __future__ import annotations

import pytest

from edge_runtime.server import ApiError, sampling_params

pytestmark = pytest.mark.device


def test_n_null_is_the_default():
    from edge_runtime.openai_api import choices_per_prompt
    assert choices_per_prompt({"n": None}) == 1 and choices_per_prompt({}) == 1 and choices_per_prompt({"n": 3}) == 3
    assert sampling_params({"n": None})["max_new_tokens"] == 64
    with pytest.raises(ApiError) as err:
        choices_per_prompt({"n": 2, "stream": True})
    assert err.value.param == "n"


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
])
def test_errors_name_the_parameter(body, param):
    with pytest.raises(ApiError) as err:
        sampling_params(body)
    assert err.value.param == param and f"'{param}'" in err.value.message


def test_max_completion_tokens_wins_over_max_tokens():
    assert sampling_params({"max_tokens": 9, "max_completion_tokens": 3})["max_new_tokens"] == 3
    assert sampling_params({"max_tokens": 9, "max_completion_tokens": None})["max_new_tokens"] == 9


@pytest.mark.parametrize("host,origin,method,bind,refused", [
    ("127.0.0.1:8080", None, "POST", "127.0.0.1", False),            # a local app (curl, the openai client)
    ("localhost:8080", None, "GET", "127.0.0.1", False),
    ("[::1]:8080", None, "GET", "127.0.0.1", False),
    ("evil.example:8080", None, "GET", "127.0.0.1", True),           # DNS rebinding: a page's own name resolved to us
    ("127.0.0.1:8080", "http://evil.example", "POST", "127.0.0.1", True),   # CSRF from a web page
    ("127.0.0.1:8080", "http://localhost:3000", "POST", "127.0.0.1", False),  # a local dev page
    ("127.0.0.1:8080", "null", "POST", "127.0.0.1", True),           # file:// or sandboxed page
    ("127.0.0.1:8080", "http://evil.example", "GET", "127.0.0.1", False),   # reads carry no state change
    ("127.0.0.2:8080", None, "GET", "localhost", False),             # any loopback address is this machine (same rule as the broker's)
    ("127.0.0.1.evil.example:8080", None, "GET", "127.0.0.1", True),
    ("gateway.lan:8080", None, "POST", "0.0.0.0", False),            # exposed on purpose: any Host
    ("gateway.lan:8080", "http://evil.example", "POST", "0.0.0.0", True),
])
def test_request_origin_refusal_table(host, origin, method, bind, refused):
    from edge_runtime.server import request_origin_refusal
    assert (request_origin_refusal(host, origin, method, bind) is not None) == refused
