"""The HTTP ingress: OpenAI-style endpoints in front of the expert pool.

Each request is routed once (task level) by the pool's router — unless the client pins an
expert or mix with ``model: "<name>:math"`` or ``"<name>:code:0.4+math:0.6"`` — and then sent,
with its mix as the multiplexed model id, to a pool replica that holds that mix. Responses
carry an extra ``mediator`` object (task probabilities, uncertainty, mode, mix, replica).
"""

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.middleware.base import BaseHTTPMiddleware

from mediator_ray.router import parse_mix
from mediator_ray.serve.api import (
    ChatCompletionRequest,
    CompletionRequest,
    RouteRequest,
    SamplingParams,
    ServeOptions,
)
from mediator_ray.serve.deployments import GenerationJob, new_id, now

API_KEY_ENV = "MEDIATOR_API_KEY"
#: Set by the Ingress replica from its options (middleware must exist before the app starts).
LIMITS = {"max_request_bytes": 1_000_000}


api = FastAPI(title="mediator-ray", docs_url=None, redoc_url=None)


class APIError(Exception):
    """A client error with its HTTP status and the request field it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


@api.exception_handler(APIError)
async def _api_error(_: Request, error: APIError) -> JSONResponse:
    return error_response(error.status, error.message, error.param)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    # Drop FastAPI's "body" and pydantic's union-member tags ("str", "list[str]").
    location = [
        str(p)
        for p in first["loc"]
        if p != "body" and str(p) not in _UNION_TAGS and "[" not in str(p)
    ]
    param = ".".join(location) or "body"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "json_invalid":
        param, message = "body", f"request body is not valid JSON: {message}"
    return error_response(400, f"{param}: {message}", param)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "function-after", "function-before"}


class GuardMiddleware(BaseHTTPMiddleware):
    """Bearer-token auth (when MEDIATOR_API_KEY is set) and a request size limit."""

    @property
    def max_request_bytes(self) -> int:
        return LIMITS["max_request_bytes"]

    async def dispatch(self, request: Request, call_next: Any) -> Any:
        key = os.environ.get(API_KEY_ENV)
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        if key and path.startswith(("/v1/", "/admin/")):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error_response(401, "missing or wrong bearer token", "authorization")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            return error_response(
                413, f"request body over {self.max_request_bytes} bytes", "content-length"
            )
        if length is None and request.method == "POST":
            body = await request.body()
            if len(body) > self.max_request_bytes:
                return error_response(413, f"request body over {self.max_request_bytes} bytes")
        return await call_next(request)


api.add_middleware(GuardMiddleware)


def _truncate_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    if not stops:
        return text, False
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, pool: Any, options: ServeOptions):
        self.pool = pool
        self.options = options
        self.name = options.served_name
        LIMITS["max_request_bytes"] = options.max_request_bytes

    async def _experts(self) -> list[str]:
        # Asked each time (not cached): a reload to a new version can add experts.
        return (await self.pool.info.remote())["experts"]

    async def _pinned_mix(self, model: str | None) -> str | None:
        """The mix a client pinned through ``model``, None to route; errors name the field."""
        if model is None or model == self.name:
            return None
        prefix = f"{self.name}:"
        if not model.startswith(prefix):
            raise APIError(
                404, f"model {model!r} not found; this server serves {self.name!r}", "model"
            )
        try:
            weights = parse_mix(model[len(prefix) :], await self._experts())
        except ValueError as e:
            raise APIError(400, f"model: {e}", "model") from None
        from mediator_ray.router import mix_key

        return mix_key(weights)

    async def _route(self, prompts: list[str], pinned: str | None) -> list[dict[str, Any]]:
        if pinned is not None:
            return [
                {
                    "probabilities": {},
                    "uncertainty": 0.0,
                    "mode": "pinned",
                    "mix": pinned,
                    "weights": parse_mix(pinned, await self._experts()),
                }
                for _ in prompts
            ]
        return await self.pool.route.remote(prompts)

    async def _complete(self, prompts: list[str], params: SamplingParams) -> list[dict]:
        routings = await self._route(prompts, await self._pinned_mix(params.model))
        jobs = [
            GenerationJob(prompt, routing["mix"], params.generation_kwargs())
            for prompt, routing in zip(prompts, routings, strict=True)
        ]
        outputs = await asyncio.gather(
            *[self.pool.options(multiplexed_model_id=j.mix).generate.remote(j) for j in jobs]
        )
        results = []
        for routing, output in zip(routings, outputs, strict=True):
            text, stopped = _truncate_at_stop(output["text"], params.stop)
            results.append(
                {
                    "text": text,
                    "finish_reason": "stop" if stopped else output["finish_reason"],
                    "prompt_tokens": output["prompt_tokens"],
                    "completion_tokens": output["completion_tokens"],
                    "mediator": {
                        **routing,
                        "replica": output["replica"],
                        "version": output["version"],
                    },
                }
            )
        return results

    def _usage(self, results: list[dict]) -> dict[str, int]:
        prompt = sum(r["prompt_tokens"] for r in results)
        completion = sum(r["completion_tokens"] for r in results)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _stream(self, prompt: str, params: SamplingParams, shape: str) -> StreamingResponse:
        (routing,) = await self._route([prompt], await self._pinned_mix(params.model))
        job = GenerationJob(prompt, routing["mix"], params.generation_kwargs())
        pieces = self.pool.options(multiplexed_model_id=job.mix, stream=True).stream.remote(job)
        ident, created = new_id("cmpl" if shape == "completion" else "chatcmpl"), now()

        def chunk(delta: str | None, finish: str | None) -> str:
            if shape == "completion":
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "finish_reason": finish,
                    "logprobs": None,
                }
                obj = "text_completion"
            else:
                choice = {
                    "index": 0,
                    "delta": {"content": delta} if delta else {},
                    "finish_reason": finish,
                }
                obj = "chat.completion.chunk"
            body = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": self.name,
                "choices": [choice],
                "mediator": routing,
            }
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            text = ""
            finish = "length"
            async for piece in pieces:
                emitted, stopped = _truncate_at_stop(text + piece, params.stop)
                delta = emitted[len(text) :]
                text = emitted
                if delta:
                    yield chunk(delta, None)
                if stopped:
                    finish = "stop"
                    break
            yield chunk(None, finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- endpoints ---------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        info = await self.pool.info.remote()
        ids = [self.name] + [f"{self.name}:{e}" for e in info["experts"]]
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": 0, "owned_by": "mediator-ray"} for i in ids
            ],
            "mediator": {"checkpoint": self.options.checkpoint, **info},
        }

    @api.post("/admin/reload")
    async def reload(self) -> dict[str, Any]:
        """Ask a pool replica to load the latest version now (the others poll)."""
        return await self.pool.reload.remote()

    @api.post("/v1/route")
    async def route(self, request: RouteRequest) -> dict[str, Any]:
        return {"object": "list", "data": await self.pool.route.remote(request.prompts)}

    @api.post("/v1/completions", response_model=None)
    async def completions(self, request: CompletionRequest) -> Any:
        if request.stream:
            if len(request.prompts) != 1:
                raise APIError(400, "prompt: streaming takes exactly one prompt", "prompt")
            return await self._stream(request.prompts[0], request, "completion")
        results = await self._complete(request.prompts, request)
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": request.model or self.name,
            "choices": [
                {
                    "index": i,
                    "text": r["text"],
                    "finish_reason": r["finish_reason"],
                    "logprobs": None,
                }
                for i, r in enumerate(results)
            ],
            "usage": self._usage(results),
            "mediator": results[0]["mediator"]
            if len(results) == 1
            else [r["mediator"] for r in results],
        }

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(self, request: ChatCompletionRequest) -> Any:
        prompt = await self._chat_prompt(request)
        if request.stream:
            return await self._stream(prompt, request, "chat")
        (result,) = await self._complete([prompt], request)
        return {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": now(),
            "model": request.model or self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["text"]},
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": self._usage([result]),
            "mediator": result["mediator"],
        }

    async def _chat_prompt(self, request: ChatCompletionRequest) -> str:
        messages = [m.model_dump() for m in request.messages]
        if not any(m["content"].strip() for m in messages):
            raise APIError(400, "messages: all messages are empty", "messages")
        return await self.pool.chat_prompt.remote(messages)
