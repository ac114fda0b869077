// The library calls libtorch's current-stream functions by their symbols with a C layout
// of their types (src/cuda_stream.rs): this program holds libtorch's own declarations to
// that layout, and checks that the symbol names the library looks up are those functions.
// It needs libtorch's CUDA headers (and the CUDA runtime's), but no GPU: nothing is called.
#include <c10/cuda/CUDAStream.h>

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

namespace {

// src/cuda_stream.rs's C10Stream: { int8 device_type; int8 device_index; int64 id; }
struct C10Stream {
  int8_t device_type;
  int8_t device_index;
  int64_t id;
};

// the names src/cuda_stream.rs looks up (CURRENT_STREAM_SYMBOL, STREAM_HANDLE_SYMBOL)
constexpr const char *kCurrent = "_ZN3c104cuda20getCurrentCUDAStreamEa";
constexpr const char *kHandle = "_ZNK3c104cuda10CUDAStream6streamEv";

using c10::cuda::CUDAStream;

// returned by value in two registers, as a C struct of 16 bytes: trivially copyable and
// destructible (no hidden return pointer), with the C struct's size, alignment and fields
static_assert(std::is_trivially_copyable<CUDAStream>::value, "CUDAStream is trivially copyable");
static_assert(std::is_trivially_destructible<CUDAStream>::value, "CUDAStream is trivially destructible");
static_assert(sizeof(CUDAStream) == sizeof(C10Stream), "CUDAStream is 16 bytes");
static_assert(alignof(CUDAStream) == alignof(C10Stream), "CUDAStream is aligned as int64");
static_assert(sizeof(c10::Stream) == sizeof(CUDAStream), "CUDAStream is a c10::Stream");
static_assert(sizeof(c10::Device) == 2 && sizeof(c10::DeviceType) == 1 && sizeof(c10::DeviceIndex) == 1,
              "c10::Device is two int8");
static_assert(std::is_same<c10::DeviceIndex, int8_t>::value, "DeviceIndex is int8 (mangled 'a')");
static_assert(sizeof(c10::StreamId) == 8, "StreamId is int64");
static_assert(offsetof(C10Stream, id) == 8, "the id in the second word");
// the signatures the library calls them with
static_assert(std::is_same<decltype(&c10::cuda::getCurrentCUDAStream), CUDAStream (*)(c10::DeviceIndex)>::value,
              "getCurrentCUDAStream(DeviceIndex) -> CUDAStream");
static_assert(std::is_same<decltype(&CUDAStream::stream), cudaStream_t (CUDAStream::*)() const>::value,
              "CUDAStream::stream() const -> cudaStream_t");

int failures = 0;

void expect(bool ok, const char *what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    failures++;
  }
}

}  // namespace

int main() {
  // a CUDAStream's bytes as the C struct reads them
  CUDAStream s(CUDAStream::UNCHECKED, c10::Stream(c10::Stream::UNSAFE, c10::Device(c10::DeviceType::CUDA, 3), 0x1234567890));
  C10Stream c;
  std::memcpy(&c, &s, sizeof c);
  expect(c.device_type == static_cast<int8_t>(c10::DeviceType::CUDA), "the device type in the first byte");
  expect(c.device_index == 3, "the device index in the second byte");
  expect(c.id == 0x1234567890, "the stream id in the second word");

  // the names are the functions this program links (libc10_cuda.so)
  void *current = dlsym(RTLD_DEFAULT, kCurrent);
  void *handle = dlsym(RTLD_DEFAULT, kHandle);
  expect(current != nullptr, kCurrent);
  expect(handle != nullptr, kHandle);
  expect(current == reinterpret_cast<void *>(&c10::cuda::getCurrentCUDAStream),
         "the first name is c10::cuda::getCurrentCUDAStream");
  auto member = &CUDAStream::stream;
  void *member_address;
  std::memcpy(&member_address, &member, sizeof member_address);  // (Itanium: the function's address first)
  expect(handle == member_address, "the second name is c10::cuda::CUDAStream::stream");
  if (failures == 0) std::printf("c10 stream ABI: the layout and both symbols match src/cuda_stream.rs\n");
  return failures == 0 ? 0 : 1;
}
