"""Benchmark assets: the demo base model and up to thousands of real PEFT adapters, cached on disk.

Making each adapter with peft costs a model load (seconds). Instead peft makes ONE template
adapter per rank (`LoraConfig(init_lora_weights=False)` + `save_pretrained`, through
`gateway.demo.build_adapter`), and every other adapter of that rank is the template's
`adapter_config.json` plus a safetensors file with the same tensor names, shapes and dtype,
filled with seeded normal values of the template tensor's own standard deviation. The results
are ordinary PEFT folders that peft, vLLM and loraplex all load.

Layout under the data dir (git-ignored; reused while its manifest matches):

    base/                       the demo base (gateway.demo.build_base)
    templates/r{rank}/          the peft-made adapter for each rank
    adapters/lora-0000 ...      derived adapters; index = Zipf popularity rank
    sets/n{count}/              symlinks to the first `count` adapters (one LORAPLEX_ADAPTER_DIR)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.demo import ALL_PROJECTIONS, DemoAdapterSpec, build_adapter, build_base

logger = logging.getLogger(__name__)

ASSET_VERSION = 1
BASE_MODEL_NAME = "bench-base"
ADAPTER_PREFIX = "lora-"
# Mixed ranks 4-32, each with its own module set, as a tenant population would have.
RANK_TARGETS: dict[int, list[str]] = {
    4: ALL_PROJECTIONS[4:],  # MLP only
    8: ALL_PROJECTIONS[:4],  # attention q, k, v, o
    16: ALL_PROJECTIONS,  # everything
    32: ["q_proj", "v_proj"],
}
RANKS = tuple(RANK_TARGETS)
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class Assets:
    root: Path
    base: Path
    adapter_names: tuple[str, ...]  # popularity order: index 0 is the most requested
    adapter_ranks: dict[str, int]

    def adapter_path(self, name: str) -> Path:
        return self.root / "adapters" / name

    def adapter_set(self, count: int) -> Path:
        """A folder holding exactly the first `count` adapters (symlinks), for loraplex."""
        if count > len(self.adapter_names):
            raise ValueError(f"only {len(self.adapter_names)} adapters generated, asked {count}")
        folder = self.root / "sets" / f"n{count:04d}"
        marker = folder / ".complete"
        if marker.exists():
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in self.adapter_names[:count]:
            (folder / name).symlink_to(self.adapter_path(name).resolve(), target_is_directory=True)
        marker.touch()
        return folder


def adapter_name(index: int) -> str:
    return f"{ADAPTER_PREFIX}{index:04d}"


def rank_of(index: int, seed: int) -> int:
    """Deterministic, popularity-independent rank of adapter `index`."""
    return RANKS[int(np.random.default_rng([seed, index]).integers(len(RANKS)))]


def prepare_assets(root: Path, count: int, seed: int = 0) -> Assets:
    """Build (or reuse) the base and `count` adapters under root; returns where they are."""
    root = Path(root)
    base = root / "base"
    if not (base / "config.json").exists() or not (base / "tokenizer.json").exists():
        logger.info("building the demo base model in %s", base)
        build_base(base)
    templates = {rank: _template(root, base, rank) for rank in RANKS}
    manifest_path = root / "adapters" / "manifest.json"
    manifest = _read_manifest(manifest_path)
    if manifest.get("version") != ASSET_VERSION or manifest.get("seed") != seed:
        shutil.rmtree(root / "adapters", ignore_errors=True)
        shutil.rmtree(root / "sets", ignore_errors=True)
        manifest = {"version": ASSET_VERSION, "seed": seed, "count": 0}
    have = int(manifest["count"])
    if have < count:
        logger.info("deriving adapters %d..%d from the peft templates", have, count - 1)
        template_tensors = {rank: _load_template(path) for rank, path in templates.items()}
        for index in range(have, count):
            rank = rank_of(index, seed)
            _derive(
                templates[rank],
                template_tensors[rank],
                root / "adapters" / adapter_name(index),
                seed=seed * 1_000_003 + index,
            )
        manifest["count"] = count
        manifest_path.write_text(json.dumps(manifest))
    names = tuple(adapter_name(i) for i in range(count))
    return Assets(
        root=root,
        base=base,
        adapter_names=names,
        adapter_ranks={name: rank_of(i, seed) for i, name in enumerate(names)},
    )


def _read_manifest(path: Path) -> dict[str, int]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _template(root: Path, base: Path, rank: int) -> Path:
    folder = root / "templates" / f"r{rank}"
    if not (folder / WEIGHTS_FILE).exists():
        logger.info("making the rank-%d template adapter with peft", rank)
        spec = DemoAdapterSpec(
            name=f"template-r{rank}",
            rank=rank,
            alpha=2 * rank,
            target_modules=RANK_TARGETS[rank],
            seed=1000 + rank,
        )
        build_adapter(base, folder, spec)
        config_path = folder / CONFIG_FILE
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = BASE_MODEL_NAME
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def _load_template(folder: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, float]]:
    """Names, shapes, dtypes and standard deviations of the template's tensors."""
    from safetensors.numpy import load_file

    return {
        name: (tuple(array.shape), array.dtype, float(array.std()))
        for name, array in load_file(folder / WEIGHTS_FILE).items()
    }


def _derive(
    template: Path,
    tensors: dict[str, tuple[tuple[int, ...], np.dtype, float]],
    out: Path,
    seed: int,
) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    weights = {
        name: (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)
        for name, (shape, dtype, std) in sorted(tensors.items())
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    shutil.copyfile(template / CONFIG_FILE, tmp / CONFIG_FILE)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
