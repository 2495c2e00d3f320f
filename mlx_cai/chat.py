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
import threading
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
                 on_tokens: Callable[[int], None] | None = None, loaded: tuple | None = None):
        """`loaded`: the (model, tokenizer) of that spec, already loaded for another role (not loaded twice)."""
        self.model_spec, self.adapter, self.batch_size = model, adapter, batch_size
        self.on_tokens = on_tokens
        self.name = f"local:{model}" + (f"::{adapter}" if adapter else "")
        self._loaded = loaded

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

    def option_probs(self, conversations: Sequence[Conversation], answer_prefix: str,
                     options: Sequence[str]) -> list[tuple[list[float], float]]:
        """Per conversation: the probabilities of `options` as the next token after the model's answer starts with
        `answer_prefix` (normalized over the options), and their share of all probability mass
        (mlx_cai.judges.choice). Nothing is generated."""
        from mlx_cai.judges.choice import option_probs, render_answer_start

        model, tokenizer = self.loaded()
        contexts = [render_answer_start(tokenizer, c, answer_prefix) for c in conversations]
        return option_probs(model, tokenizer, contexts, options, batch_size=max(1, min(self.batch_size, 8)))


# HTTP statuses the openai client retries by itself; when it raises one, its retries are spent.
_TRANSIENT = frozenset({408, 409, 429})


def _client_class():
    """openai.OpenAI with our first retry delay. Which failures are retried, `Retry-After` (and
    `retry-after-ms`) and the exponential backoff with jitter stay the library's own; only where the server gives no
    usable Retry-After is its delay scaled so the first one is `mlx_cai_backoff` seconds (the library's first delay
    is a constant). It also counts the retries of the request in flight on this thread, for the error message."""
    global _Client
    if _Client is None:
        import math

        import openai
        from openai import _constants

        first = getattr(_constants, "INITIAL_RETRY_DELAY", 0.5)
        longest = getattr(_constants, "MAX_RETRY_AFTER_DELAY", 60)

        class Client(openai.OpenAI):
            mlx_cai_backoff = first

            def _calculate_retry_timeout(self, remaining_retries, options, response_headers=None):
                _retries.n = getattr(_retries, "n", 0) + 1
                asked = self._parse_retry_after_header(response_headers)
                if asked is not None and math.isfinite(asked) and 0 < asked <= longest:
                    return super()._calculate_retry_timeout(remaining_retries, options, response_headers)
                backoff = super()._calculate_retry_timeout(remaining_retries, options, None)
                return backoff * self.mlx_cai_backoff / first

        _Client = Client
    return _Client


