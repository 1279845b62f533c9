"""Denoiser networks: a DiT (adaLN-Zero) with TiT options and a registry of its configs."""
from .dit import DiT, DiT_models, MODEL_OPTIONS, TIT_OPTIONS, get_model, resolve_model_name

__all__ = ["DiT", "DiT_models", "MODEL_OPTIONS", "TIT_OPTIONS", "get_model", "resolve_model_name"]
