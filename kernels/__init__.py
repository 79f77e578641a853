"""pyllm's Triton kernels, installed as ``pyllm.kernels``.

One module per kernel family. Importing a module registers its launchers as
the ``pyllm::<op>_triton`` implementations for the CUDA dispatch key (and the
CPU key when ``TRITON_INTERPRET=1``, for running them on CPU tensors in the
Triton interpreter). pyllm imports them itself when Triton can run.
"""

from pyllm.kernels import attention, cross_entropy, linear, norm, paged_kv, rotary  # noqa: F401
