from __future__ import annotations

import json
import subprocess
import sys

from safetensors import safe_open

from gateway.demo import DEMO_ADAPTERS, is_demo_complete


def test_demo_init_writes_base_tokenizer_and_real_peft_adapters(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "init", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert is_demo_complete(tmp_path)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["hidden_size"] >= 256 and config["head_dim"] == 64
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert 2 <= config["num_hidden_layers"] <= 4
    tokenizer_config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    template = (
        tokenizer_config.get("chat_template")
        or (tmp_path / "base" / "chat_template.jinja").read_text()
    )
    assert "add_generation_prompt" in template
    ranks = set()
    for spec in DEMO_ADAPTERS:
        folder = tmp_path / "adapters" / spec.name
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "LORA"
        assert adapter_config["r"] == spec.rank and adapter_config["lora_alpha"] == spec.alpha
        ranks.add(spec.rank)
        with safe_open(folder / "adapter_model.safetensors", "pt") as tensors:
            b_names = [n for n in tensors.keys() if "lora_B" in n]  # noqa: SIM118
            assert b_names and all(tensors.get_tensor(n).abs().sum() > 0 for n in b_names)
    assert len(ranks) >= 3


def test_demo_is_deterministic(tmp_path):
    from gateway.demo import init_demo

    first = init_demo(tmp_path / "a")
    second = init_demo(tmp_path / "b")
    for name in (first.base / "model.safetensors", first.base / "tokenizer.json"):
        rel = name.relative_to(first.root)
        assert name.read_bytes() == (second.root / rel).read_bytes()
