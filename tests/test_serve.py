"""The Serve application over real HTTP on 127.0.0.1: endpoints, routing, pins, bad input,
a bounded concurrent load, auth, and mix-affine replicas."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from merge_helpers import merge_with, write_calibration

from mediator_ray.testing import Zoo, sample_prompts

APP = "mediator"
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(serve_url: str, tiny_zoo: Zoo, tmp_path_factory: pytest.TempPathFactory):
    """The app as a Serve config would build it (``mediator_ray.serve:app`` with args)."""
    from ray import serve

    from mediator_ray.serve import app

    folder = tmp_path_factory.mktemp("serve")
    checkpoint = merge_with(
        tiny_zoo, folder / "ckpt", write_calibration(folder / "cal", tiny_zoo), 0.1
    )
    args = {
        "checkpoint": str(checkpoint),
        "model_name": "tiny",
        "replicas": 2,
        "num_cpus": 0.25,
        "device": "cpu",
        "cache_size": 4,
    }
    serve.run(app(args), name=APP, route_prefix="/")
    secure_env = {"env_vars": {"MEDIATOR_API_KEY": "s3cret"}}
    serve.run(
        app(args | {"replicas": 1, "runtime_env": secure_env}),
        name="secure",
        route_prefix="/secure",
    )
    try:
        yield {"url": serve_url, "zoo": tiny_zoo}
    finally:
        serve.delete(APP)
        serve.delete("secure")


def post(server: dict, path: str, body: object, **kwargs) -> requests.Response:
    return requests.post(f"{server['url']}{path}", json=body, timeout=TIMEOUT, **kwargs)


def prompt_of(task: str, seed: int = 500) -> str:
    return sample_prompts(task, 1, seed=seed)[0]


def test_health_and_models(server: dict) -> None:
    assert requests.get(f"{server['url']}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
    models = requests.get(f"{server['url']}/v1/models", timeout=TIMEOUT).json()
    ids = [m["id"] for m in models["data"]]
    assert ids == ["tiny", "tiny:math", "tiny:code", "tiny:chat", "tiny:json"]
    assert models["mediator"]["routed_layers"] == ["block.2", "block.5"]


def test_completions_route_each_task_to_its_expert(server: dict) -> None:
    for task in server["zoo"].experts:
        for seed in (501, 502):
            r = post(
                server,
                "/v1/completions",
                {
                    "model": "tiny",
                    "prompt": prompt_of(task, seed),
                    "max_tokens": 4,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "text_completion" and isinstance(
                body["choices"][0]["text"], str
            )
            assert body["choices"][0]["finish_reason"] in {"stop", "length"}
            assert body["usage"]["completion_tokens"] <= 4
            assert body["mediator"]["mix"] == task and body["mediator"]["mode"] == "top1"
            assert abs(sum(body["mediator"]["probabilities"].values()) - 1) < 1e-4


def test_route_endpoint(server: dict) -> None:
    r = post(server, "/v1/route", {"prompt": [prompt_of("json"), prompt_of("code")]})
    assert r.status_code == 200, r.text
    assert [d["mix"] for d in r.json()["data"]] == ["json", "code"]


def test_chat_completions(server: dict) -> None:
    body = {
        "messages": [{"role": "user", "content": prompt_of("chat")}],
        "max_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert set(out["mediator"]) >= {"probabilities", "uncertainty", "mode", "mix", "replica"}


def test_streaming_equals_the_non_streaming_completion(server: dict) -> None:
    body = {"prompt": prompt_of("math", 7), "max_tokens": 6, "temperature": 0}
    plain = post(server, "/v1/completions", body).json()
    with post(server, "/v1/completions", body | {"stream": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[0]["mediator"]["mix"] == plain["mediator"]["mix"]


def test_pinned_expert_and_mix_are_honoured(server: dict) -> None:
    math_prompt = prompt_of("math")
    r = post(
        server, "/v1/completions", {"model": "tiny:chat", "prompt": math_prompt, "max_tokens": 2}
    )
    assert r.json()["mediator"]["mix"] == "chat" and r.json()["mediator"]["mode"] == "pinned"
    r = post(
        server,
        "/v1/completions",
        {"model": "tiny:math:0.6+code:0.4", "prompt": math_prompt, "max_tokens": 2},
    )
    assert r.json()["mediator"]["mix"] == "code:0.4+math:0.6"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ("{not json", 400, "body"),
        ({}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "x" * 9000}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"prompt": "hi", "stop": ["", "x"]}, 400, "stop"),
        ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "hi", "model": "tiny:poetry"}, 400, "model"),
        ({"prompt": ["a", "b"], "stream": True}, 400, "prompt"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(server: dict, body, status: int, param: str) -> None:
    if isinstance(body, str):
        r = requests.post(
            f"{server['url']}/v1/completions",
            data=body,
            timeout=TIMEOUT,
            headers={"content-type": "application/json"},
        )
    else:
        r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_bad_chat_and_route_input_and_oversized_body(server: dict) -> None:
    r = post(server, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    r = post(server, "/v1/route", {"prompt": "x", "extra": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "extra"
    r = post(server, "/v1/completions", {"prompt": "y" * 1_100_000})
    assert r.status_code == 413
    # ... and the server keeps serving.
    assert post(server, "/v1/completions", {"prompt": "still there?", "max_tokens": 1}).ok


def test_bearer_token_when_an_api_key_is_set(server: dict) -> None:
    url = f"{server['url']}/secure/v1/completions"
    body = {"prompt": prompt_of("code"), "max_tokens": 1}
    assert requests.post(url, json=body, timeout=TIMEOUT).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.post(url, json=body, headers=wrong, timeout=TIMEOUT).status_code == 401
    right = {"Authorization": "Bearer s3cret"}
    assert requests.post(url, json=body, headers=right, timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{server['url']}/secure/healthz", timeout=TIMEOUT).status_code == 200


def test_bounded_concurrent_mixed_load_has_no_errors(server: dict) -> None:
    tasks = list(server["zoo"].experts)
    bodies = [
        {"prompt": prompt_of(tasks[i % 4], 600 + i), "max_tokens": 3, "temperature": 0}
        for i in range(200)
    ]

    def call(body: dict) -> tuple[int, dict]:
        r = post(server, "/v1/completions", body)
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, bodies))
    assert [status for status, _ in results] == [200] * 200
    for i, (_, out) in enumerate(results):
        assert isinstance(out["choices"][0]["text"], str)
        assert out["usage"]["total_tokens"] == (
            out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
        )
        weights = out["mediator"]["weights"]
        # ~5% of in-distribution prompts are meant to be served as top-k mixtures (u_low is
        # the held-out 95th percentile); the task's own expert still leads the mix.
        assert max(weights, key=weights.get) == tasks[i % 4]
    batch_sizes = Counter(out["mediator"]["replica"] for _, out in results)
    assert len(batch_sizes) == 2  # both replicas served


def test_requests_for_one_mix_go_to_the_replica_holding_it(server: dict) -> None:
    mixes = ("tiny:math:0.5+json:0.5", "tiny:code:0.3+chat:0.7")
    holder = {}
    for mix in mixes:  # first request: some replica materialises the mix
        r = post(server, "/v1/completions", {"model": mix, "prompt": "warm up", "max_tokens": 1})
        holder[mix] = r.json()["mediator"]["replica"]
    time.sleep(2.0)  # replicas report the mixes they hold to Serve's routers asynchronously
    replicas: dict[str, set[str]] = {mix: {holder[mix]} for mix in mixes}
    for mix in mixes:
        for i in range(6):
            r = post(
                server,
                "/v1/completions",
                {"model": mix, "prompt": prompt_of("math", 700 + i), "max_tokens": 1},
            )
            replicas.setdefault(mix, set()).add(r.json()["mediator"]["replica"])
    assert all(len(ids) == 1 for ids in replicas.values()), replicas
    from ray import serve

    pool = serve.get_deployment_handle("ExpertPool", app_name=APP)
    stats = [pool.stats.remote().result() for _ in range(8)]
    holding = {s["replica"]: s["cached_mixes"] for s in stats}
    from mediator_ray.router import mix_key, parse_mix

    for mix in mixes:
        key = mix_key(parse_mix(mix.removeprefix("tiny:"), list(server["zoo"].experts)))
        assert any(key in held for held in holding.values()), (key, holding)
    assert all(len(held) <= 4 for held in holding.values())  # cache_size


def test_serve_config_file_builds_the_same_app(tmp_path: Path) -> None:
    import yaml

    from mediator_ray.serve import ServeOptions

    config = yaml.safe_load(
        (Path(__file__).parents[1] / "cluster" / "serve-config.yaml").read_text()
    )
    (application,) = config["applications"]
    assert application["import_path"] == "mediator_ray.serve:app"
    options = ServeOptions(**application["args"])
    assert options.checkpoint.startswith("s3://") and config["http_options"]["host"]
