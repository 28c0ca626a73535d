"""Checkpoints: round trip, pruning, atomicity, and a clear error for a truncated or corrupt one."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from marginal_rl.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from marginal_rl.train.config import ModelConfig
from marginal_rl.train.lora import apply_lora
from marginal_rl.train.store import StorageError
from marginal_rl.train.value import ValueHead


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


def _save(tmp_path, step, model, opt, sched, keep_last=3, **kw):
    return save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep_last=keep_last,
                           extra_state={"step": step, "version": step, "budget": {"x": 1.5}}, **kw)


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


def test_latest_skips_a_truncated_checkpoint_naming_the_file_and_resumes_the_previous_one(tmp_path):
    model, opt, sched = _setup()
    _save(tmp_path, 1, model, opt, sched)
    newest = _save(tmp_path, 2, model, opt, sched)
    weights = next((newest / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"skipping 1 broken.*model/model.safetensors is truncated.*step-000001"):
        found = find_checkpoint(tmp_path, "latest")
    assert found.name == "step-000001"
    fresh, fopt, fsched = _setup(seed=1)
    assert load_checkpoint(found, model=fresh, optimizer=fopt, scheduler=fsched)["step"] == 1
    with pytest.raises(CheckpointError, match="model/model.safetensors is truncated"):  # named, it is an error
        find_checkpoint(tmp_path, str(newest))


MANIFEST_SHAPES = {
    "empty object": b"{}", "list": b"[]", "binary": bytes(range(256)) * 4, "number": b"42", "empty file": b"",
    "entry not an object": b'{"trainer.pt": 5}', "entry without sha256": b'{"trainer.pt": {"size": 1}}',
    "required files absent": b'{"extra.bin": {"size": 0, "sha256": "e3b0"}}',
}


@pytest.mark.parametrize("shape", list(MANIFEST_SHAPES))
def test_every_corrupt_manifest_shape_fails_verification_and_latest_falls_back(tmp_path, shape):
    model, opt, sched = _setup()
    _save(tmp_path, 1, model, opt, sched)
    newest = _save(tmp_path, 2, model, opt, sched)
    (newest / "manifest.json").write_bytes(MANIFEST_SHAPES[shape])
    with pytest.raises(CheckpointError, match=r"step-000002: manifest.json is corrupt"):
        load_checkpoint(newest, model=model, optimizer=opt, scheduler=sched)
    with pytest.warns(UserWarning, match="manifest.json is corrupt"):
        assert find_checkpoint(tmp_path, "latest").name == "step-000001"


def test_a_manifest_naming_files_outside_the_checkpoint_is_corrupt(tmp_path):
    model, opt, sched = _setup()
    path = _save(tmp_path, 1, model, opt, sched)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["../../etc/passwd"] = {"size": 1, "sha256": "00"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="names a file outside it"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)


def test_no_intact_checkpoint_is_an_error_naming_each_broken_one(tmp_path):
    model, opt, sched = _setup()
    for step in (1, 2):
        (_save(tmp_path, step, model, opt, sched) / "manifest.json").write_bytes(b"[]")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*step-000002.*step-000001"):
        find_checkpoint(tmp_path, "latest")


def test_a_failed_save_removes_its_temporary_directory_and_names_the_directory(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    _save(tmp_path, 1, model, opt, sched)

    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1234 vs 1200")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096))
    with pytest.raises(StorageError, match=r"checkpoint step-000002: could not write under .*checkpoints "
                                            r"\(no space left on the device"):
        _save(tmp_path, 2, model, opt, sched)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]


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


def test_optimizer_half_written_is_named(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched)
    path = _save(tmp_path, 1, model, opt, sched)
    f = path / "trainer.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="trainer.pt is truncated"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)


def test_missing_file_is_named(tmp_path):
    model, opt, sched = _setup()
    path = _save(tmp_path, 1, model, opt, sched)
    (path / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match="rng.pt is missing"):
        find_checkpoint(tmp_path, str(path))


def test_each_rank_restores_its_own_rng(tmp_path):
    model, opt, sched = _setup()
    torch.manual_seed(10)
    rank0 = capture_rng_state()
    torch.manual_seed(11)
    rank1 = capture_rng_state()
    expected_rank1 = torch.rand(3)  # the stream rank 1 continues with
    path = _save(tmp_path, 1, model, opt, sched, rng_states=[rank0, rank1])
    torch.manual_seed(99)
    load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, rank=1)
    assert torch.equal(torch.rand(3), expected_rank1)
    with pytest.warns(UserWarning, match="holds the RNG states of 2 rank"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched, rank=2)


def test_saving_after_resuming_from_an_earlier_checkpoint_drops_the_abandoned_later_ones(tmp_path):
    model, opt, sched = _setup()
    for step in (2, 4, 6):
        _save(tmp_path, step, model, opt, sched, keep_last=5)
    # resumed from step-000002: the next save is step 3; step-4 and step-6 belong to the abandoned timeline
    _save(tmp_path, 3, model, opt, sched, keep_last=5)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    _save(tmp_path, 3, model, opt, sched, keep_last=5)  # re-saving the same step replaces it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_steps_sort_numerically_past_six_digits(tmp_path):
    model, opt, sched = _setup()
    for step in (999_999, 1_000_000):
        _save(tmp_path, step, model, opt, sched)
    assert find_checkpoint(tmp_path, "latest").name == "step-1000000"


def test_non_json_extra_state_fails_before_writing(tmp_path):
    model, opt, sched = _setup()
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, keep_last=2,
                        extra_state={"x": np.int64(3)})
    assert list_checkpoints(tmp_path) == []


def test_value_head_round_trip_and_mismatch(tmp_path):
    model, _, _ = _setup()
    head = ValueHead(32)
    torch.nn.init.normal_(head.proj.weight)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = _save(tmp_path, 1, model, opt, sched, value_head=head)
    fresh_model, _, _ = _setup(seed=1)
    fresh = ValueHead(32)
    fopt = torch.optim.AdamW([*fresh_model.parameters(), *fresh.parameters()], lr=1e-2)
    fsched = torch.optim.lr_scheduler.LambdaLR(fopt, lambda s: 1.0)
    load_checkpoint(path, model=fresh_model, optimizer=fopt, scheduler=fsched, value_head=fresh)
    assert torch.equal(fresh.proj.weight, head.proj.weight)
    with pytest.raises(CheckpointError, match="value head"):
        load_checkpoint(path, model=fresh_model, optimizer=fopt, scheduler=fsched)


def test_lora_checkpoint_holds_only_the_adapter_and_restores_it(tmp_path):
    cfg = ModelConfig(lora_r=4, lora_alpha=8)
    base, _, _ = _setup()
    model = apply_lora(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _train(model, opt, sched, 2)  # lora_B starts at 0: two steps make the adapter non-trivial
    path = _save(tmp_path, 2, model, opt, sched)
    saved = {p.name for p in (path / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved and "model.safetensors" not in saved
    fresh_base, _, _ = _setup()  # the same base weights (seed 0), fresh adapter
    fresh = apply_lora(fresh_base, cfg)
    fopt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    fsched = torch.optim.lr_scheduler.LambdaLR(fopt, lambda s: 1.0)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
        load_checkpoint(path, model=fresh, optimizer=fopt, scheduler=fsched)
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    plain, popt, psched = _setup()
    with pytest.raises(CheckpointError, match="holds a LoRA adapter but the model is not a LoRA model"):
        load_checkpoint(path, model=plain, optimizer=popt, scheduler=psched)
