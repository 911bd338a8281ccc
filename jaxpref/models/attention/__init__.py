"""Attention behind one interface: ``attend(q, k, v, mask_spec, backend)``.

* :mod:`.mask` -- :class:`MaskSpec`, a description of the mask (segments, positions, causal,
  sliding window, soft-cap); no dense ``[B, 1, T, S]`` array outside the ``xla`` backend.
* :mod:`.xla` -- dense reference math (short sequences, decoding, the test oracle).
* :mod:`.blocked` -- pure-JAX flash attention (online softmax, recomputing ``custom_vjp``).
* :mod:`.select` -- ``model.attention`` (``auto | xla | blocked | cudnn | splash | pallas_gpu``)
  resolved per platform and mask.
"""

from jaxpref.models.attention.mask import MaskSpec, soft_cap
from jaxpref.models.attention.select import BACKENDS, attend, check_backend, resolve

__all__ = ["BACKENDS", "MaskSpec", "attend", "check_backend", "resolve", "soft_cap"]
