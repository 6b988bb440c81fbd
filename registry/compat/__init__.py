"""The compatibility gate: inspection (I/O) into plain data, then pure checks over it."""

from registry.compat.artifact import AdapterArtifact, inspect_adapter
from registry.compat.checks import CHECKS, run_gate
from registry.compat.engine_limits import EngineLimits, safetensors_dtype
from registry.compat.fingerprint import BaseModelFingerprint, ModuleDims, fingerprint_base_model
from registry.compat.problems import Problem, ProblemCode

__all__ = [
    "CHECKS",
    "AdapterArtifact",
    "BaseModelFingerprint",
    "EngineLimits",
    "ModuleDims",
    "Problem",
    "ProblemCode",
    "fingerprint_base_model",
    "inspect_adapter",
    "run_gate",
    "safetensors_dtype",
]
