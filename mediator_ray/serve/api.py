"""Request and option models of the HTTP API (OpenAI-style shapes, strict validation).

Every field has a bound: bad input is a 400 that names the field, never a 500.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 8000
MAX_PROMPTS = 16


def _check_text(value: str, field: str) -> str:
    if not value.strip():
        raise ValueError(f"{field} must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{field} is {len(value)} characters; at most {MAX_PROMPT_CHARS}")
    return value


class SamplingParams(BaseModel):
    """The generation knobs shared by both endpoints (OpenAI names and ranges)."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    max_tokens: int = Field(16, ge=1, le=512)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def generation_kwargs(self) -> dict[str, Any]:
        """transformers ``generate`` arguments: greedy at temperature 0, else sampling."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


class PromptInput(BaseModel):
    """``prompt``: one string or a list of them, each non-empty and bounded."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not 1 <= len(value) <= MAX_PROMPTS:
                raise ValueError(f"prompt takes 1 to {MAX_PROMPTS} strings")
            return [_check_text(v, "prompt") for v in value]
        return _check_text(value, "prompt")

    @property
    def prompts(self) -> list[str]:
        return self.prompt if isinstance(self.prompt, list) else [self.prompt]


class CompletionRequest(SamplingParams, PromptInput):
    pass


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"content is {len(value)} characters; at most {MAX_PROMPT_CHARS}")
        return value


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)


class RouteRequest(PromptInput):
    model_config = ConfigDict(extra="forbid")


class ServeOptions(BaseModel):
    """Application arguments (``args:`` of a Serve config, or ``mediator-ray serve`` flags)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    model_name: str | None = Field(
        None, description="the model id clients send; default: the checkpoint folder's name"
    )
    replicas: int = Field(1, ge=1)
    autoscaling: dict[str, Any] | None = Field(
        None,
        description="Serve autoscaling_config (min_replicas, max_replicas, …); replaces replicas",
    )
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per expert-pool replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per expert-pool replica")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_size: int = Field(4, ge=1, description="materialised mixes kept per replica")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    reload_interval_s: float | None = Field(
        None,
        gt=0,
        description="poll a versioned checkpoint root for new versions this often "
        "and swap them in without failing requests",
    )
    runtime_env: dict[str, Any] | None = Field(
        None,
        description="Ray runtime_env of both deployments (env_vars such as "
        "MEDIATOR_API_KEY, pip packages, …)",
    )

    @property
    def served_name(self) -> str:
        return self.model_name or self.checkpoint.rstrip("/").rsplit("/", 1)[-1]
