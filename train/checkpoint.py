"""Checkpoints that resume a run exactly, survive being killed at any moment, and say clearly when they are broken.

Layout: `output_dir/checkpoints/step-000042/` holds
- `model/`: the unwrapped model's `save_pretrained` (safetensors; with LoRA only the adapter),
- `trainer.pt`: optimiser, scheduler and value-head state dicts,
- `rng.pt`: the RNG states (python, numpy, torch CPU, CUDA) of every rank,
- `snapshot.safetensors` (stale rollouts only): the trainable weights of the rollout snapshot, which lags the model,
- `state.json`: the caller's extra state (step, policy version, budget state, ledger, eval history),
- `manifest.json`: size and sha256 of every other file.

A checkpoint is written to a hidden temporary directory, synced to disk and renamed into place, so a directory
under its final name is always complete. `latest` resolves to the newest checkpoint that verifies (a broken one is
skipped with a warning naming the broken file); a save that fails (a full disk) removes its temporary directory and
says which directory it could not write. Everything is loaded with `torch.load(weights_only=True)`: a checkpoint cannot run code.

Supported with one process or DDP (every rank holds full weights and optimiser state). Under FSDP or DeepSpeed
ZeRO the weights and optimiser state are sharded; this module does not gather them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from marginal_rl.train.store import storage_error

MANIFEST = "manifest.json"
SNAPSHOT = "snapshot.safetensors"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated, corrupt or for another model. The message names the file."""


# ------------------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts (tensors, ints, lists)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------ save


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    # The rename is atomic only for what reached the disk: without this a power loss can leave a renamed directory
    # whose files are empty. (A killed process is covered by the rename alone; the OS still writes its buffers.)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int:
    """step-000042 -> 42."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint directory name (expected step-NNNNNN)")
    return int(m.group(1))


def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, extra_state: dict, keep_last: int,
                    value_head: torch.nn.Module | None = None, rng_states: list[dict] | None = None,
                    snapshot: torch.nn.Module | None = None) -> Path:
    """Write `root/checkpoints/step-{step:06d}` atomically; return its path.

    model: the UNWRAPPED model (accelerator.unwrap_model); a peft model saves only its adapter.
    extra_state: plain JSON (checked first, so a non-JSON value fails before anything is written).
    rng_states: one `capture_rng_state()` per rank, in rank order (gather them from every rank); default: this
    process's only, which is exact for a single process.
    snapshot: the rollout snapshot of stale rollouts (a lagging copy of `model`); its weights that `model` trains
    are saved, so a resumed run samples from the same lagging weights.
    Afterwards keeps the newest `keep_last` checkpoints up to `step` and deletes any checkpoint AFTER `step`: those
    belong to a timeline abandoned by resuming from an earlier checkpoint, and would be inconsistent with the stores.
    """
    state_json = json.dumps(extra_state)
    base = Path(root) / "checkpoints"
    base.mkdir(parents=True, exist_ok=True)
    for leftover in [*base.glob(".tmp-step-*"), *base.glob(".old-step-*")]:  # from a save killed half-way
        shutil.rmtree(leftover, ignore_errors=True)
    final = base / f"step-{step:06d}"
    tmp = base / f".tmp-step-{step:06d}-{os.getpid()}"
    try:
        _write(tmp, final, base, model=model, optimizer=optimizer, scheduler=scheduler, value_head=value_head,
               rng_states=rng_states, snapshot=snapshot, state_json=state_json)
    except (OSError, RuntimeError) as e:  # a full disk: torch says "unexpected pos", safetensors and json other words
        error = storage_error(f"checkpoint {final.name}", base, e)
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from e
    done = list_checkpoints(root)
    later = [p for p in done if checkpoint_step(p) > step]
    for old in later + [p for p in done if checkpoint_step(p) <= step][:-keep_last]:
        shutil.rmtree(old)
    return final


def _write(tmp: Path, final: Path, base: Path, *, model, optimizer, scheduler, value_head, rng_states, snapshot,
           state_json: str) -> None:
    """Every file into `tmp`, synced, then renamed to `final` (an existing `final` is moved aside first)."""
    tmp.mkdir()
    model.save_pretrained(tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "value_head": value_head.state_dict() if value_head is not None else None}, tmp / "trainer.pt")
    torch.save({"ranks": rng_states if rng_states is not None else [capture_rng_state()]}, tmp / "rng.pt")
    if snapshot is not None:
        from safetensors.torch import save_file

        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        save_file({n: p.detach().cpu().clone().contiguous() for n, p in snapshot.named_parameters() if n in trained},
                  tmp / SNAPSHOT)
    (tmp / "state.json").write_text(state_json)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in [*files, tmp / MANIFEST, *(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
        _fsync(p)
    if final.exists():  # re-saving a step after a resume: move the old one aside so the name is never half-written
        aside = base / f".old-{final.name}-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, final)
    _fsync(base)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoints renamed into place under root/checkpoints, oldest first (temporaries are hidden: `.tmp-...`)."""
    base = Path(root) / "checkpoints"
    if not base.is_dir():
        return []
    return sorted((p for p in base.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)), key=checkpoint_step)


# ------------------------------------------------------------------------------------------------------ load


