// A small cache of freed large CPU buffers for the latent ops' outputs.
//
// A PPO rollout calls sample_correction in a loop and drops each step's outputs: tens of
// MiB allocated and freed per call. glibc returns such freed memory to the OS once more
// than its trim threshold (32 MiB after a 16 MiB mmap) sits free at the top of the heap,
// so every call page-faults its outputs in again: measured 14-16 ms per call for
// float32 [16, 16, 128, 128] against 1.6-2.1 ms into reused buffers. Outputs made by
// buffer_cache::empty() return their memory here when freed, and the next call of the
// same size takes it back.
//
// Bounded: at most XLARD_CPU_BUFFER_CACHE_MB MiB (default 256; 0 turns caching off) are
// held; a buffer that does not fit goes back to the system. release() empties it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace xlard::buffer_cache {

// Buffers smaller than this come from torch's allocator as usual.
constexpr int64_t kMinBytes = int64_t(1) << 20;

// An uninitialised contiguous CPU tensor. Large ones live in memory from the cache; the
// tensor behaves like any other (resizable, shareable, freed when its last user goes).
at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype, const char* op);

// Bytes held by the cache now.
int64_t cached_bytes();

// The limit from XLARD_CPU_BUFFER_CACHE_MB's text (nullptr or "" = the default). Read once when
// the library loads; xlard.ops hands os.environ's value here (under the GIL) when it changed, so
// no kernel calls getenv (which races with a setenv on another thread). A bad value is kept and
// raised by the next call that allocates. Thread-safe.
void set_limit_text(const char* text);

// Frees every cached buffer; returns how many bytes that released.
int64_t release();

}  // namespace xlard::buffer_cache
