// The extension module grassmann_optax._src._column_gram: the CPU kernels of column_gram.cc,
// unstack.cc and adam_products.cc as XLA FFI handlers in capsules, which
// grassmann_optax/_src/native.py registers with jax.ffi.register_ffi_target; the instruction-set
// variant the kernels chose when they were loaded; and the jaxlib they were built against.
// Built at install time (CMakeLists.txt).

#include "nanobind/nanobind.h"
#include "xla/ffi/api/api.h"

namespace nb = nanobind;

// Defined in column_gram.cc, unstack.cc and adam_products.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(GrassmannColumnGram);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GrassmannUnstack);
XLA_FFI_DECLARE_HANDLER_SYMBOL(GrassmannAdamProducts);
extern "C" const char* GrassmannColumnGramVariant();

NB_MODULE(_column_gram, m) {
  m.doc() = "The CPU kernel for the per-point inner products (grassmann_optax.cpu_kernel).";
  m.def(
      "handler", [] { return nb::capsule(reinterpret_cast<void*>(GrassmannColumnGram)); },
      "The XLA FFI handler, for jax.ffi.register_ffi_target(..., platform='cpu').");
  m.def(
      "unstack_handler",
      [] { return nb::capsule(reinterpret_cast<void*>(GrassmannUnstack)); },
      "The XLA FFI handler that copies out the slices of a stack of leaves.");
  m.def(
      "adam_products_handler",
      [] { return nb::capsule(reinterpret_cast<void*>(GrassmannAdamProducts)); },
      "The XLA FFI handler of Adam's moments and the inner products of an AdamH step.");
  m.def(
      "variant", [] { return GrassmannColumnGramVariant(); },
      "The instruction-set variant of the kernel's loops: 'avx2' or 'baseline'.");
  m.attr("build_jaxlib") = GRASSMANN_OPTAX_BUILD_JAXLIB;
}
