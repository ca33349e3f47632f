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
#include <new>
#include <string>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define XLARD_HAVE_FORK 1
#else
#define XLARD_HAVE_FORK 0
#endif

namespace xlard::buffer_cache {
namespace {

constexpr int64_t kDefaultLimitMiB = 256;

std::atomic<int64_t> g_limit{kDefaultLimitMiB << 20};  // bytes
std::atomic<bool> g_limit_bad{false};                   // the last text given was no number (g_limit_text)
std::mutex g_limit_mu;
std::string g_limit_text;

// The limit in bytes (XLARD_CPU_BUFFER_CACHE_MB as last given to set_limit_text); an unreadable
// value is an error (raised by the op that allocates, never inside a deleter).
int64_t read_limit(const char* op) {
  if (g_limit_bad.load(std::memory_order_acquire)) {
    std::string text;
    {
      std::lock_guard<std::mutex> lock(g_limit_mu);
      text = g_limit_text;
    }
    TORCH_CHECK_VALUE(false, "xlard.", op, ": XLARD_CPU_BUFFER_CACHE_MB must be a whole number of MiB >= 0 "
                      "(0 turns the cache off), got '", text, "'");
  }
  return g_limit.load();
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

  void lock_for_fork() { mu_.lock(); }
  void unlock_after_fork() { mu_.unlock(); }
  // The child has one thread, a copy of the one that forked and held the lock: a fresh lock.
  void reset_lock_in_child() { new (&mu_) std::mutex(); }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t bytes_ = 0;
  std::atomic<int64_t> limit_{kDefaultLimitMiB << 20};
};

Cache* g_cache = nullptr;

#if XLARD_HAVE_FORK
// A child forked while another thread held the cache's lock inherited it locked, and hung on
// its first large output: the lock is taken around fork() and released on both sides.
void before_fork() { g_cache->lock_for_fork(); }
void after_fork_parent() { g_cache->unlock_after_fork(); }
void after_fork_child() { g_cache->reset_lock_in_child(); }
#endif

// Never destroyed: tensors may be freed (and give their buffers back) during exit.
Cache& cache() {
  static Cache* c = [] {
    g_cache = new Cache();
#if XLARD_HAVE_FORK
    pthread_atfork(&before_fork, &after_fork_parent, &after_fork_child);
#endif
    return g_cache;
  }();
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

// Asking for the size reads the limit (an unreadable XLARD_CPU_BUFFER_CACHE_MB is named, as the ops name it);
// releasing never does, so a bad setting cannot keep cached memory held.
int64_t cpu_buffer_cache(bool release_all) {
  if (release_all) return release();
  read_limit("cpu_buffer_cache_bytes");
  return cached_bytes();
}

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

void set_limit_text(const char* text) {
  if (text == nullptr || *text == '\0') {
    g_limit.store(kDefaultLimitMiB << 20);
    g_limit_bad.store(false, std::memory_order_release);
    return;
  }
  char* end = nullptr;
  errno = 0;
  const long long mib = std::strtoll(text, &end, 10);
  if (errno == 0 && end != text && *end == '\0' && mib >= 0 && mib <= (int64_t(1) << 30)) {
    g_limit.store(static_cast<int64_t>(mib) << 20);
    g_limit_bad.store(false, std::memory_order_release);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(g_limit_mu);
    g_limit_text = text;
  }
  g_limit_bad.store(true, std::memory_order_release);
}

namespace {
// XLARD_CPU_BUFFER_CACHE_MB as the process started (read once, while the library loads).
const bool g_limit_loaded = (set_limit_text(std::getenv("XLARD_CPU_BUFFER_CACHE_MB")), true);
}  // namespace

int64_t release() { return cache().release(); }

// No tensor arguments, so no backend key: one kernel for every device.
TORCH_LIBRARY_IMPL(xlard, CompositeExplicitAutograd, m) { m.impl("_cpu_buffer_cache", &cpu_buffer_cache); }

}  // namespace xlard::buffer_cache