REQUIRED = ("trainer.pt", "rng.pt", "state.json")  # besides model/*.safetensors


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the first missing, truncated or corrupt file. A manifest of any other shape than
    save_checkpoint's (empty, a list, binary garbage, entries without size or sha256, required files absent) is
    corrupt too."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is missing (not a complete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt (not valid JSON)") from None
    if not isinstance(manifest, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in manifest.values()):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt (expected an object of files, each with a "
                              f"size and a sha256)")
    absent = [f for f in REQUIRED if f not in manifest]
    if absent or not any(name.startswith("model/") and name.endswith(".safetensors") for name in manifest):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt (it lists no "
                              f"{', '.join(absent) or 'model/*.safetensors'})")
    for name, entry in manifest.items():
        f = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt (names a file outside it: {name!r})")
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} is truncated or changed "
                                  f"({f.stat().st_size} bytes, expected {entry['size']})")
        if _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (sha256 does not match the manifest)")


def read_state(path: Path) -> dict:
    """The caller's extra state of a verified checkpoint (state.json)."""
    state = json.loads((Path(path) / "state.json").read_text())
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: state.json is corrupt (expected a JSON object)")
    return state


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def find_checkpoint(root: Path, resume_from: str) -> Path:
    """`latest` -> the newest checkpoint under root that verifies; anything else is a checkpoint directory, verified.

    A broken newest checkpoint (a save killed by a full disk, a corrupted file) is skipped with a warning that names
    the broken file: the run resumes from the previous intact one, rewrites the stores from there and deletes the
    broken one at its next save. A named checkpoint that is broken is an error."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise CheckpointError(f"train.resume_from: {resume_from!r} is not a checkpoint directory")
        verify_checkpoint(path)
        return path
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"train.resume_from=latest: no checkpoint under {Path(root) / 'checkpoints'}")
    broken = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            broken.append(str(e))
            continue
        if broken:
            warnings.warn(f"train.resume_from=latest: skipping {len(broken)} broken checkpoint(s) ({'; '.join(broken)}); "
                          f"resuming from {path}", stacklevel=2)
        return path
    raise CheckpointError(f"train.resume_from=latest: no intact checkpoint under {Path(root) / 'checkpoints'} "
                          f"({'; '.join(broken)})")


def _load_weights(path: Path, model) -> None:
    from safetensors.torch import load_file

    files = sorted((path / "model").glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path}: no model/*.safetensors")
    weights = {k: v for f in files for k, v in load_file(f).items()}
    is_peft = hasattr(model, "peft_config")
    saved_adapter = (path / "model" / "adapter_config.json").is_file()
    if is_peft != saved_adapter:
        raise CheckpointError(f"checkpoint {path}: holds {'a LoRA adapter' if saved_adapter else 'full weights'} but "
                              f"the model is {'a LoRA model' if is_peft else 'not a LoRA model'} (model.lora_r)")
    try:
        if is_peft:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, weights)
            missing, unexpected = [k for k in result.missing_keys if "lora_" in k], result.unexpected_keys
        else:
            missing, unexpected = model.load_state_dict(weights, strict=False)
            missing = [k for k in missing if k not in _tied_keys(model)]  # tied weights are saved once
    except RuntimeError as e:  # size mismatch: a checkpoint of another architecture or LoRA rank
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model ({str(e).splitlines()[-1].strip()})") \
            from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _tied_keys(model) -> set[str]:
    tied = model._tied_weights_keys or []  # transformers 5: {target: source}; 4.x: [target, ...]
    return set(tied if isinstance(tied, list | tuple | set) else tied.keys())


def load_checkpoint(path: Path, *, model, optimizer, scheduler, value_head: torch.nn.Module | None = None,
                    rank: int = 0) -> dict:
    """Verify the manifest, restore weights, optimiser, scheduler, value head and this rank's RNG states in place,
    and return the saved extra state. Call before `accelerator.prepare`, on every rank."""
    path = Path(path)
    verify_checkpoint(path)
    _load_weights(path, model)
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    if (value_head is None) != (trainer["value_head"] is None):
        raise CheckpointError(f"checkpoint {path}: {'has no' if value_head is not None else 'has a'} value head, "
                              f"the run {'needs one' if value_head is not None else 'has none'} (algo.name)")
    if value_head is not None:
        value_head.load_state_dict(trainer["value_head"])
    ranks = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)["ranks"]
    if rank < len(ranks):
        restore_rng_state(ranks[rank])
    else:
        warnings.warn(f"checkpoint {path} holds the RNG states of {len(ranks)} rank(s); rank {rank} keeps its seeded "
                      f"RNG, so this resumed run does not reproduce an uninterrupted one sample for sample",
                      stacklevel=2)
    return read_state(path)


def load_snapshot(path: Path, snapshot: torch.nn.Module) -> bool:
    """Restore the rollout snapshot's weights saved with a checkpoint (already verified by `load_checkpoint`).
    False when the checkpoint has none (its run was on-policy): the caller then starts the snapshot afresh."""
    from safetensors.torch import load_file

    file = Path(path) / SNAPSHOT
    if not file.is_file():
        return False
    params = dict(snapshot.named_parameters())
    saved = load_file(file)
    if not set(saved) <= set(params):
        raise CheckpointError(f"checkpoint {path}: {SNAPSHOT} does not fit the model "
                              f"(unexpected {sorted(set(saved) - set(params))[:3]})")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    return True
