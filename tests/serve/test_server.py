"""``ipcv-export serve`` over real HTTP on 127.0.0.1: the server runs in a subprocess with the
tiny preset; the ``openai`` client and httpx talk to it. No mocks."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import openai
import pytest

from ipcv_deploy.bench.serving import ServerProcess
from ipcv_deploy.cli import main
from ipcv_deploy.runtime.testcard import make_test_card

MODEL = "tiny-qwen2-vl"
PROMPT = "Describe the image."


def _png(image=None) -> bytes:
    buf = io.BytesIO()
    (image or make_test_card()).save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(raw or _png()).decode()


def user(url: str, text: str = PROMPT) -> list[dict]:
    """One user message: the image first, then the text (as `ipcv-export run` builds it)."""
    image = {"type": "image_url", "image_url": {"url": url}}
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


def body(**changes) -> dict:
    payload = {"model": MODEL, "messages": user(data_url()), "max_tokens": 6, "temperature": 0}
    return {**payload, **changes}


class Server(ServerProcess):
    """The server of the tiny preset, with request helpers."""

    def __init__(self, *extra: str) -> None:
        super().__init__(MODEL, *extra, timeout_s=180)

    def post(self, payload, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=payload, timeout=120, **kwargs)

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server("--max-tokens", "64", "--max-body-mb", "1", "--max-image-pixels", "1000000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict() -> Iterator[Server]:
    """An API key, one request per batch and one waiting at most."""
    s = Server("--api-key", "sesame", "--max-batch", "1", "--max-queue", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_openai_client_gets_the_answer_of_ipcv_export_run(
    client: openai.OpenAI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "card.png"
    image.write_bytes(_png())
    argv = ["run", "--model", MODEL, "--image", str(image), "--prompt", PROMPT]
    assert main([*argv, "--max-new-tokens", "6", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    reply = client.chat.completions.create(
        model=MODEL, messages=user(data_url()), max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.content == expected["answer"]
    assert reply.usage.completion_tokens == len(expected["tokens"])
    assert reply.usage.prompt_tokens == expected["prompt_tokens_per_sample"][0]
    assert reply.usage.model_extra["ipcv"]["visual_tokens"] == expected["visual_tokens"]
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.parametrize("model", ["tiny-llava-next", "tiny-paligemma"])
def test_anyres_and_prefix_lm_models_answer_as_run_does(
    model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """LLaVA-NeXT (anyres tiles) and PaliGemma (no chat template: its own prompt, prefix-LM
    mask) over HTTP give the answer of `ipcv-export run`."""
    image = tmp_path / "card.png"
    image.write_bytes(_png())
    argv = ["run", "--model", model, "--image", str(image), "--prompt", PROMPT]
    assert main([*argv, "--max-new-tokens", "4", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    served = ServerProcess(model, timeout_s=180)
    try:
        reply = httpx.post(
            f"{served.url}/v1/chat/completions",
            json={**body(max_tokens=4), "model": model},
            timeout=120,
        ).json()
    finally:
        served.stop()
    assert reply["choices"][0]["message"]["content"] == expected["answer"]
    assert reply["usage"]["prompt_tokens"] == expected["prompt_tokens_per_sample"][0]
    assert reply["usage"]["ipcv"]["visual_tokens"] == expected["visual_tokens"]


def test_streaming_yields_the_same_tokens(server: Server, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=user(data_url()), max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=user(data_url()),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body(stream=True), timeout=60
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_stop_strings_end_the_answer_before_them(server: Server) -> None:
    answer = server.post(body(max_tokens=12)).json()["choices"][0]["message"]["content"]
    assert len(answer) >= 6
    stop = answer[4:6]
    reply = server.post(body(max_tokens=12, stop=[stop])).json()["choices"][0]
    assert reply["message"]["content"] == answer[: answer.find(stop)]
    assert reply["finish_reason"] == "stop"


def test_unsupported_openai_fields_are_ignored_with_a_warning(server: Server) -> None:
    reply = server.post(body(logprobs=True, presence_penalty=0.5))
    assert reply.status_code == 200
    assert "ignored unsupported fields: logprobs, presence_penalty" in reply.headers["warning"]


def test_the_vllm_backend_refuses_a_server_that_is_not_vllm(server: Server, capsys) -> None:
    """Our own OpenAI server is not vLLM (no /tokenize, no image_embeds): one line, exit 2."""
    argv = ["run", "--model", MODEL, "--llm-backend", "vllm", "--vllm-url", server.url]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "not a vLLM OpenAI server" in err


def _big_png() -> bytes:
    return _png(make_test_card(1200, 1000))  # 1.2 MP, over the 1 MP limit


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 400, "must be a JSON object"),
        ({**body(), "messages": "hi"}, 400, "'messages' must be a non-empty list"),
        ({**body(), "temperature": "hot"}, 400, "'temperature' must be a number"),
        ({**body(), "max_tokens": 100000}, 400, "'max_tokens' must be in [1, 64]"),
        ({**body(), "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
        ({**body(), "n": 2}, 400, "'n' must be 1"),
        ({**body(), "model": "gpt-4o"}, 404, "The model `gpt-4o` does not exist"),
        ({**body(), "messages": [{"role": "tool", "content": "x"}]}, 400, "role 'tool'"),
        ({**body(), "messages": [{"role": "user", "content": "no image"}]}, 400, "hold 0"),
        (
            {**body(), "messages": user(data_url()) + user(data_url())},
            400,
            "hold 2",
        ),
        (
            {**body(), "messages": user(data_url(b"this is not an image"))},
            400,
            "does not decode",
        ),
        ({**body(), "messages": user("data:image/png;base64,@@@")}, 400, "not valid base64"),
        ({**body(), "messages": user("https://example.com/cat.png")}, 400, "--allow-url-fetch"),
        ({**body(), "messages": user("file:///etc/passwd")}, 400, "scheme 'file'"),
        ({**body(), "messages": user(data_url(_big_png()))}, 413, "> 1000000 pixels"),
        ({**body(), "messages": user(data_url(), "x" * 1_500_000)}, 413, "larger than"),
        (
            {**body(), "messages": user(data_url(), "word " * 20000)},
            400,
            "more than the model's context",
        ),
    ],
)
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(
    server: Server, payload, status: int, needle: str
) -> None:
    url = f"{server.url}/v1/chat/completions"
    if isinstance(payload, bytes):
        reply = httpx.post(url, content=payload, timeout=60)
    else:
        reply = httpx.post(url, json=payload, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert needle in error["message"] and error["type"]
    assert server.healthy() and server.post(body()).status_code == 200


def test_sixteen_concurrent_clients_all_complete(server: Server) -> None:
    alone = server.post(body()).json()["choices"][0]["message"]["content"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: server.post(body()), range(16)))
    assert [r.status_code for r in replies] == [200] * 16
    assert {r.json()["choices"][0]["message"]["content"] for r in replies} == {alone}
    assert max(r.json()["usage"]["ipcv"]["batch"] for r in replies) > 1  # they were batched


def test_a_client_killed_mid_stream_does_not_wedge_the_server(server: Server) -> None:
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body(max_tokens=64, stream=True),
        timeout=60,
    ) as raw:  # fmt: skip
        next(raw.iter_lines())  # the first chunk, then the client hangs up
    started = time.monotonic()
    assert server.post(body()).status_code == 200
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").json()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_api_key_guards_every_route_but_health(strict: Server) -> None:
    assert strict.healthy()
    assert httpx.get(f"{strict.url}/v1/models").status_code == 401
    wrong = {"Authorization": "Bearer guess"}
    assert httpx.get(f"{strict.url}/v1/models", headers=wrong).status_code == 401
    reply = strict.post(body(), headers=wrong)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    good = openai.OpenAI(base_url=f"{strict.url}/v1", api_key="sesame", max_retries=0)
    assert good.models.list().data[0].id == MODEL


def test_a_full_queue_answers_503_with_retry_after(strict: Server) -> None:
    headers = {"Authorization": "Bearer sesame"}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(
            pool.map(lambda _: strict.post(body(max_tokens=48), headers=headers), range(6))
        )
    codes = sorted(r.status_code for r in replies)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "server_busy"
    assert strict.post(body(), headers=headers).status_code == 200  # serving again


class _Images(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {
        "/card.png": _png(),
        "/big.png": b"\x89PNG" + b"\0" * (3 << 20),
    }

    def do_GET(self) -> None:
        data = self.files.get(self.path)
        self.send_response(200 if data else 404)
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args) -> None:
        pass


def test_url_fetch_when_allowed_then_sigterm_finishes_in_flight_requests() -> None:
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{images.server_address[1]}"
    server = Server("--allow-url-fetch", "--max-image-mb", "2")
    try:
        fetched = server.post(body(messages=user(f"{site}/card.png")))
        inline = server.post(body())
        assert fetched.status_code == 200
        assert fetched.json()["choices"] == inline.json()["choices"]
        assert server.post(body(messages=user(f"{site}/big.png"))).status_code == 413
        assert server.post(body(messages=user(f"{site}/none.png"))).status_code == 400
        assert server.post(body(messages=user("file:///etc/hosts"))).status_code == 400
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(server.post, body(max_tokens=48))
            deadline = time.monotonic() + 30
            while not httpx.get(f"{server.url}/health").json()["running"]:
                assert time.monotonic() < deadline and not pending.done()
                time.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            reply = pending.result(timeout=120)
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] == 48
        # uvicorn shuts down gracefully, then exits by the signal it got
        assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.proc.stderr.read()
    finally:
        server.proc.kill()
        images.shutdown()
