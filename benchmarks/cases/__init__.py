"""Benchmark cases, one module per op group.

Adding a group is adding one file here: import the ops it measures at the top (an op missing
from the installed ucgm_fast is an error; only a missing third-party package skips the group,
with the reason printed), and define ``cases(plan)`` yielding :class:`harness.case.Case` rows. Each Case builds a
:class:`harness.case.Workload` lazily: the inputs, the eager reference (``ucgm_fast.reference``),
the fused op, the float64 oracle and the bytes one call must move. The harness adds the
``torch.compile`` peer, times every peer, checks every output against the oracle and reports.

Optional peers (a Numba ``parallel=True`` CPU kernel, a CuPy ElementwiseKernel on CUDA) go in
``Workload.peers`` as ``{name: fn}``, added only where the package imports; they are timed,
checked and reported next to the others.
"""
