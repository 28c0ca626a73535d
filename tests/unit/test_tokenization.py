"""Dataset prompts are tokenised as TRL's GRPOTrainer tokenises them (its own `_tokenize_prompts`, called here)."""

from __future__ import annotations

import json

import pytest
from tokenizers import processors

from marginal_rl.rollout.config import DatasetTaskConfig, RolloutConfig
from marginal_rl.rollout.dataset_task import build_dataset
from marginal_rl.rollout.generator import sample
from marginal_rl.train.config import ModelConfig
from marginal_rl.train.model import build_tiny_model, build_tokenizer

trl = pytest.importorskip("trl")


def _bos_tokenizer(chat_template: str | None):
    tok = build_tokenizer(["What is 1 + 2? user: assistant: hello"] * 20, vocab_size=300)
    bos = tok.convert_tokens_to_ids("<|bos|>")
    # a tokenizer that adds a BOS token by default, as Llama's and many others do
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[
        ("<|bos|>", bos)])
    tok.chat_template = chat_template
    return tok


def _trl_ids(tokenizer, prompts: list) -> list[list[int]]:
    class Stub:  # the attributes GRPOTrainer._tokenize_prompts reads, as a text-only trainer has them
        processing_class, _is_vlm, environment_factories, tools, chat_template = tokenizer, False, None, None, None
        chat_template_kwargs = {}

    return [list(ids) for ids in trl.GRPOTrainer._tokenize_prompts(Stub(), prompts)[0]]


@pytest.mark.parametrize("chat", [False, True])
def test_dataset_prompt_ids_equal_trl(tmp_path, chat, monkeypatch):
    template = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    tokenizer = _bos_tokenizer(template if chat else None)
    questions = [f"What is {i} + 2?" for i in range(6)]
    prompts = [[{"role": "user", "content": q}] for q in questions] if chat else questions
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": "x"}) for p in prompts))
    (tmp_path / "rw.py").write_text("def one(completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = build_dataset(DatasetTaskConfig(dataset=str(path), eval_dataset=str(path), reward_funcs=["rw.one"]),
                         RolloutConfig())
    model = build_tiny_model(ModelConfig(hidden_size=32, num_heads=2), tokenizer, seed=0).eval()
    seen = []
    monkeypatch.setattr("marginal_rl.rollout.dataset_task.sample",
                        lambda m, tok, ids, *a, **k: seen.extend(ids) or sample(m, tok, ids, *a, **k))
    task.rollout(model, tokenizer, [(p, 1) for p in task.train], RolloutConfig(max_new_tokens=2), step=0, version=0,
                 temperature=1.0)
    assert seen == _trl_ids(tokenizer, prompts)
    assert all(ids[0] == tokenizer.convert_tokens_to_ids("<|bos|>") for ids in seen)  # one BOS, not zero or two
    assert not any(ids[1] == ids[0] for ids in seen)
