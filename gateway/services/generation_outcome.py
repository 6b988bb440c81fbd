"""How a generation ended, as the gateway reports it: each update's tokens and endings in the
request's metrics, the error for an engine's finish_reason "error", and whether a failure
counts against the adapter version that served it (the rollout monitor's input)."""

from __future__ import annotations

from gateway.adapter_loads import AdapterCapacityFull
from gateway.engine.client import ChoiceDelta, GenerationUpdate, SamplingOptions
from gateway.errors import InvalidRequest, LoraplexError
from gateway.request_metrics import GenerationRecorder
from gateway.services.generation_job import GenerationJob


class GenerationFailed(LoraplexError):
    status_code = 500
    error_type = "server_error"
    code = "generation_failed"


def record_update(
    recorder: GenerationRecorder,
    job: GenerationJob,
    update: GenerationUpdate,
    grammar_ends_at_stop_tokens: bool,
) -> None:
    recorder.tokens(
        sum(len(d.token_ids) for d in update.choices),
        produced_at=update.first_token_at,
        # A non-streamed request's one update comes at its end, not when its first token was
        # made: only the engine can say that.
        timed=job.options.stream or not update.finished,
    )
    constraint = job.options.constraint
    for delta in update.choices:
        if delta.finish_reason == "repetition":
            recorder.loop_stopped()
        if delta.finish_reason and constraint is not None:
            ending = constrained_ending(delta, job.options, grammar_ends_at_stop_tokens)
            recorder.constrained_end(constraint.kind, ending)


def constrained_ending(
    delta: ChoiceDelta, options: SamplingOptions, grammar_ends_at_stop_tokens: bool
) -> str:
    """How a constrained sequence ended, for CONSTRAINED_OUTPUTS: a stop string the client
    sent cuts the text wherever it matches, as max_tokens and the loop guard do. A stop token
    the client sent cuts it too, except where vLLM hands stop tokens to the grammar as its end
    (xgrammar's override_stop_tokens: sampled only where the text is whole, as the
    end-of-sequence is)."""
    if delta.finish_reason in ("length", "repetition"):
        return "max_tokens" if delta.finish_reason == "length" else "repetition"
    if delta.finish_reason != "stop":
        return "other"
    if isinstance(delta.stop_reason, str) and delta.stop_reason in options.stop:
        return "stop_sequence"
    if not grammar_ends_at_stop_tokens and delta.stop_reason in options.stop_token_ids:
        return "stop_sequence"
    return "complete"


def ended_in_error(job: GenerationJob) -> LoraplexError:
    """vLLM ends a request it failed with finish_reason "error" (never a client's answer). In
    vLLM 0.32, with no KV connector, a constrained request ends so when its grammar could not
    be compiled after the front end's check passed, or when its output reached a point where
    the grammar allows no token at all (a regex no text matches, `root ::= root`): the
    client's constraint, a 400 no version is blamed for (a tenant could otherwise roll any
    canary it can reach back). Anything else is the engine's failure."""
    constraint = job.options.constraint
    if constraint is not None:
        return InvalidRequest(
            "The engine could not compile this structured output constraint, or the output "
            "reached a point where it allows no token.",
            param=constraint.param,
        )
    return GenerationFailed("The engine failed while generating the response.")


def the_versions_fault(exc: BaseException) -> bool:
    """Whether a request that ended in `exc` counts as a failure of the version that served
    it: server-side errors do; a request the engine refused as invalid (400), or a
    cancellation, says nothing about the version; nor does a request that found every
    adapter slot in use (a full engine would otherwise roll healthy canaries back)."""
    if isinstance(exc, AdapterCapacityFull):
        return False
    if isinstance(exc, LoraplexError):
        return exc.status_code >= 500
    return isinstance(exc, Exception)
