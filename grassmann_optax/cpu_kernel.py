"""The optional CPU kernel for the six per-point inner products of a fused SGD-G/Adam-G step.

Every step of :func:`grassmann_optax.sgdg` and :func:`grassmann_optax.adamg` needs, per point of
each manifold leaf, ``wᵀw, wᵀg, gᵀg, wᵀb, gᵀb, bᵀb`` ((F1) of ``docs/algorithm.md``; Cho & Lee,
"Riemannian approach to batch normalization", NeurIPS 2017, arXiv:1709.09603). XLA:CPU computes
them as six reductions that read the arrays nine times; on CPU a C++ kernel reads each once.

The kernel is compiled when the package is installed, where a C++ compiler is found; it is never
compiled at import or trace. Installed without it (no compiler, or
``GRASSMANN_OPTAX_BUILD_CPU_KERNEL=0`` at install), the library computes the same products with
XLA, slower on CPU, and a CPU process warns once. ``GRASSMANN_OPTAX_CPU_KERNEL=0`` turns the
kernel off at run time, without a warning; :func:`disabled` does so for the functions traced
inside it. GPU and TPU processes always use XLA. ``docs/kernel.md`` has the details.

- :func:`available`: whether the kernel is installed and switched on.
- :func:`variant`: its instruction-set variant (``'avx2'`` or ``'baseline'``), or ``None``.
- :func:`disabled`: a context manager that traces with XLA's reductions instead.
- :func:`column_products`: the six products of any layout of points, by the kernel where it can.
"""

from grassmann_optax._src.native import available, column_products, disabled, variant

__all__ = ('available', 'column_products', 'disabled', 'variant')
