"""Gate checks on what the tensors hold: their dtypes, and values the engine can represent.

Pure like the rest of the gate: each reads the AdapterArtifact's per-tensor dtypes, NaN/Inf
findings and largest magnitudes that `inspect_adapter` recorded, plus the engine's limits.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from registry.compat.artifact import AdapterArtifact
from registry.compat.engine_limits import EngineLimits
from registry.compat.fingerprint import BaseModelFingerprint
from registry.compat.lora_keys import parse_lora_key
from registry.compat.problems import Problem, ProblemCode, listed

# The largest finite value of each dtype an engine can hold LoRA weights in.
FINITE_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38}


def check_dtypes(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    counts = Counter(t.dtype for t in a.tensors)
    bad = {dtype: n for dtype, n in counts.items() if dtype not in limits.supported_dtypes}
    supported = ", ".join(sorted(limits.supported_dtypes))
    problems = [
        Problem(ProblemCode.DTYPE_UNSUPPORTED, f"{n} tensor(s) are {dtype}; supported: {supported}")
        for dtype, n in sorted(bad.items())
    ]
    if not bad and len(counts) > 1:
        problems.append(
            Problem(ProblemCode.DTYPE_UNSUPPORTED, f"mixed dtypes {listed(counts)}: save one dtype")
        )
    return problems


def check_finite(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    if not a.nonfinite_tensors:
        return []
    return [
        Problem(
            ProblemCode.NON_FINITE,
            f"{len(a.nonfinite_tensors)} tensor(s) contain NaN or Inf: "
            f"{listed(a.nonfinite_tensors)}",
        )
    ]


def _rounded(value: float, dtype: str) -> float:
    """`value` as the engine holds it in `dtype` (round to nearest even, inf past the range),
    the way torch casts; without torch, so the registry need not import it."""
    with np.errstate(over="ignore"):
        if dtype == "F16":
            return float(np.float16(value))
        single = np.float32(value)
    if dtype == "BF16":  # keep the upper 16 bits of the fp32 pattern, rounded to nearest even
        bits = int(np.array(single).view(np.uint32))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return float(np.array(bits, dtype=np.uint32).view(np.float32))
    return float(single)


def _as_served(largest: float, dtype: str, scale: float) -> float:
    """What vLLM makes of a tensor's largest magnitude: cast to the engine's dtype, then, for
    lora_B, `lora_b *= scale` (fp32 math, rounded to the dtype again). Both steps are monotonic,
    so the largest input gives the largest output and the tensor's max is all the gate needs."""
    value = _rounded(largest, dtype)
    if scale != 1.0:
        with np.errstate(over="ignore"):
            value = _rounded(float(np.float32(value) * np.float32(scale)), dtype)
    return value


def check_value_range(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    """vLLM casts A and B to the engine's dtype and then multiplies B by the scale in that
    dtype: a value past the dtype's range becomes inf there, and every output of the adapter
    with it. An fp32 adapter served in fp16 is the usual case, but an fp16 B with a scale above
    1 can overflow too, and a B that fits can round up past the range before it is scaled.
    The check replays both roundings on each tensor's largest value, so it refuses exactly what
    would overflow (values within half an ulp of the maximum round down to it and pass)."""
    dtype = limits.dtype
    if dtype not in FINITE_MAX or not a.tensor_max_abs:
        return []
    scale = a.scale or 1.0  # an invalid rank or alpha is refused by check_peft_config
    beyond: dict[str, float] = {}
    for name, largest in a.tensor_max_abs.items():
        key = parse_lora_key(name)
        if key is None:
            continue  # reported by check_tensors
        tensor_scale = scale if key.ab == "B" else 1.0
        if not math.isfinite(_as_served(largest, dtype, tensor_scale)):
            beyond[name] = largest * tensor_scale
    if not beyond:
        return []
    worst = max(beyond, key=beyond.__getitem__)
    scaled = f" (lora_B times its scale of {scale:g})" if scale != 1.0 else ""
    return [
        Problem(
            ProblemCode.VALUE_OUT_OF_RANGE,
            f"{len(beyond)} tensor(s) exceed the engine's {dtype} range (±{FINITE_MAX[dtype]:g}) "
            f"once cast{scaled}, so they would serve as inf: {listed(beyond)}; largest "
            f"{beyond[worst]:.6g} in {worst}",
        )
    ]


def check_vanishing(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    """The other end of the range: a tensor whose largest magnitude rounds to zero in the
    engine's dtype (after the scale, for lora_B) is all zeros there, since the casts are
    monotonic, so the module it adapts serves as the base. Exact, like check_value_range: it
    refuses only tensors that vanish completely, never ones that merely lose small values;
    all-zero tensors as saved (an untrained lora_B) are not the engine's doing and pass."""
    dtype = limits.dtype
    if dtype not in FINITE_MAX or not a.tensor_max_abs:
        return []
    scale = a.scale or 1.0
    vanished: dict[str, float] = {}
    for name, largest in a.tensor_max_abs.items():
        key = parse_lora_key(name)
        if key is None or largest == 0.0:
            continue
        if _as_served(largest, dtype, scale if key.ab == "B" else 1.0) == 0.0:
            vanished[name] = largest
    if not vanished:
        return []
    worst = max(vanished, key=vanished.__getitem__)
    return [
        Problem(
            ProblemCode.VALUE_OUT_OF_RANGE,
            f"{len(vanished)} tensor(s) round to all zeros in the engine's {dtype}, so the "
            f"modules they adapt would serve unchanged: {listed(vanished)}; largest "
            f"magnitude {vanished[worst]:.6g} in {worst}",
        )
    ]
