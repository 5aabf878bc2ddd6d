"""Anthropic's Messages API through a real Envoy (issue 18): the official `anthropic` client,
unchanged, against OpenAI-compatible backends, and the gateway's own refusals raised as the
SDK's exceptions."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from harness import instance


def client(gw, api_key: str = "unused", **options) -> anthropic.Anthropic:
    # max_retries=0: a refusal must surface at once, not after the SDK's backoff.
    return anthropic.Anthropic(base_url=gw.url, api_key=api_key, max_retries=0, timeout=10, **options)


def test_a_message_reaches_an_openai_backend_as_chat_completions(vllm):
    gw, backend = vllm
    message = client(gw).messages.create(
        model="qwen", max_tokens=64, system="Be brief.", stop_sequences=["END"],
        messages=[{"role": "user", "content": "Hello"}], metadata={"user_id": "u-1"})
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "hello from vllm"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0
    received = backend.requests[-1]
    assert received.path == "/v1/chat/completions"
    sent = received.json()
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_tokens"] == 64 and sent["stop"] == ["END"] and sent["user"] == "u-1"
    # The client's Anthropic credential is not the backend's.
    assert "x-api-key" not in received.headers


def test_a_text_stream_arrives_as_anthropic_events(vllm):
    gw, backend = vllm
    with client(gw).messages.stream(model="qwen", max_tokens=32,
                                    messages=[{"role": "user", "content": "Count"}],
                                    extra_headers={"x-stub-chunks": "4"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok0 tok1 tok2 tok3 "
    assert final.content[0].text == text
    assert final.usage.output_tokens > 0
    sent = backend.requests[-1].json()
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_the_gateways_refusals_are_the_sdks_exceptions(guarded_vllm):
    gw, backend, key = guarded_vllm
    ask = dict(max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.AuthenticationError) as denied:
        client(gw, api_key="sk-wrong").messages.create(model="qwen", **ask)
    assert denied.value.status_code == 401
    assert denied.value.body["type"] == "error"
    assert denied.value.body["error"]["type"] == "authentication_error"
    # The SDK sends its key as x-api-key; a bearer token works as well.
    with pytest.raises(anthropic.NotFoundError) as missing:
        client(gw, api_key=key).messages.create(model="nope", **ask)
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert client(gw, api_key=key).messages.create(model="qwen", **ask).content[0].text
    bearer = client(gw, api_key=None, auth_token=key)
    with pytest.raises(anthropic.RateLimitError) as limited:
        bearer.messages.create(model="qwen", **ask)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert len(backend.requests) == 1


def test_a_backend_error_keeps_its_status_in_anthropics_shape(vllm):
    gw, backend = vllm
    backend.fail_next(1, status=503)
    with pytest.raises(anthropic.InternalServerError) as failed:
        client(gw).messages.create(model="qwen", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert failed.value.status_code == 503
    assert failed.value.body["error"]["type"] == "overloaded_error"
    assert failed.value.body["error"]["message"] == "stub failure requested"


def test_count_tokens_is_the_gateways_estimate(vllm):
    gw, backend = vllm
    short = client(gw).messages.count_tokens(model="qwen", messages=[{"role": "user", "content": "hi"}])
    long = client(gw).messages.count_tokens(model="qwen", messages=[{"role": "user", "content": "hi " * 400}])
    assert 0 < short.input_tokens < long.input_tokens
    assert backend.requests == []


def test_both_prefixes_and_a_body_that_is_not_a_message(vllm):
    gw, _ = vllm
    r = httpx.post(gw.url + "/api/v1/messages", json={"model": "qwen", "max_tokens": 5})
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_a_tool_use_round_trip_through_an_openai_backend(vllm):
    gw, backend = vllm
    c = client(gw)
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    first = c.messages.create(model="qwen", max_tokens=64, tools=[WEATHER], messages=asked)
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "stub-city"}
    sent = backend.requests[-1].json()
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    # Claude Code's next turn: the assistant's tool_use, then the user's tool_result.
    follow = asked + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C"}]}]
    second = c.messages.create(model="qwen", max_tokens=64, tools=[WEATHER], messages=follow)
    assert second.content[0].text == "tool said: 18C"
    sent = backend.requests[-1].json()
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": use.id, "content": "18C"}
    assert sent["messages"][-2]["tool_calls"][0]["id"] == use.id


def test_a_streamed_tool_use_arrives_as_input_json_deltas(vllm):
    gw, _ = vllm
    with client(gw).messages.stream(model="qwen", max_tokens=64, tools=[WEATHER],
                                    messages=[{"role": "user", "content": "Weather?"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds and kinds[-1] == "message_stop"
    assert final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.input == {"city": "stub-city"}


def test_messages_pass_through_to_an_anthropic_backend_untouched(stubs, gateway):
    from vendor_stubs import AnthropicStub

    (claude,) = stubs("claude", kind=AnthropicStub, api_key="sk-ant-backend")
    gw = gateway({"model": {"retries": 0, "services": {"chat": {"instances": [
        instance("claude-sonnet", claude, adapter="claude", headers={"x-api-key": "sk-ant-backend"})]}}}})
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    c = client(gw, api_key="sk-client-own", default_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    message = c.messages.create(model="claude-sonnet", max_tokens=32, system=system,
                                messages=[{"role": "user", "content": "Hi"}])
    assert message.content[0].text == "hello from claude"
    received = claude.requests[-1]
    assert received.path == "/v1/messages"
    # cache_control and beta features survive: the body is the client's, byte for byte.
    assert received.json()["system"] == system
    assert received.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert received.headers["x-api-key"] == "sk-ant-backend"
    with c.messages.stream(model="claude-sonnet", max_tokens=32,
                           messages=[{"role": "user", "content": "Hi"}]) as stream:
        assert "".join(stream.text_stream) == "tok0 tok1 tok2 tok3 tok4 "
