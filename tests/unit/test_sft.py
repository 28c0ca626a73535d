"""The warm-start stage (train/sft.py): demonstrations, their token layout and loss mask, the held-out check, the
config; and (slow) the whole stage on a tiny chat model through TRL's SFTTrainer."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from marginal_rl.rollout.agent import TurnFormat
from marginal_rl.rollout.fix_test import FixTask, generate_fix_tasks, to_prompt
from marginal_rl.rollout.fix_test_task import FixTestTaskSet
from marginal_rl.train.config import ConfigError, DemoConfig, ModelConfig, WarmStartConfig, load_config
from marginal_rl.train.model import build_tiny_model, build_tokenizer
from marginal_rl.train.sft import (
    DEMONSTRATIONS_FILE,
    bug_note,
    carry_demonstrations,
    check_demonstrations,
    demonstration_turns,
    episode_tokens,
    play,
    strip_docstrings,
    task_fingerprint,
)

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="demonstrations run in the Linux sandbox")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)
TASK = FixTask(
    task_id="HumanEval/7/cmp-0-0", family="humaneval-cmp", difficulty="humaneval", entry_point="pick",
    buggy_source='def helper(x):\n    return x\n\ndef pick(xs):\n    """Keep the positives."""\n    return [x for x in xs if x < 0]\n',
    test_source="assert pick([1, -1]) == [1]\n",
    reference_source='def helper(x):\n    return x\n\ndef pick(xs):\n    """Keep the positives."""\n    return [x for x in xs if x > 0]\n',
)


def test_strip_docstrings_keeps_the_code_and_an_empty_body_valid() -> None:
    assert strip_docstrings(TASK.reference_source) == "def helper(x):\n    return x\n\ndef pick(xs):\n    return [x for x in xs if x > 0]\n"
    assert strip_docstrings('def f():\n    """only a docstring"""\n') == "def f():\n    pass\n"


def test_bug_note_names_the_first_differing_line() -> None:
    assert bug_note(TASK) == "The bug is `return [x for x in xs if x < 0]`: it should be `return [x for x in xs if x > 0]`."


def test_demonstration_turns_follow_the_mix() -> None:
    cfg = DemoConfig(verify_share=1.0, wrong_first=0.0)
    turns = demonstration_turns(TASK, random.Random(0), cfg)
    assert [t.split(">")[0] + ">" for t in turns] == ["<plan>", "<edit>", "<run_tests/>", "<submit/>"]
    assert '"""' not in turns[1] and "x > 0" in turns[1]
    wrong = demonstration_turns(TASK, random.Random(0), DemoConfig(verify_share=0.0, wrong_first=1.0, plan=False))
    assert wrong[0] == f"<edit>\n{strip_docstrings(TASK.buggy_source).rstrip()}\n</edit>"
    assert wrong[1:] == ["<run_tests/>", f"<edit>\n{strip_docstrings(TASK.reference_source).rstrip()}\n</edit>",
                         "<submit/>"]
    shares = [len(demonstration_turns(TASK, random.Random(k), DemoConfig())) for k in range(2000)]
    # plan + edit + submit (3), + run_tests (4), + wrong first edit and its test run (5, 6): 0.4 / 0.4 / 0.1 / 0.1
    assert abs(shares.count(3) / 2000 - 0.4) < 0.04 and abs(shares.count(6) / 2000 - 0.1) < 0.03


@pytest.fixture(scope="module")
def chat_tokenizer():
    texts = [TASK.buggy_source, TASK.reference_source, "<plan> <edit> <run_tests/> <submit/> user assistant ok"] * 10
    tokenizer = build_tokenizer(texts, vocab_size=320)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_episode_tokens_put_the_loss_on_the_policy_turns_only(chat_tokenizer) -> None:
    """By hand on one episode: the labelled tokens are exactly the turns, each closed by EOS; everything else (the
    prompt, the observations and the template around them) is -100, and the ids are those the agent loop builds."""
    fmt = TurnFormat(chat_tokenizer)
    turns, observations = ["<plan>flip it</plan>", "<edit>\ndef pick(xs):\n    return xs\n</edit>", "<submit/>"], \
        ["ok", "edit applied (2 lines)", "submitted: tests pass"]
    ids, labels = episode_tokens(fmt, "Fix it.", turns, observations)
    assert len(ids) == len(labels)
    eos = chat_tokenizer.eos_token
    assert chat_tokenizer.decode([x for x in labels if x != -100]) == eos.join(turns) + eos
    expected = fmt.prompt_ids("Fix it.")
    for k, turn in enumerate(turns):
        expected += chat_tokenizer(turn, add_special_tokens=False)["input_ids"] + [fmt.eos_id]
        if k < 2:
            expected += fmt.observation_ids(observations[k], turn_closed=True)
    assert ids == expected
    masked = chat_tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab == -100])
    assert "ok" in masked and "edit applied (2 lines)" in masked and "Fix it." in masked
    assert "submitted" not in chat_tokenizer.decode(ids)  # the final observation conditions no turn


