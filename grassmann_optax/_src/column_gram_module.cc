// The extension module grassmann_optax._src._column_gram: the CPU kernel of column_gram.cc as an
// XLA FFI handler in a capsule, which grassmann_optax/_src/native.py registers with
// jax.ffi.register_ffi_target, and the instruction-set variant the kernel chose when it was
// loaded. Built at install time (CMakeLists.txt).

#include "nanobind/nanobind.h"
#include "xla/ffi/api/api.h"

namespace nb = nanobind;

// Defined in column_gram.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(GrassmannColumnGram);
extern "C" const char* GrassmannColumnGramVariant();

NB_MODULE(_column_gram, m) {
  m.doc() = "The CPU kernel for the per-point inner products (grassmann_optax.cpu_kernel).";
  m.def(
      "handler", [] { return nb::capsule(reinterpret_cast<void*>(GrassmannColumnGram)); },
      "The XLA FFI handler, for jax.ffi.register_ffi_target(..., platform='cpu').");
  m.def(
      "variant", [] { return GrassmannColumnGramVariant(); },
      "The instruction-set variant of the kernel's loops: 'avx2' or 'baseline'.");
}