_Client = None
_retries = threading.local()


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible chat completions server, with retries and bounded concurrency.

    Transient failures (connection dropped or refused, timeout, 408/409/429/5xx) are retried by the openai
    client: it honours `Retry-After`, else backs off exponentially (first delay `backoff`, doubling, with jitter).
    When the retries are spent, or on an error that retrying cannot fix (other 4xx, an answer that is not a chat
    completion: malformed JSON, no choices), `complete` raises BackendError, one line. It never returns a
    made-up Generation for a call that failed. Unset settings come from MLX_CAI_API_TIMEOUT/_RETRIES/_BACKOFF.
    """

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float | None = None  # seconds per request (MLX_CAI_API_TIMEOUT, 120)
    max_retries: int | None = None  # retries after the first try (MLX_CAI_API_RETRIES, 5)
    concurrency: int = 8
    backoff: float | None = None  # first retry delay in seconds without Retry-After (MLX_CAI_API_BACKOFF, 1)

    def __post_init__(self):
        from mlx_cai.settings import settings

        s = settings()
        self.timeout = s.api_timeout if self.timeout is None else self.timeout
        self.max_retries = s.api_retries if self.max_retries is None else self.max_retries
        self.backoff = s.api_backoff if self.backoff is None else self.backoff
        self.name = f"openai:{self.model}" + (f"@{self.base_url}" if self.base_url else "")
        self._client = None
        self._lock = threading.Lock()

    def client(self):
        with self._lock:
            if self._client is None:
                key = os.environ.get(self.api_key_env)
                local = bool(self.base_url) and any(h in self.base_url for h in ("127.0.0.1", "localhost", "[::1]"))
                if not key and not local:
                    raise BackendError(f"{self.name}: set the API key in ${self.api_key_env}")
                client = _client_class()(api_key=key or "not-needed", base_url=self.base_url,
                                         timeout=self.timeout, max_retries=self.max_retries)
                client.mlx_cai_backoff = self.backoff
                self._client = client
        return self._client

    def check(self) -> None:
        import openai

        client = self.client().with_options(max_retries=0)  # a quick look, before a long run
        try:
            client.models.list()
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise BackendError(f"{self.name} is not reachable: {self._first_line(e)}") from None
        except openai.AuthenticationError as e:
            raise BackendError(f"{self.name}: authentication failed ({self._first_line(e)}); "
                               f"check ${self.api_key_env}") from None
        except Exception:  # reachable; some servers (mlx_lm.server) answer /models oddly
            pass

    def _first_line(self, e: BaseException | str) -> str:
        """The first line of an error, with the API key (if a server echoes it) blanked out."""
        text = _first_line(e) if isinstance(e, BaseException) else e
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key and len(key) >= 4 else text

    def _one(self, conversation: Conversation, config: SamplingConfig, seed: int) -> Generation:
        import openai

        kwargs = dict(model=self.model, messages=list(conversation), max_tokens=config.max_tokens,
                      temperature=config.temperature, top_p=config.top_p, seed=seed)
        if config.repetition_penalty != 1.0:  # not in OpenAI's API; mlx_lm.server and vLLM read it
            kwargs["extra_body"] = {"repetition_penalty": config.repetition_penalty}
        client = self.client()
        _retries.n = 0
        try:
            r = client.chat.completions.create(**kwargs)
        except openai.APIStatusError as e:
            if e.status_code in _TRANSIENT or e.status_code >= 500:
                raise self._gave_up(e) from None
            raise BackendError(f"{self.name}: HTTP {e.status_code}: {self._first_line(e)}") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as e:
            raise self._gave_up(e) from None
        except ValueError as e:  # the body did not parse as JSON
            raise BackendError(f"{self.name}: the server answered malformed JSON ({self._first_line(e)}); "
                               "is the URL an OpenAI-compatible /v1 endpoint?") from None
        return self._generation(r)

    def _gave_up(self, e: BaseException) -> BackendError:
        tries = getattr(_retries, "n", 0) + 1
        return BackendError(f"{self.name}: gave up after {tries} tr{'y' if tries == 1 else 'ies'}: "
                            f"{self._first_line(e)}")

    def _generation(self, r) -> Generation:
        """The Generation of a chat completion; BackendError if `r` is not one (no choices, no message)."""
        choices = getattr(r, "choices", None)
        if not isinstance(choices, list) or not choices:
            what = "no choices" if isinstance(choices, list) else f"not a chat completion: {str(r)[:60]!r}"
            raise BackendError(f"{self.name}: the server answered without a completion ({what}); "
                               "nothing was recorded for this request")
        choice = choices[0]
        message = getattr(choice, "message", None)
        content = getattr(message, "content", None)
        if message is None or not (content is None or isinstance(content, str)):
            raise BackendError(f"{self.name}: the server answered a malformed completion (no message text)")
        usage = getattr(r, "usage", None)
        return Generation(text=content or "",  # None: e.g. a content filter; judges count it as unparsable
                          finish_reason="length" if getattr(choice, "finish_reason", None) == "length" else "stop",
                          prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                          completion_tokens=getattr(usage, "completion_tokens", 0) or 0)

    def complete(self, conversations, config, seeds=None):
        """One Generation per conversation, in order, or BackendError for the first call that failed (the calls
        not started yet are cancelled)."""
        seeds = list(seeds) if seeds is not None else [config.seed + i for i in range(len(conversations))]
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        failed: list[BaseException] = []  # the first failure, set by its worker before it takes the next call
        lock = threading.Lock()

        def one(c, s):
            if failed:
                raise failed[0]  # not sent: the batch has already failed
            try:
                return self._one(c, config, s)
            except BaseException as e:
                with lock:
                    failed.append(e)
                raise

        try:
            futures = [pool.submit(one, c, s) for c, s in zip(conversations, seeds)]
            out = [f.result() for f in futures]
        except BaseException as e:
            pool.shutdown(wait=False, cancel_futures=True)
            if failed and e is not failed[0]:
                raise failed[0] from None
            raise
        pool.shutdown()
        return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def from_spec(spec: str, *, batch_size: int = 32, api_key_env: str = "OPENAI_API_KEY",
              concurrency: int = 8, timeout: float | None = None) -> ChatBackend:
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