def _fix_test_set(tasks: list[FixTask]) -> FixTestTaskSet:
    return FixTestTaskSet(train=[], eval=[to_prompt(t) for t in tasks], reward=lambda *a: [], demonstrations=list, key={},
                          tasks={t.task_id: t for t in tasks})


def test_an_eval_split_that_was_demonstrated_is_refused(tmp_path) -> None:
    generated = generate_fix_tasks(4, seed=0)
    record = {"demonstrations": {"demonstrated": [task_fingerprint(generated[0])],
                                 "demonstrated_problems": ["HumanEval/7"]}}
    (tmp_path / DEMONSTRATIONS_FILE).write_text(json.dumps(record))
    check_demonstrations(str(tmp_path), _fix_test_set(generated[1:]))  # disjoint: fine
    with pytest.raises(ConfigError, match="1 of the 2 eval tasks were demonstrated.*fix-"):
        check_demonstrations(str(tmp_path), _fix_test_set(generated[:2]))
    with pytest.raises(ConfigError, match="HumanEval/7"):  # another mutant of a demonstrated problem
        check_demonstrations(str(tmp_path), _fix_test_set([TASK]))
    check_demonstrations(str(tmp_path / "nothing-here"), _fix_test_set(generated))  # no record: nothing to check
    final = tmp_path / "rl-run" / "final"  # a policy RL trained from the warmed model carries the record along
    final.mkdir(parents=True)
    carry_demonstrations(str(tmp_path), final)
    with pytest.raises(ConfigError, match="were demonstrated"):
        check_demonstrations(str(final), _fix_test_set(generated[:1]))


def test_warm_start_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="demos.wrong_first"):
        load_config([], ["demos.wrong_first=2"], WarmStartConfig)
    with pytest.raises(ConfigError, match="unknown key 'train.epochs'"):
        load_config([], ["train.epochs=3"], WarmStartConfig)
    with pytest.raises(ConfigError, match="demos.holdout: no such config file: nope.yaml"):
        load_config([], ["demos.holdout=[nope.yaml]"], WarmStartConfig)
    with pytest.raises(ConfigError, match="model.path: the warm start needs a chat model"):
        load_config([], ["model.path=tiny"], WarmStartConfig)


@needs_linux
def test_demonstrations_replay_in_the_real_environment() -> None:
    task = generate_fix_tasks(1, seed=3)[0]
    turns = demonstration_turns(task, random.Random(1), DemoConfig(verify_share=1.0, wrong_first=1.0))
    user, observations, solved = play(task, "generated", turns)
    assert solved and observations[1].startswith("FAIL") and observations[-2] == "PASS: all tests passed"
    assert user.startswith("Fix the code so the tests pass.")


