"""Model families. Mixer is the one this project trains."""

from pipeline.models.mixer import VARIANTS, MixerSpec, MlpMixer, count_params

__all__ = ["VARIANTS", "MixerSpec", "MlpMixer", "count_params"]
