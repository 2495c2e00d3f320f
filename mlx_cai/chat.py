"""Chat backends behind one small interface: a local MLX model, or any OpenAI-compatible server.

Every model call in mlx-cai (generation, critique, revision, feedback, judging) goes through
`ChatBackend.complete(conversations, config, seeds) -> list[Generation]`. Backends are named by a spec:

  smollm2-135m | local:<model spec>[::<adapter dir>]   a local MLX model (see mlx_cai.models)
  openai:<model>                                      api.openai.com (or $OPENAI_BASE_URL)
  openai:<model>@http://127.0.0.1:8080/v1             any OpenAI-compatible server (mlx_lm.server, vLLM, ...)

The API key is read from an environment variable (default OPENAI_API_KEY) at call time and never
stored in configs, records or logs; servers on loopback need none.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from mlx_cai.sampling import Conversation, Generation, SamplingConfig


class BackendError(RuntimeError):
    """A backend that cannot serve requests (down, auth, retries exhausted); one-line message."""


class ChatBackend(Protocol):
    name: str

    def complete(self, conversations: Sequence[Conversation], config: SamplingConfig,
                 seeds: Sequence[int] | None = None) -> list[Generation]: ...

    def check(self) -> None:
        """Raise BackendError now if the backend cannot serve (called before long runs)."""


class LocalBackend:
    """An MLX model in this process, loaded on first use."""

    def __init__(self, model: str, adapter: str | None = None, batch_size: int = 32,
                 on_tokens: Callable[[int], None] | None = None):
        self.model_spec, self.adapter, self.batch_size = model, adapter, batch_size
        self.on_tokens = on_tokens
        self.name = f"local:{model}" + (f"::{adapter}" if adapter else "")
        self._loaded = None

    def loaded(self):
        if self._loaded is None:
            from mlx_cai import models

            self._loaded = models.load(self.model_spec, self.adapter)
        return self._loaded

    def check(self) -> None:
        from mlx_cai import models

        try:
            self.loaded()
        except models.ModelError as e:
            raise BackendError(str(e)) from None

    def complete(self, conversations, config, seeds=None):
        from mlx_cai.generate import generate

        model, tokenizer = self.loaded()
        return generate(model, tokenizer, conversations, config, batch_size=self.batch_size, seeds=seeds,
                        on_tokens=self.on_tokens)


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible chat completions server, with retries and bounded concurrency."""

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    max_retries: int = 5
    concurrency: int = 8
    backoff: float = 1.0  # first retry delay in seconds; doubles each time, with jitter

    def __post_init__(self):
        self.name = f"openai:{self.model}" + (f"@{self.base_url}" if self.base_url else "")
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                import openai

                key = os.environ.get(self.api_key_env)
                local = bool(self.base_url) and any(h in self.base_url for h in ("127.0.0.1", "localhost", "[::1]"))
                if not key and not local:
                    raise BackendError(f"{self.name}: set the API key in ${self.api_key_env}")
                # Our own retry loop (below) owns backoff, so the client's is off.
                self._client = openai.OpenAI(api_key=key or "not-needed", base_url=self.base_url,
                                             timeout=self.timeout, max_retries=0)
        return self._client

    def check(self) -> None:
        import openai

        client = self.client()
        try:
            client.models.list()
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise BackendError(f"{self.name} is not reachable: {_first_line(e)}") from None
        except openai.AuthenticationError as e:
            raise BackendError(f"{self.name}: authentication failed ({_first_line(e)}); check ${self.api_key_env}") from None
        except Exception:  # reachable; some servers (mlx_lm.server) answer /models oddly
            pass

    def _one(self, conversation: Conversation, config: SamplingConfig, seed: int) -> Generation:
        import openai

        kwargs = dict(model=self.model, messages=list(conversation), max_tokens=config.max_tokens,
                      temperature=config.temperature, top_p=config.top_p, seed=seed)
        if config.repetition_penalty != 1.0:  # not in OpenAI's API; mlx_lm.server and vLLM read it
            kwargs["extra_body"] = {"repetition_penalty": config.repetition_penalty}
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            try:
                r = self.client().chat.completions.create(**kwargs)
                choice = r.choices[0]
                usage = r.usage
                return Generation(text=choice.message.content or "",
                                  finish_reason="length" if choice.finish_reason == "length" else "stop",
                                  prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                                  completion_tokens=getattr(usage, "completion_tokens", 0) or 0)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                    openai.APITimeoutError) as e:
                if attempt == self.max_retries:
                    raise BackendError(f"{self.name}: gave up after {attempt + 1} tries: {_first_line(e)}") from None
                time.sleep(delay * (1 + random.random()))
                delay *= 2
            except openai.APIStatusError as e:  # 4xx other than 429: retrying will not help
                raise BackendError(f"{self.name}: HTTP {e.status_code}: {_first_line(e)}") from None
        raise AssertionError("unreachable")

    def complete(self, conversations, config, seeds=None):
        seeds = list(seeds) if seeds is not None else [config.seed + i for i in range(len(conversations))]
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda a: self._one(a[0], config, a[1]), zip(conversations, seeds)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def from_spec(spec: str, *, batch_size: int = 32, api_key_env: str = "OPENAI_API_KEY",
              concurrency: int = 8, timeout: float = 120.0) -> ChatBackend:
    """Build a backend from a spec string (see the module docstring)."""
    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        model, _, base = rest.partition("@")
        if not model:
            raise BackendError(f"backend spec '{spec}' names no model: use openai:<model>[@<base url>]")
        return OpenAIBackend(model=model, base_url=base or os.environ.get("OPENAI_BASE_URL") or None,
                             api_key_env=api_key_env, concurrency=concurrency, timeout=timeout)
    if spec.startswith("local:"):
        spec = spec[len("local:"):]
    model, _, adapter = spec.partition("::")
    return LocalBackend(model, adapter or None, batch_size=batch_size)
