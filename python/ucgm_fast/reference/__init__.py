"""Eager PyTorch reference of every ucgm_fast op, written from the published formulas.

Same signatures as the fused ops. It is the test oracle (run in float64), the path taken by a
user-defined :class:`~ucgm_fast.Transport`, and the fallback where no compiled kernel exists.
One module per op group; everything is re-exported here.
"""
from .transport import coefficients, decode, decode_backward, interpolate, interpolate_backward

# -- objective reference (objective.py) --
from .objective import enhance_target, fd_inputs, fd_target, training_loss, ucgm_loss
# -- end objective reference --

# -- sampler reference (sampler.py) --
from . import sampler
# -- end sampler reference --
