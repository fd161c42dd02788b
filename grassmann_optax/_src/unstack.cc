// The leaves of a stack, in one call: result i is slice i of the operand along its first axis.
//
// The fused steps stack equal small leaves into one array (grassmann_optax/_src/tuning.py) and
// hand each leaf its slice of every result back. As XLA slices, each of those is a kernel of its
// own that LLVM compiles, with its own offset: on a tree of 500 leaves, about 2,500 kernels and
// nine tenths of the compile time. This handler copies all the slices of one stack at once, for
// any element type; grassmann_optax/_src/native.py calls it through jax.ffi on CPU.

#include <cstddef>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error UnstackImpl(ffi::AnyBuffer stack, ffi::RemainingRets slices) {
  const size_t count = slices.size();
  if (count == 0) return ffi::Error::Success();
  const size_t bytes = stack.size_bytes();
  if (bytes % count != 0) {
    return ffi::Error::InvalidArgument("unstack: the operand does not split into its results");
  }
  const size_t each = bytes / count;
  const char* from = static_cast<const char*>(stack.untyped_data());
  for (size_t i = 0; i < count; ++i) {
    auto slice = slices.get<ffi::AnyBuffer>(i);
    if (slice.has_error()) return slice.error();
    if ((*slice)->size_bytes() != each) {
      return ffi::Error::InvalidArgument("unstack: a result is not one slice of the operand");
    }
    if (each != 0) std::memcpy((*slice)->untyped_data(), from + i * each, each);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrassmannUnstack, UnstackImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().RemainingRets());
