"""Checkpoints that resume a run exactly, survive being killed at any moment, and say clearly when they are broken.

Layout: `output_dir/checkpoints/step-000042/` holds the model (safetensors; only the adapter with LoRA), the
optimiser and scheduler states, the RNG states, `state.json` (step, policy version, budget state, ledger, eval
history) and `manifest.json` (size and sha256 of every file). A checkpoint is written to a temporary directory and
renamed into place, so a checkpoint under its final name is always complete; `latest` resolves to the newest one
whose manifest verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated or corrupt. The message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, extra_state: dict, keep_last: int,
                    value_head: torch.nn.Module | None = None) -> Path:
    """Write `root/checkpoints/step-{step:06d}` atomically and keep only the newest `keep_last` checkpoints."""
    base = Path(root) / "checkpoints"
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"step-{step:06d}"
    tmp = base / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "value_head": value_head.state_dict() if value_head is not None else None}, tmp / "trainer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(extra_state))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed into place) under root/checkpoints, oldest first."""
    base = Path(root) / "checkpoints"
    return sorted(p for p in base.glob("step-*") if p.is_dir()) if base.is_dir() else []


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or corrupt file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing (not a complete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt") from None
    for name, entry in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated ({f.stat().st_size} of {entry['size']} bytes)")
        if _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (checksum mismatch)")


def find_checkpoint(root: Path, resume_from: str) -> Path:
    """`latest` -> the newest complete checkpoint under root; anything else is a checkpoint directory.

    A broken newest checkpoint is an error, not silently skipped: the message names the broken file and the
    previous checkpoint that verifies, so the user decides (`train.resume_from=<that path>`)."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"train.resume_from: {resume_from!r} is not a checkpoint directory")
        verify_checkpoint(path)
        return path
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"train.resume_from=latest: no checkpoint under {Path(root) / 'checkpoints'}")
    try:
        verify_checkpoint(found[-1])
    except CheckpointError as e:
        intact = next((p for p in reversed(found[:-1]) if _verifies(p)), None)
        hint = f"; the previous checkpoint {intact} is intact: resume with train.resume_from={intact}" if intact else ""
        raise CheckpointError(f"{e}{hint}") from None
    return found[-1]


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def load_checkpoint(path: Path, *, model, optimizer, scheduler, value_head: torch.nn.Module | None = None) -> dict:
    """Restore weights, optimiser, scheduler and RNG states in place; return the saved extra state."""
    path = Path(path)
    verify_checkpoint(path)
    from safetensors.torch import load_file

    weights = {}
    for f in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(f))
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, weights)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # tied weights are saved once; anything else missing means a checkpoint of another model
        missing = [k for k in missing if k not in _tied_keys(model)]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path}: weights do not match the model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    if value_head is not None:
        value_head.load_state_dict(trainer["value_head"])
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied if isinstance(tied, list | tuple | set) else tied.keys())