@pytest.mark.slow
@needs_linux
def test_warm_start_on_a_tiny_chat_model_lowers_the_loss_and_loads(tmp_path, monkeypatch) -> None:
    """The whole stage through TRL's SFTTrainer on a tiny chat model built offline: the loss falls, the saved model
    loads as model.path, its record lists what was demonstrated, the held-out eval split is not in it, and TRL's
    batches carry our labels, so the observation tokens are out of the loss (the loss is the mean over the turns)."""
    from marginal_rl.train.model import load_policy
    from marginal_rl.train.sft import build_demonstrations, sft_trainer, warm_start

    tasks = generate_fix_tasks(40, seed=0)
    tokenizer = build_tokenizer([t.buggy_source + t.reference_source + t.test_source for t in tasks]
                                + ["<plan>The bug is `x`: it should be `y`.</plan> <edit> </edit> <run_tests/> "
                                   "<submit/> user assistant ok edit applied PASS: all tests passed FAIL"] * 20,
                                vocab_size=400)
    tokenizer.chat_template = CHAT_TEMPLATE
    base = tmp_path / "tiny-chat"
    build_tiny_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=4), tokenizer, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rl_config = tmp_path / "rl.yaml"
    rl_config.write_text(f"model: {{path: {base}}}\ntask: {{name: fix_test, num_train: 8, num_eval: 8}}\n")
    cfg = load_config([], [f"model.path={base}", f"output_dir={tmp_path / 'warm'}", "demos.generated=24",
                           "demos.humaneval=0", f"demos.holdout=[{rl_config}]", "train.max_steps=24",
                           "train.lr=3e-3", "train.batch_size=4", "train.warmup_ratio=0"], WarmStartConfig)

    model, tok = load_policy(str(base))
    rows, _ = build_demonstrations(cfg, tok, log=lambda *_: None)
    trainer = sft_trainer(cfg, model, tok, rows)
    assert trainer.train_dataset[0]["labels"] == rows[0]["labels"]
    batch = next(iter(trainer.get_train_dataloader()))
    first = [r for r in rows if r["input_ids"] == batch["input_ids"][0][: len(r["input_ids"])].tolist()][0]
    n = len(first["labels"])
    assert batch["labels"][0][:n].tolist() == first["labels"] and (batch["labels"][0][n:] == -100).all()
    with torch.no_grad():  # the loss by hand: mean next-token cross-entropy over the labelled (turn) tokens only
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift, target = logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
        manual = torch.nn.functional.cross_entropy(shift[target != -100], target[target != -100])
        hf = trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert torch.allclose(manual, hf, atol=1e-5)

    target_dir = warm_start(cfg, log=lambda *_: None)
    record = json.loads((target_dir / DEMONSTRATIONS_FILE).read_text())
    losses = record["train"]["losses"]
    assert len(losses) == 24 and losses[-1] < 0.7 * losses[0], losses
    warmed, warmed_tok = load_policy(str(target_dir))
    assert warmed_tok.chat_template == CHAT_TEMPLATE and warmed.config.vocab_size == model.config.vocab_size
    held = load_config([str(rl_config)])
    from marginal_rl.rollout.build import build_task

    rl_task = build_task(held.task, held.rollout)
    check_demonstrations(str(target_dir), rl_task)  # the held-out split passes the trainer's check
    assert not {task_fingerprint(rl_task.tasks[p.prompt_id]) for p in rl_task.eval} & set(
        record["demonstrations"]["demonstrated"])
    assert record["demonstrations"]["held_out"]["tasks"] == 8
    with pytest.raises(ConfigError, match="exists"):
        warm_start(cfg, log=lambda *_: None)
    assert Path(target_dir / "config.json").is_file()

    # LoRA: adapters train, are merged on save, and the result is a plain model with the base's weights' names
    lora_cfg = load_config([], [f"model.path={base}", f"output_dir={tmp_path / 'lora'}", "demos.generated=24",
                                "demos.humaneval=0", "train.max_steps=6", "train.lr=3e-3", "train.batch_size=4",
                                "model.lora_r=4", "model.lora_target_modules=[q_proj,v_proj]"], WarmStartConfig)
    merged, _ = load_policy(str(warm_start(lora_cfg, log=lambda *_: None)))
    assert merged.state_dict().keys() == model.state_dict().keys()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, load_policy(str(base))[0].state_dict()[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_eval_report_clusters_samples_by_prompt_by_hand() -> None:
    """Three prompts, two samples each: per-prompt pass rates 1, 0.5, 0 -> mean 0.5, SE = sd(1, .5, 0)/sqrt(3)."""
    from marginal_rl.cli import eval_report
    from marginal_rl.rollout.types import Trajectory

    def episode(prompt: str, family: str, passed: bool, verified: bool) -> Trajectory:
        return Trajectory(traj_id=f"{prompt}-{passed}-{verified}", prompt_id=prompt, group_id=prompt, step=-1,
                          behavior_version=0, prompt_ids=[1], completion_ids=[2, 3, 4], completion_mask=[1, 0, 1],
                          behavior_logprobs=[0.0] * 3, reward=float(passed) - 0.01 * 2, finish_reason="submit",
                          family=family, actions=["edit", "run_tests", "submit"] if verified else ["edit", "submit"],
                          tokens_verify=1 if verified else 0)

    episodes = [episode("a", "op", True, True), episode("a", "op", True, False), episode("b", "op", True, True),
                episode("b", "op", False, False), episode("c", "cmp", False, True), episode("c", "cmp", False, False)]
    r = json.loads(json.dumps(eval_report(episodes, step_cost=0.01)))  # what `marginal-rl eval --out` writes
    assert r["pass_rate"] == 0.5 and r["pass_rate_se"] == pytest.approx(0.5 / 3**0.5, abs=1e-4)
    assert r["pass_rate_by_family"] == {"cmp": 0.0, "op": 0.75} and r["prompts_by_family"] == {"cmp": 1, "op": 2}
    assert (r["prompts_never_solved"], r["prompts_sometimes_solved"], r["prompts_always_solved"]) == (1, 1, 1)
    assert r["verified_share"] == 0.5 and r["pass_rate_when_verified"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["mean_verification_tokens"] == 0.5 and r["mean_policy_tokens"] == 2.0
