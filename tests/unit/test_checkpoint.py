"""Checkpoints: round trip, pruning, atomicity, and a clear error for a truncated or corrupt one."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.checkpoint import CheckpointError, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _train(model, opt, sched, steps: int = 2):
    for _ in range(steps):
        ids = torch.randint(0, 50, (2, 6))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _save(tmp_path, step, model, opt, sched, keep_last=3):
    return save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep_last=keep_last,
                           extra_state={"step": step, "version": step, "budget": {"x": 1.5}})


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched)
    path = _save(tmp_path, 2, model, opt, sched)
    after_save = (random.random(), np.random.rand(), torch.rand(1).item())

    fresh, fopt, fsched = _setup(seed=1)
    extra = load_checkpoint(path, model=fresh, optimizer=fopt, scheduler=fsched)
    assert extra == {"step": 2, "version": 2, "budget": {"x": 1.5}}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == after_save  # RNG streams continue identically
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fsched.state_dict() == sched.state_dict()
    # the optimiser continues identically: one more step on the same batch gives the same weights
    torch.manual_seed(5)
    _train(model, opt, sched, 1)
    torch.manual_seed(5)
    _train(fresh, fopt, fsched, 1)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_keep_last_and_temporaries_are_ignored(tmp_path):
    model, opt, sched = _setup()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, sched, keep_last=2)
    (tmp_path / "checkpoints" / ".tmp-step-000005-123").mkdir()  # a save killed half-way
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert find_checkpoint(tmp_path, "latest").name == "step-000004"


def test_truncated_checkpoint_names_the_file_and_the_previous_one_still_works(tmp_path):
    model, opt, sched = _setup()
    _save(tmp_path, 1, model, opt, sched)
    newest = _save(tmp_path, 2, model, opt, sched)
    weights = next((newest / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model/model.safetensors is truncated.*step-000001 is intact"):
        find_checkpoint(tmp_path, "latest")
    fresh, fopt, fsched = _setup(seed=1)
    assert load_checkpoint(tmp_path / "checkpoints" / "step-000001", model=fresh, optimizer=fopt,
                           scheduler=fsched)["step"] == 1


def test_corrupt_bytes_of_same_size_are_caught(tmp_path):
    model, opt, sched = _setup()
    path = _save(tmp_path, 1, model, opt, sched)
    f = path / "trainer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="trainer.pt is corrupt"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        find_checkpoint(tmp_path, "latest")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        find_checkpoint(tmp_path, str(tmp_path / "nope"))
