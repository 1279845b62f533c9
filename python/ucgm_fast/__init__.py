"""ucgm_fast: fused C++/CUDA kernels for UCGM (Unified Continuous Generative Models).

One framework that trains and samples diffusion / flow-matching models (many steps) and
consistency models (1-2 steps). See ``ucgm_fast.reference`` for the eager PyTorch oracle.
"""
from . import reference
from ._kernels import build_info
from .ops import coefficients, decode, interpolate
from .transports import TRANSPORTS, Transport, get_transport

__version__ = "0.1.0"

__all__ = ["TRANSPORTS", "Transport", "get_transport", "build_info", "coefficients", "interpolate", "decode",
           "reference"]

# -- objective (objective.py, ops/objective.py) --
from .objective import UCGM
from .ops import enhance_target, fd_inputs, fd_target, ucgm_loss
__all__ += ["UCGM", "enhance_target", "fd_inputs", "fd_target", "ucgm_loss"]
# -- end objective --

# -- sampler (sampler.py, ops/sampler.py) --
from .ops import sampler_correct, sampler_noise, sampler_step
from .sampler import clear_graph_cache, sample
__all__ += ["sample", "sampler_step", "sampler_correct", "sampler_noise", "clear_graph_cache"]
# -- end sampler --

# -- models, training, data, evaluation (models/, train.py, data.py, metrics.py) --
from . import data, metrics, models
from .data import DATASETS, ImageDataset, InfiniteLoader, get_dataset
from .metrics import (class_accuracy, evaluate_samples, frechet_distance, frechet_floor, inception_fid, kernel_mmd,
                      load_or_train_classifier, memorisation_check, nearest_neighbour_distance)
from .models import DiT, DiT_models, get_model

__all__ += ["models", "data", "metrics", "DiT", "DiT_models", "get_model", "DATASETS", "ImageDataset",
            "InfiniteLoader", "get_dataset", "frechet_distance", "frechet_floor", "kernel_mmd", "class_accuracy",
            "nearest_neighbour_distance", "memorisation_check", "evaluate_samples", "load_or_train_classifier",
            "inception_fid"]
# -- end models --
