"""OpenAI's Responses API through a real Envoy (issue 32): the clients that speak only Responses —
the official `openai` client, Codex CLI, the OpenAI Agents SDK — unchanged, against a backend that
serves chat completions only; and a passthrough to an instance that serves Responses itself."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from harness import ROOT, instance
from test_metrics import scrape, value


# How an instance declares that it serves the Responses API itself (docs/responses.md).
RESPONSES_NATIVE = {"responses": "native"}

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def client(gw, api_key: str = "unused", **options) -> openai.OpenAI:
    # max_retries=0: a refusal must surface at once, not after the SDK's backoff.
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=api_key, max_retries=0, timeout=10, **options)


def test_a_response_from_a_chat_completions_backend(vllm):
    gw, backend = vllm
    response = client(gw).responses.create(model="qwen", instructions="Be brief.", input="Hello",
                                           max_output_tokens=64, extra_headers={"x-stub-usage": "12,4"})
    assert response.object == "response" and response.status == "completed"
    assert response.id.startswith("resp_")
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text"
    assert response.output_text == "hello from vllm"
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (12, 4, 16)
    received = backend.requests[-1]
    assert received.path == "/v1/chat/completions"
    sent = received.json()
    assert sent["model"] == "qwen"
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert sent.get("max_tokens", sent.get("max_completion_tokens")) == 64
    # Two requests, two ids: the gateway makes them per request.
    again = client(gw).responses.create(model="qwen", input="Hello")
    assert again.id != response.id and again.output[0].id != message.id


def test_a_text_stream_arrives_as_responses_events(vllm):
    gw, backend = vllm
    with client(gw).responses.stream(model="qwen", input="Count",
                                     extra_headers={"x-stub-chunks": "4", "x-stub-usage": "9,4"}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "tok0 tok1 tok2 tok3 "
    assert kinds[:2] == ["response.created", "response.in_progress"]
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                 "response.output_item.done"):
        assert kind in kinds, kinds
    assert kinds[-1] == "response.completed"
    # Every event numbered, in order.
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(events)))
    assert final.output_text == text and final.status == "completed"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (9, 4, 13)
    sent = backend.requests[-1].json()
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_a_function_call_round_trip_through_a_chat_backend(vllm):
    gw, backend = vllm
    c = client(gw)
    first = c.responses.create(model="qwen", input="Weather in Paris?", tools=[WEATHER])
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "stub-city"}
    assert call.id.startswith("fc_") and call.call_id
    sent = backend.requests[-1].json()
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER["parameters"]}}]
    # The client's next turn: the call it got, then its output.
    follow = [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}]
    second = c.responses.create(model="qwen", input=follow, tools=[WEATHER])
    assert second.output_text == "tool said: 18C"
    sent = backend.requests[-1].json()
    assert sent["messages"][-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "18C"}
    assert sent["messages"][-2]["role"] == "assistant"
    assert sent["messages"][-2]["tool_calls"][0]["id"] == call.call_id
    assert sent["messages"][-2]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_streamed_function_call_arrives_as_argument_deltas(vllm):
    gw, _ = vllm
    with client(gw).responses.stream(model="qwen", input="Weather?", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert kinds[-1] == "response.completed"
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == {"city": "stub-city"}
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "stub-city"}


def test_a_backend_stopping_mid_stream_ends_it_with_response_failed(vllm):
    """To Codex a stream that closes without `response.completed` or `response.failed` is an error
    of its own; the gateway says what happened. (A backend whose connection breaks is a reset for
    the client too: Envoy lets a filter add nothing after an upstream reset.)"""
    gw, _ = vllm
    body = {"model": "qwen", "input": "Count", "stream": True}
    with httpx.stream("POST", gw.url + "/v1/responses", json=body, timeout=10,
                      headers={"x-stub-chunks": "5", "x-stub-end-after": "2"}) as r:
        assert r.status_code == 200
        lines = [line[len("data:"):].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert "[DONE]" not in lines, "a Responses stream has no [DONE]"
    data = [json.loads(line) for line in lines]
    assert all("type" in event for event in data), f"only Responses events, nothing after them: {data[-2:]}"
    kinds = [event["type"] for event in data]
    assert "response.output_text.delta" in kinds
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    assert data[-1]["response"]["status"] == "failed"


def test_previous_response_id_is_refused_as_documented(vllm):
    """docs/responses.md: a stateless translation keeps no conversations, so it says so (400)
    rather than answering as if it remembered."""
    gw, backend = vllm
    with pytest.raises(openai.BadRequestError) as refused:
        client(gw).responses.create(model="qwen", input="And then?", previous_response_id="resp_earlier")
    assert refused.value.status_code == 400
    assert refused.value.body["type"] == "invalid_request_error"
    assert "previous_response_id" in refused.value.body["message"]
    assert backend.requests == []


def test_a_tool_the_translation_cannot_carry_is_named_in_a_400(vllm):
    gw, backend = vllm
    with pytest.raises(openai.BadRequestError) as refused:
        client(gw).responses.create(model="qwen", input="Find it", tools=[{"type": "file_search",
                                                                             "vector_store_ids": ["vs_1"]}])
    assert "file_search" in refused.value.body["message"]
    assert backend.requests == []


def test_the_gateways_refusals_are_the_sdks_exceptions(guarded_vllm):
    gw, backend, key = guarded_vllm
    with pytest.raises(openai.AuthenticationError):
        client(gw, api_key="sk-wrong").responses.create(model="qwen", input="hi")
    with pytest.raises(openai.NotFoundError):
        client(gw, api_key=key).responses.create(model="nope", input="hi")
    assert client(gw, api_key=key).responses.create(model="qwen", input="hi").output_text
    with pytest.raises(openai.RateLimitError) as limited:
        client(gw, api_key=key).responses.create(model="qwen", input="hi")
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert len(backend.requests) == 1


def test_responses_pass_through_to_an_instance_that_serves_them(stubs, gateway):
    (native,) = stubs("native")
    native.serves_responses = True
    gw = gateway({"model": {"retries": 0, "services": {"chat": {"instances": [
        instance("gpt", native, **RESPONSES_NATIVE)]}}}})
    # Fields the translation would refuse or rewrite, spaced as no serializer would: byte-for-byte.
    body = (b'{"model":"gpt",  "input":[{"role":"user","content":"hi"}], "store":true,'
            b' "tools":[{"type":"web_search"}], "include":["reasoning.encrypted_content"], "x-extra":1}')
    r = httpx.post(gw.url + "/v1/responses", content=body,
                   headers={"content-type": "application/json", "x-stub-usage": "7,3"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "response" and r.json()["usage"]["total_tokens"] == 10
    received = native.requests[-1]
    assert received.path == "/v1/responses" and received.body == body
    with client(gw).responses.stream(model="gpt", input="hi", extra_headers={"x-stub-usage": "5,2"}) as stream:
        final = stream.get_final_response()
    assert final.output_text == "hello from native"
    assert native.requests[-1].path == "/v1/responses" and native.requests[-1].json()["stream"] is True
    # Usage is still read on the way through, whole and streamed.
    time.sleep(1.5)
    tokens = lambda kind: value(scrape(gw), "jairouter_tokens_total", service="chat", model="gpt", kind=kind)
    assert (tokens("prompt"), tokens("completion")) == (12, 5)


# --- The OpenAI Agents SDK (PyPI openai-agents, integration-tests/requirements.txt) ---

def run_agent(gw, streamed: bool) -> tuple[str, list]:
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    # Traces would go to OpenAI's platform.
    set_tracing_disabled(True)
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"sunny in {city}"

    async def run() -> str:
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)
        agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather],
                      model=OpenAIResponsesModel(model="qwen", openai_client=sdk))
        if not streamed:
            return (await Runner.run(agent, "Weather in Paris?")).final_output
        result = Runner.run_streamed(agent, "Weather in Paris?")
        async for _ in result.stream_events():
            pass
        return result.final_output

    return asyncio.run(run()), asked


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_agents_sdk_agent_with_a_function_tool_runs_to_completion(vllm, streamed):
    gw, backend = vllm
    final, asked = run_agent(gw, streamed)
    assert asked == ["stub-city"]
    assert final == "tool said: sunny in stub-city"
    first, second = (r.json() for r in backend.requests)
    assert first["messages"][0] == {"role": "system", "content": "Answer with the tool."}
    assert first["tools"][0]["function"]["name"] == "get_weather"
    assert second["messages"][-1]["role"] == "tool" and second["messages"][-1]["content"] == "sunny in stub-city"


# --- Codex CLI (npm @openai/codex, installed by ./build.sh test e2e into .agent-clients/) ---

CODEX = ROOT / ".agent-clients" / "node_modules" / ".bin" / "codex"

# What Codex reads from $CODEX_HOME/config.toml: the gateway as a custom provider. Web search and
# sub-agents are off, as docs/responses.md says (tools the translation to chat completions cannot
# carry); so are the update check, analytics, apps and plugins (calls to github.com and chatgpt.com).
CODEX_CONFIG = """\
model = "qwen"
model_provider = "jairouter"
approval_policy = "never"
# The test's own temporary directory is the sandbox; bubblewrap may be unavailable on CI machines.
sandbox_mode = "danger-full-access"
web_search = "disabled"
check_for_update_on_startup = false

