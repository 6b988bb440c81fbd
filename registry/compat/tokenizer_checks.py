"""The gate's tokenizer check: an adapter that ships a tokenizer (or names one) must fit the
served base's, since generation always uses the base's (vocabulary, ids, special tokens and
the roles that decide where text starts and stops)."""

from __future__ import annotations

from registry.compat.artifact import AdapterArtifact
from registry.compat.engine_limits import EngineLimits
from registry.compat.fingerprint import BaseModelFingerprint
from registry.compat.problems import Problem, ProblemCode, listed, shortened

# Roles that steer generation: the served base's tokenizer decides where text starts and stops,
# so an adapter trained with other ones stops in the wrong place (or never).
GENERATION_ROLES = ("bos_token", "eos_token")


def check_tokenizer(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    problems: list[Problem] = []
    claimed = a.declared_tokenizer_sha256
    if claimed is not None and claimed.lower() != base.tokenizer_sha256:
        problems.append(
            Problem(
                ProblemCode.TOKENIZER_MISMATCH,
                f"the adapter expects tokenizer {claimed[:16]}… but the served base's is "
                f"{base.tokenizer_sha256[:16]}…",
            )
        )
    if a.tokenizer_error is not None:
        problems.append(
            Problem(
                ProblemCode.TOKENIZER_MISMATCH,
                f"the shipped tokenizer is unreadable: {a.tokenizer_error}",
            )
        )
    if a.tokenizer is None:
        return problems
    vocab = a.tokenizer.vocab
    missing = [t for t in vocab if t not in base.vocab]
    missing_special = [t for t in a.tokenizer.special_tokens if t not in base.vocab]
    if missing or missing_special:
        problems.append(
            Problem(
                ProblemCode.TOKENS_MISSING,
                f"the adapter's tokenizer needs {len({*missing, *missing_special})} token(s) the "
                f"base lacks: {listed([*missing, *missing_special])}",
            )
        )
    moved = [t for t, i in vocab.items() if t in base.vocab and base.vocab[t] != i]
    if moved:
        problems.append(
            Problem(
                ProblemCode.TOKENIZER_MISMATCH,
                f"{len(moved)} token(s) have different ids than in the base: {listed(moved)}",
            )
        )
    for role, token in sorted(a.tokenizer.roles.items()):
        served = base.roles.get(role)
        if served is None and role not in GENERATION_ROLES:
            continue  # a pad/unk/… the base lacks: needs only exist (checked above)
        if token != served:
            problems.append(
                Problem(
                    ProblemCode.TOKENIZER_MISMATCH,
                    f"{role} is {shortened(repr(token))} in the adapter's tokenizer but "
                    + (shortened(repr(served)) if served is not None else "not set")
                    + " in the served base's; generation uses the base's",
                )
            )
    return problems
