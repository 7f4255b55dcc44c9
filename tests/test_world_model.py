"""World-model modules: shapes, AdaLN-zero start, language switch, and no leakage from the future."""

import pytest
import torch

from models.world_model import WorldModel, WorldModelConfig


def make(**kw):
    torch.manual_seed(0)
    return WorldModel(WorldModelConfig(**kw)).eval()


def batch(b=3, t=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (b, t, 1, 64, 64, 3), generator=g, dtype=torch.uint8)
    return pixels, torch.randn(b, t, 4, generator=g)


def test_encode_and_rollout_shapes():
    wm = make()
    pixels, state = batch()
    z = wm.encode(pixels, state)
    assert z.shape == (3, 2, 128)
    chunks = torch.randn(3, 4, 8, 2)
    assert wm.rollout(z, chunks, torch.randn(1, 384)).shape == (3, 4, 128)


def test_untrained_predictor_is_the_identity_thanks_to_adaln_zero():
    wm = make()
    z = torch.randn(5, 2, 128)
    chunks = torch.randn(5, 3, 8, 2)
    out = wm.rollout(z, chunks, torch.randn(5, 384))
    # Every block's gate starts at zero, so only the output head moves the latent.
    p = wm.predictor
    x = p.inp(torch.cat([z.flatten(1), chunks[:, 0].flatten(1)], 1))
    torch.testing.assert_close(out[:, 0], z[:, -1] + p.out(torch.nn.functional.layer_norm(x, x.shape[-1:])))


def test_language_switch_changes_the_prediction_only_when_on():
    for use_language, should_differ in ((True, True), (False, False)):
        wm = make(use_language=use_language)
        torch.nn.init.normal_(wm.predictor.modulation.weight, std=0.1)  # give the modulation some weight
        z, chunks = torch.randn(4, 2, 128), torch.randn(4, 2, 8, 2)
        a = wm.rollout(z, chunks, torch.randn(1, 384))
        b = wm.rollout(z, chunks, torch.randn(1, 384))
        assert (not torch.allclose(a, b)) == should_differ


def test_one_instruction_folded_into_the_weights_predicts_what_the_batched_path_does():
    wm = make(blocks=2)
    torch.nn.init.normal_(wm.predictor.modulation.weight, std=0.1)  # non-zero shift, scale and gate
    torch.nn.init.normal_(wm.predictor.modulation.bias, std=0.1)
    z, chunks, lang = torch.randn(6, 2, 128), torch.rand(6, 4, 8, 2) * 2 - 1, torch.randn(1, 384)
    folded = wm.rollout(z, chunks, lang)  # one instruction: the folded path
    batched = wm.rollout(z, chunks, lang.expand(6, -1))  # per-row conditioning: Predictor.step
    assert not torch.allclose(batched, wm.rollout(z, chunks, torch.randn(6, 384)))
    torch.testing.assert_close(folded, batched, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one instruction"):
        wm.predictor.for_instruction(lang.expand(2, -1))


def test_prediction_for_step_one_ignores_later_actions_and_frames():
    wm = make()
    torch.nn.init.normal_(wm.predictor.modulation.weight, std=0.1)
    pixels, state = batch(t=2)
    z = wm.encode(pixels, state)
    chunks = torch.randn(3, 4, 8, 2)
    changed = chunks.clone()
    changed[:, 1:] += 5.0  # later chunks differ
    lang = torch.randn(1, 384)
    torch.testing.assert_close(wm.rollout(z, chunks, lang)[:, 0], wm.rollout(z, changed, lang)[:, 0])
    # Encoding is per frame: changing a later frame leaves earlier latents alone.
    pixels2 = pixels.clone()
    pixels2[:, 1] = 255 - pixels2[:, 1]
    torch.testing.assert_close(wm.encode(pixels2, state)[:, 0], z[:, 0])


def test_vit_encoder_option():
    wm = make(encoder="vit")
    pixels, state = batch(b=2, t=1)
    assert wm.encode(pixels, state).shape == (2, 1, 128)


def test_state_is_standardised_by_state_scale_and_bad_settings_are_refused():
    pixels, state = batch()
    plain, scaled = make(grid=8), make(grid=8, state_scale=[2.0, 2.0, 4.0, 4.0])
    scale = torch.tensor([2.0, 2.0, 4.0, 4.0])
    assert torch.allclose(scaled.encode(pixels, state * scale), plain.encode(pixels, state), atol=1e-5)
    assert not torch.allclose(scaled.encode(pixels, state), plain.encode(pixels, state), atol=1e-3)
    with pytest.raises(ValueError, match="state_scale has 2 entries"):
        make(state_scale=[1.0, 1.0])
    with pytest.raises(ValueError, match="grid must be 4 or 8"):
        make(grid=6)


def test_keypoint_latent_puts_where_a_blob_is_into_the_latent():
    wm = make(grid=8, keypoint_latent=True)
    enc = wm.encoder
    with torch.no_grad():  # stem channel 0 sees red; keypoint 0 attends sharply to it
        enc.stem[0].weight.zero_()
        enc.stem[0].bias.zero_()
        enc.stem[0].weight[0, 0] = 1.0 / 16
        enc.keypoint_maps.weight.zero_()
        enc.keypoint_maps.weight[0, 0] = 50.0
    side = torch.linspace(-1, 1, 16)
    for row, col in ((2, 5), (11, 9)):
        pixels = torch.zeros(1, 1, 1, 64, 64, 3, dtype=torch.uint8)
        pixels[..., 4 * row:4 * row + 4, 4 * col:4 * col + 4, 0] = 255
        z = wm.encode(pixels, torch.zeros(1, 1, 4))[0, 0]
        assert z.shape == (128,)
        # Entries 0 and 1 are keypoint 0's (x, y) through the initial scale 2 and shift 0.
        torch.testing.assert_close(z[:2] / 2, torch.stack([side[col], side[row]]), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="latent_dim must exceed 64"):
        make(keypoint_latent=True, latent_dim=64)
