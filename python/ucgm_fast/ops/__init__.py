"""The fused ops, one module per op group, each registered as torch.library custom ops in the
``ucgm_fast`` namespace (fake + CPU/CUDA kernels + autograd) with a validating public function."""
from .transport import coefficients, decode, interpolate

# -- objective ops (objective.py) --
from .objective import enhance_target, fd_inputs, fd_target, ucgm_loss
# -- end objective ops --

# -- sampler ops (sampler.py) --
from .sampler import sampler_correct, sampler_noise, sampler_step
# -- end sampler ops --
