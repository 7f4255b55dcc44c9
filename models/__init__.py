"""Torch modules and their training (see ../shared/DESIGN.md).

So far: the instruction encoder, the JEPA world model's modules, its anti-collapse
regularisers and checkpoint I/O. Training, the goal model and the VLA are still to come.
"""

from .checkpoint import load_checkpoint, load_into, save_checkpoint
from .decoder import PixelDecoder, PixelDecoderConfig
from .regularizers import effective_rank, latent_std, sigreg, variance_covariance
from .text import InstructionEncoder, get_instruction_encoder
from .world_model import WorldModel, WorldModelConfig

__all__ = ["InstructionEncoder", "get_instruction_encoder", "WorldModel", "WorldModelConfig", "sigreg",
           "variance_covariance", "effective_rank", "latent_std", "save_checkpoint", "load_checkpoint",
           "load_into", "PixelDecoder", "PixelDecoderConfig"]
