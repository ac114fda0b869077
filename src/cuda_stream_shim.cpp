// The one piece of C++ in the library (src/cuda_stream.rs): libtorch's current CUDA
// stream asked for through the function pointers found by dlsym, with libtorch's C++
// exceptions caught here, where C++ can catch them, instead of unwinding into Rust (which
// would abort the process). getCurrentCUDAStream throws when libtorch's first use of its
// streams cannot start CUDA on the device (a device held by another process in exclusive
// mode, no memory for a context), and for a device index it does not know.
#include <cstdint>

namespace {
// c10::cuda::CUDAStream's layout (tests/c/test_c10_stream_abi.cpp checks it against
// libtorch's header): returned by value in two registers.
struct C10Stream {
  int8_t device_type;
  int8_t device_index;
  int64_t id;
};
}  // namespace

// 0 and the stream's handle in *out; 1 when libtorch threw (nothing in *out).
extern "C" int perturbations_shim_current_stream(C10Stream (*current)(int8_t),
                                                 void *(*handle)(const C10Stream *),
                                                 int8_t index, void **out) noexcept {
  try {
    const C10Stream stream = current(index);
    *out = handle(&stream);
    return 0;
  } catch (...) {
    return 1;
  }
}
