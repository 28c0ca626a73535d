"""A serving engine behind the rollouts: a vLLM server process (rollout/vllm_server.py, in its own venv) and the
client the rollouts sample through. `generator.sample` hands an engine its prompts instead of calling `generate`, so
single-turn tasks and multi-turn agent episodes run through the server unchanged and produce the same Trajectory
records; the engine reports the behaviour logprobs of the sampling distribution.

    engine = VLLMEngine.start(python=".venv-vllm/bin/python", model="runs/x/vllm/policy", log=Path("vllm.log"))
    engine.update_weights("runs/x/vllm/weights", version=3)   # after an update: vLLM's own in-place reload
    engine.close()
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from marginal_rl.rollout.errors import RolloutError

SERVER = Path(__file__).with_name("vllm_server.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMEngine:
    """The client of one vLLM server, and the server's process when this engine started it. `version`: the policy
    version whose weights the server holds."""

    def __init__(self, url: str, process: subprocess.Popen | None = None, log: Path | None = None,
                 request_timeout_s: float = 3600.0):
        self.url, self.process, self.log, self.version = url.rstrip("/"), process, log, 0
        self.request_timeout_s = request_timeout_s

    @classmethod
    def start(cls, python: str, model: str, log: Path, *, port: int = 0, dtype: str = "float32",
              kv_cache_gb: int = 1, gpu_memory_utilization: float = 0.3, startup_timeout_s: float = 600.0,
              seed: int = 0, eager: bool = True) -> VLLMEngine:
        """Start a server on `model` with the interpreter `python` and wait until it answers /health."""
        if not Path(python).is_file():
            raise RolloutError(f"rollout.vllm_python: {python!r} does not exist; install vLLM into its own venv "
                               f"(docs/scaling.md, 'Generation on vLLM') or attach a running server with "
                               f"rollout.vllm_url")
        port = port or _free_port()
        cmd = [python, "-P", str(SERVER), "--model", model, "--port", str(port), "--dtype", dtype, "--seed", str(seed),
               "--gpu-memory-utilization", str(gpu_memory_utilization), "--parent-pid", str(os.getpid()),
               *([] if eager else ["--no-enforce-eager"])]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb)}
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            # its own process group: closing the engine can then stop vLLM's EngineCore and workers too, which
            # outlive a server that was killed
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        engine = cls(f"http://127.0.0.1:{port}", process, log)
        deadline = time.time() + startup_timeout_s
        while time.time() < deadline:
            if process.poll() is not None:
                raise RolloutError(f"the vLLM server exited with status {process.returncode} while starting; "
                                   f"its log: {log}{engine._log_tail()}")
            try:
                engine.health()
                return engine
            except RolloutError:
                time.sleep(1.0)
        engine.close()
        raise RolloutError(f"the vLLM server did not answer within {startup_timeout_s:.0f} s "
                           f"(rollout.vllm_startup_timeout_s); its log: {log}{engine._log_tail()}")

    def _log_tail(self, lines: int = 5) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        tail = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()][-lines:]
        return "".join(f"\n  | {line}" for line in tail)

    def _request(self, endpoint: str, body: dict | None = None, timeout: float | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{endpoint}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # the server answered with an error of its own
            where = f"; its log: {self.log}{self._log_tail()}" if self.log else ""
            raise RolloutError(f"the vLLM server at {self.url} failed {endpoint}: "
                               f"{json.loads(e.read() or b'{}').get('error', e.reason)}{where}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            gone = self.process is not None and self.process.poll() is not None
            why = f"exited with status {self.process.returncode}" if gone else f"did not answer ({e})"
            where = f"; its log: {self.log}{self._log_tail()}" if self.log else ""
            raise RolloutError(f"the vLLM server at {self.url} {why} during {endpoint}{where}") from None

    def health(self) -> dict:
        return self._request("/health", timeout=5.0)

    def sample(self, prompt_ids: Sequence[list[int]], max_new_tokens: int, temperature: float, top_p: float,
               eos_id: int) -> list[tuple[list[int], list[float], str]]:
        """One completion per prompt: (token ids up to and including EOS, their logprobs under the sampling
        distribution, "eos" | "length"), drawn from the server's generator (seeded with the run's seed)."""
        if temperature <= 0:
            raise RolloutError("the vLLM backend samples training rollouts (temperature > 0); greedy eval runs on "
                               "the trainer's weights")
        out = self._request("/generate", {"prompt_ids": [list(p) for p in prompt_ids], "max_tokens": max_new_tokens,
                                          "temperature": temperature, "top_p": top_p})["samples"]
        return [(s["ids"], s["logprobs"], "eos" if s["ids"] and s["ids"][-1] == eos_id else "length") for s in out]

    def update_weights(self, path: str, version: int) -> dict:
        """Reload the server's weights in place from the safetensors under `path`; the server now holds `version`."""
        reply = self._request("/update_weights", {"path": path, "version": version})
        self.version = version
        return reply

    def close(self) -> None:
        """Stop the server this engine started, with every process of its group (an attached one keeps running)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self._request("/shutdown", {}, timeout=10.0)
                self.process.wait(timeout=30)
            except (RolloutError, subprocess.TimeoutExpired):
                pass
        try:  # whatever is left of the group: a killed server leaves vLLM's EngineCore and workers behind
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
