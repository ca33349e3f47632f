// The cache of freed large CPU buffers (see buffer_cache.h), and its two ops.
#include "cpu/buffer_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace xlard::buffer_cache {
namespace {

constexpr int64_t kDefaultLimitMiB = 256;

// The limit in bytes from XLARD_CPU_BUFFER_CACHE_MB; an unreadable value is an error
// (raised by the op that allocates, never inside a deleter).
int64_t read_limit(const char* op) {
  const char* text = std::getenv("XLARD_CPU_BUFFER_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  errno = 0;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(errno == 0 && end != text && *end == '\0' && mib >= 0 && mib <= (int64_t(1) << 30), "xlard.",
                    op, ": XLARD_CPU_BUFFER_CACHE_MB must be a whole number of MiB >= 0 (0 turns the cache off), got '",
                    text, "'");
  return static_cast<int64_t>(mib) << 20;
}

class Cache {
 public:
  // A cached buffer of at least n bytes and at most n + n/8 (its size in *size), or nullptr.
  void* take(size_t n, size_t* size) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(n);
    if (it == free_.end() || it->first > n + n / 8) return nullptr;
    void* p = it->second;
    *size = it->first;
    bytes_ -= it->first;
    free_.erase(it);
    return p;
  }

  void give(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (size >= static_cast<size_t>(kMinBytes) && bytes_ + size <= static_cast<size_t>(limit_.load())) {
        free_.emplace(size, p);
        bytes_ += size;
        return;
      }
    }
    c10::free_cpu(p);
  }

  int64_t release() {
    std::multimap<size_t, void*> all;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(free_);
      bytes = bytes_;
      bytes_ = 0;
    }
    for (auto& [size, p] : all) c10::free_cpu(p);
    return static_cast<int64_t>(bytes);
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(bytes_);
  }

  // Takes a new limit; frees what no longer fits.
  void set_limit(int64_t limit) {
    if (limit_.exchange(limit) <= limit) return;
    std::multimap<size_t, void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (bytes_ > static_cast<size_t>(limit) && !free_.empty()) {
        auto it = std::prev(free_.end());  // largest first
        bytes_ -= it->first;
        drop.insert(*it);
        free_.erase(it);
      }
    }
    for (auto& [size, p] : drop) c10::free_cpu(p);
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t bytes_ = 0;
  std::atomic<int64_t> limit_{kDefaultLimitMiB << 20};
};

// Never destroyed: tensors may be freed (and give their buffers back) during exit.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

struct Block {
  void* ptr;
  size_t size;
};

void give_back(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  cache().give(block->ptr, block->size);
  delete block;
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, c10::Device(c10::kCPU)};
    size_t size = n;
    void* p = cache().take(n, &size);
    if (p == nullptr) {
      p = c10::alloc_cpu(n);
      size = n;
    }
    return {p, new Block{p, size}, &give_back, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator();
  return *a;
}

int64_t cpu_buffer_cache(bool release_all) { return release_all ? release() : cached_bytes(); }

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype, const char* op) {
  const int64_t limit = read_limit(op);
  cache().set_limit(limit);
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  if (limit == 0 || numel * static_cast<int64_t>(c10::elementSize(dtype)) < kMinBytes) {
    return at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
  }
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

int64_t cached_bytes() { return cache().bytes(); }

int64_t release() { return cache().release(); }

// No tensor arguments, so no backend key: one kernel for every device.
TORCH_LIBRARY_IMPL(xlard, CompositeExplicitAutograd, m) { m.impl("_cpu_buffer_cache", &cpu_buffer_cache); }

}  // namespace xlard::buffer_cache
