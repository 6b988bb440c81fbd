"""A tiny, fully local demo world: a Llama-architecture base, a BPE tokenizer and peft adapters.

No model hub is reachable at run time, so `loraplex demo init DIR` (and `make serve`) builds
everything here from fixed seeds. The base is small enough to start vLLM on two CPU cores in
seconds, yet has the shapes that matter: head_dim 64 (vLLM's CPU attention refuses 16), grouped
query attention (k/v narrower than q) and all seven Llama projections, so adapters exercise the
same code paths as on a real 8B model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

# Llama 3 style chat template: header tokens frame each role, <|eot_id|> ends a turn. Tools
# (transformers' `tools=`) go in a system turn first, as JSON; an assistant's earlier tool calls
# are written as {"name", "parameters"} objects, and a tool's answer is a "tool" turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nYou may call these functions:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{{ {'name': call['function']['name'], 'parameters': call['function']['arguments']}"
    " | tojson }}{% endfor %}"
    "{% else %}{{ message['content'] | trim }}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n"
    "{% else %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A reasoning model's markers (DeepSeek R1 and Qwen3 write them): ordinary added tokens, kept in
# detokenized text, so vLLM's reasoning parsers (LORAPLEX_REASONING_PARSER=qwen3, deepseek_r1)
# find them. As Qwen3's template does, the demo's closes an empty reasoning section in the
# prompt unless `enable_thinking` (a chat_template_kwargs key, or reasoning_effort) is true,
# when the prompt opens one for the model to fill: random weights answer at once otherwise.
THINK_TOKENS = ["<think>", "</think>"]
BASE_DIR_NAME = "base"
ADAPTERS_DIR_NAME = "adapters"


@dataclass(frozen=True)
class DemoAdapterSpec:
    """How one demo adapter is made: peft LoraConfig fields and the seed of its weights."""

    name: str
    rank: int
    alpha: int
    target_modules: list[str]
    seed: int
    use_rslora: bool = False
    # peft's per-module ranks (module name -> rank), e.g. a k_proj of lower rank than q/v
    rank_pattern: tuple[tuple[str, int], ...] = ()


# Different ranks, alphas (never alpha == r, so a forgotten alpha/r shows), module sets and one
# rsLoRA adapter (scale alpha/sqrt(r)), so the fidelity tests cover every scaling path.
DEMO_ADAPTERS: tuple[DemoAdapterSpec, ...] = (
    DemoAdapterSpec("demo-qkvo-r8", rank=8, alpha=16, target_modules=ALL_PROJECTIONS[:4], seed=11),
    DemoAdapterSpec("demo-all-r16", rank=16, alpha=8, target_modules=ALL_PROJECTIONS, seed=12),
    DemoAdapterSpec("demo-mlp-r4", rank=4, alpha=12, target_modules=ALL_PROJECTIONS[4:], seed=13),
    DemoAdapterSpec(
        "demo-qv-rs32",
        rank=32,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        seed=14,
        use_rslora=True,
    ),
)


@dataclass(frozen=True)
class DemoBaseSpec:
    """Architecture of the demo base; defaults give ~3.5M parameters."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    vocab_size: int = 2048
    seed: int = 1234
    # Larger than HF's 0.02 so logits are peaked: greedy decoding then has clear winners and
    # the fidelity comparison against HF is not decided by float rounding between near-ties.
    initializer_range: float = 0.08


@dataclass
class DemoPaths:
    root: Path
    base: Path
    adapters: dict[str, Path] = field(default_factory=dict)


def demo_paths(root: Path) -> DemoPaths:
    root = Path(root)
    adapters_dir = root / ADAPTERS_DIR_NAME
    return DemoPaths(
        root=root,
        base=root / BASE_DIR_NAME,
        adapters={spec.name: adapters_dir / spec.name for spec in DEMO_ADAPTERS},
    )


def is_demo_complete(root: Path) -> bool:
    paths = demo_paths(root)
    base_ok = (paths.base / "config.json").exists() and (paths.base / "tokenizer.json").exists()
    return base_ok and all(
        (path / "adapter_model.safetensors").exists() for path in paths.adapters.values()
    )


def _training_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Deterministic English-ish text so the BPE learns real merges without any download."""
    words = (
        "the a an of to in and or is are was were be been adapter model tenant gateway serve "
        "request token batch rank layer weight memory page cache rollout canary latency error "
        "hello world user assistant system question answer please thank you what why how when "
        "where which who this that these those it they we our your my one two three four five "
        "six seven eight nine ten data code python fast slow good bad new old first last next "
        "time day week year people work make take give find think know see look come go say "
        "write read run test build ship fix learn teach help share keep open close start stop"
    ).split()
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        corpus.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    corpus.append("0123456789 +-*/=()[]{}<>:;'\"`~@#$%^&_|\\")
    return corpus


def build_tokenizer(out_dir: Path, vocab_size: int, seed: int) -> int:
    """Train a byte-level BPE locally, save it as a HF fast tokenizer; returns its vocab size."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(seed), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    # Like Llama's tokenizer: plain encode() prepends BOS; the chat template writes its own.
    bos = SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(out_dir)
    return len(fast)


def build_base(out_dir: Path, spec: DemoBaseSpec = DemoBaseSpec()) -> None:
    """Write a random-weight Llama checkpoint (safetensors, fp32) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out_dir, spec.vocab_size, spec.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)


def build_adapter(base_dir: Path, out_dir: Path, spec: DemoAdapterSpec) -> None:
    """Write one real peft adapter with non-zero lora_B (peft's default would be a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        lora_dropout=0.0,
        bias="none",
        use_rslora=spec.use_rslora,
        rank_pattern=dict(spec.rank_pattern),
        # False keeps nn.Linear's random init for lora_B instead of zeros: the adapter then
        # really changes the outputs, which is what fidelity tests need to see.
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    # peft records the absolute base path; keep the artifact relocatable and honest.
    config_path = out_dir / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["base_model_name_or_path"] = "loraplex-demo-base"
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True))


def init_demo(root: Path, force: bool = False) -> DemoPaths:
    """Create the demo base and adapters under root; existing complete output is kept."""
    paths = demo_paths(root)
    if is_demo_complete(root) and not force:
        return paths
    build_base(paths.base)
    for spec in DEMO_ADAPTERS:
        build_adapter(paths.base, paths.adapters[spec.name], spec)
    return paths
