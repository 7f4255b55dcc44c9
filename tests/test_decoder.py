"""The pixel decoder (viewing only): its shapes, training through foresight-train on frozen
world-model latents, and the videos of foresight-control showing decoded imagination."""

import json
import shutil
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.common import CONFIG_DIR
from experiments.control import load_models
from experiments.train import train
from models import PixelDecoder, PixelDecoderConfig
from models.checkpoint import save_checkpoint
from models.decoder import world_model_digest
from test_control import SMALL_PLANNER
from test_entry_points import run


def test_decoder_gives_uint8_frames_and_names_a_latent_width_mismatch():
    decoder = PixelDecoder(PixelDecoderConfig(latent_dim=16, image_size=32, width=32))
    frames = decoder.decode(torch.randn(3, 16))
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"latents \[B, 16\].*got \[3, 128\].*target=decoder"):
        decoder.decode(torch.randn(3, 128))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset, tiny_checkpoints):
    """A decoder trained for a few steps on the tiny world model, and its run directory."""
    tmp = tmp_path_factory.mktemp("decoder")
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "target=decoder", f"data={tiny_dataset}", f"eval_data={tiny_dataset}",
            f"world_model={tiny_checkpoints}/world_model", f"target.out={tmp}/out", "target.steps=30",
            "target.batch=16", "target.warmup=2", "target.eval_every=30", "target.eval_frames=64",
            "target.model.width=32", "log_every=1", "threads=1"])
    return train(cfg, tmp / "run"), tmp


def test_decoder_trains_on_frozen_latents_and_loads(trained, tiny_checkpoints):
    final, tmp = trained
    losses = [m["loss"] for m in map(json.loads, (tmp / "run/metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert {"mse", "psnr", "psnr_mean_frame"} <= set(final) and final["psnr"] > 0
    decoder = PixelDecoder.load(tmp / "out")
    assert decoder.cfg.image_size == 32 and decoder.cfg.latent_dim == 16
    assert decoder.cfg.world_model == world_model_digest(tiny_checkpoints / "world_model")
    assert decoder.decode(torch.zeros(2, 16)).shape == (2, 32, 32, 3)


def test_control_videos_show_decoded_imagination_beside_the_real_frame(tmp_path, trained, tiny_checkpoints):
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    shutil.copytree(trained[1] / "out", root / "decoder")
    out = tmp_path / "run"
    run(["foresight-control", f"checkpoints={root}", "modes=[vla,vla_cem]", "families=[reach]", "episodes=1",
         "video=true", "video_size=64", "env.image_size=32", *SMALL_PLANNER, f"hydra.run.dir={out}"], tmp_path)
    width = {mode: next(iter(imageio.get_reader(out / "videos" / f"{mode}_reach.mp4", format="FFMPEG"))).shape[1]
             for mode in ("vla", "vla_cem")}
    assert width == {"vla": 64, "vla_cem": 128}  # the VLA imagines nothing: its video stays as it was


def test_a_decoder_of_another_world_model_is_left_out(tmp_path, tiny_checkpoints):
    root = tmp_path / "checkpoints"
    shutil.copytree(tiny_checkpoints, root)
    stale = PixelDecoder(PixelDecoderConfig(latent_dim=16, image_size=32, width=32, world_model="0123456789abcdef"))
    save_checkpoint(root / "decoder", {"decoder": stale}, {"kind": "decoder", "model": stale.cfg.to_dict()})
    assert load_models(root, ["vla_cem"])["decoder"] is None
    assert "decoder" not in load_models(Path(root), ["vla"])
