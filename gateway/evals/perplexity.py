"""A dev set's prompt perplexity under one adapter version, measured through the gateway: the
number an Adaptation Card's `drift.dev_perplexity` holds, against which the gateway's prompt
drift (gateway/prompt_drift.py) compares live traffic. Measured as drift measures it: each
prompt's token logprobs under the adapter (a completion's echo with logprobs, max_tokens 1),
every token after the first, pooled over the set: exp(sum of -logprob / tokens).

A dev set is JSON lines, each `{"prompt": "<text>"}` or `{"prompt": [token ids]}`. Text is
tokenized as completion traffic is (the tokenizer's special tokens added); a chat adapter's dev
set is the token ids of its prompts with the chat template applied, as the engine sees chat
traffic (text of a rendered template would get a second BOS). Drift samples prompts of at most
LORAPLEX_DRIFT_MAX_PROMPT_TOKENS; longer dev prompts are measured and left out, counted.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.evals.runner import MAX_ATTEMPTS, RETRIED_STATUSES, retry_after

MAX_PROMPTS = 100_000


class DevSetError(ValueError):
    """A dev set that cannot be read, or a prompt the gateway refused; the message says which."""


@dataclass(frozen=True)
class Perplexity:
    prompts: int
    tokens: int
    surprisal: float  # sum of -logprob over the scored tokens
    skipped: int = 0  # prompts over the length drift samples

    @property
    def value(self) -> float | None:
        return math.exp(self.surprisal / self.tokens) if self.tokens else None


def load_dev_set(path: Path) -> list[str | list[int]]:
    """The prompts of a dev set file. Raises DevSetError naming the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DevSetError(f"{path}: {exc}") from exc
    prompts: list[str | list[int]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise DevSetError(f"{path}:{number}: not a JSON object with a `prompt`") from None
        text = isinstance(prompt, str) and prompt.strip()
        ids = isinstance(prompt, list) and prompt and all(type(i) is int for i in prompt)
        if not (text or ids):
            raise DevSetError(f"{path}:{number}: a prompt is non-empty text or token ids")
        prompts.append(prompt)
    if not prompts:
        raise DevSetError(f"{path}: no prompts")
    if len(prompts) > MAX_PROMPTS:
        raise DevSetError(f"{path}: {len(prompts)} prompts; at most {MAX_PROMPTS}")
    return prompts


async def measure(
    client: httpx.AsyncClient,
    model: str,
    prompts: list[str | list[int]],
    concurrency: int,
    max_prompt_tokens: int = 512,
) -> Perplexity:
    """Each prompt's logprobs under `model`, pooled over the prompts of at most
    `max_prompt_tokens`. Raises DevSetError on a refused prompt."""
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, prompt: str | list[int]) -> tuple[float, int] | None:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 0,
        }
        async with gate:
            data = await _post(client, body, index)
        length = data["usage"]["prompt_tokens"]
        if length > max_prompt_tokens:
            return None
        # The prompt's tokens lead the echo; the first has no logprob, the generated one follows.
        echoed = data["choices"][0]["logprobs"]["token_logprobs"][:length]
        # -9999 is the server's -inf, which drift leaves out too.
        scored = [lp for lp in echoed[1:] if lp is not None and lp > -9999]
        return -sum(scored), len(scored)

    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    kept = [r for r in results if r is not None]
    return Perplexity(
        len(kept), sum(n for _, n in kept), sum(s for s, _ in kept), len(results) - len(kept)
    )


async def _post(client: httpx.AsyncClient, body: dict[str, Any], index: int) -> Any:
    for attempt in range(MAX_ATTEMPTS):
        response = await client.post("/v1/completions", json=body)
        if response.status_code in RETRIED_STATUSES and attempt < MAX_ATTEMPTS - 1:
            await asyncio.sleep(retry_after(response, attempt))
            continue
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise DevSetError(f"prompt {index + 1}: refused ({response.status_code}): {message}")
        return response.json()
    raise AssertionError("unreachable: the last attempt returns")