[features]
goals = false
apps = false
plugins = false

[agents]
enabled = false

[analytics]
enabled = false

[model_providers.jairouter]
name = "JAiRouter"
base_url = "{base_url}"
env_key = "JAIROUTER_API_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"""


def codex(gw, tmp_path: Path, prompt: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`codex exec PROMPT` against the gateway, with a HOME and CODEX_HOME of its own, in an empty
    working directory; returns the run and that directory."""
    if not CODEX.exists():
        if shutil.which("npm") is None or shutil.which("node") is None:
            pytest.skip("Codex CLI needs npm and node, which this machine lacks")
        pytest.fail(f"Codex CLI is not installed at {CODEX}: run ./build.sh test e2e (ensure_agent_clients)")
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(CODEX_CONFIG.format(base_url=gw.url + "/v1"))
    work = tmp_path / "work"
    work.mkdir()
    # Whatever Codex would reach beyond loopback meets a closed port instead.
    nowhere = "http://127.0.0.1:9"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home / ".codex"),
           "JAIROUTER_API_KEY": "unused", "HTTPS_PROXY": nowhere, "HTTP_PROXY": nowhere, "ALL_PROXY": nowhere,
           "NO_PROXY": "127.0.0.1,localhost"}
    run = subprocess.run([str(CODEX), "exec", "--skip-git-repo-check", "--ephemeral", "--color", "never",
                          "-C", str(work), prompt],
                         env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    return run, work


def test_codex_completes_a_one_turn_task(vllm, tmp_path):
    gw, backend = vllm
    # Codex always offers its tools; here the model answers text (the stub's streamed "tokN ").
    backend.ignore_tools = True
    run, _ = codex(gw, tmp_path, "Say hello.")
    assert run.returncode == 0, run.stderr
    assert "tok0 tok1 tok2 tok3 tok4" in run.stdout
    (received,) = backend.requests
    assert received.path == "/v1/chat/completions"
    sent = received.json()
    assert sent["model"] == "qwen" and sent["stream"] is True
    assert sent["messages"][-1]["role"] == "user"
    assert "exec_command" in [t["function"]["name"] for t in sent["tools"]]


def test_codex_runs_a_tool_call_and_sends_its_output_back(vllm, tmp_path):
    gw, backend = vllm
    # Codex's shell tool (0.169.0): exec_command {"cmd": ...}.
    backend.scripted_call = ("exec_command", json.dumps({"cmd": "echo codex-ran-this > proof.txt && cat proof.txt"}))
    run, work = codex(gw, tmp_path, "Write proof.txt.")
    assert run.returncode == 0, run.stderr
    assert (work / "proof.txt").read_text().strip() == "codex-ran-this"
    first, second = (r.json() for r in backend.requests)
    assert first["messages"][-1]["role"] == "user"
    call = second["messages"][-2]
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "exec_command"
    result = second["messages"][-1]
    assert result["role"] == "tool" and result["tool_call_id"] == call["tool_calls"][0]["id"]
    assert "codex-ran-this" in result["content"]
    # The stub's answer to the tool output is Codex's last message.
    assert "tool said:" in run.stdout and "codex-ran-this" in run.stdout
