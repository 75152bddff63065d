"""stas's own denoising loop (`denoise`), built from the pipeline's parts, guided by a diffusers guider."""

from stas.loop.denoising import DenoiseOutput, OwnedLoop, denoise, denoising_step
from stas.loop.guidance import GUIDANCE, make_changes, make_guider

__all__ = ["DenoiseOutput", "OwnedLoop", "denoise", "denoising_step", "GUIDANCE", "make_changes", "make_guider"]
