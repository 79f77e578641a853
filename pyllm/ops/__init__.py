"""The Python faces of pyllm's ops, one module per op.

Each module holds the op's argument validation (shared by every backend), its
documented public function, and the fake kernels and autograd formula that it
registers for ``pyllm::<op>`` and ``pyllm::<op>_triton`` when imported.
"""

# (in the order `pyllm info` lists them)
from pyllm.ops import rms_norm, layer_norm, attention, linear, packed_linear, rotary, paged_kv, cross_entropy  # noqa: F401,I001
