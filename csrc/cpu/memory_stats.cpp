// Exact CPU memory accounting: a CPU allocator that wraps the one torch had and counts
// the bytes it hands out and takes back, with their peak. torch's profiler reports CPU
// allocations only while it records, so a block allocated before it started is freed
// "of unknown size" (not counted), and its size table outlives a session; this counter
// sees every block allocated after it was installed, whenever it is freed.
#include <torch/library.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

namespace {

std::atomic<int64_t> current_bytes{0};
std::atomic<int64_t> peak_bytes{0};

// What a counted block's deleter needs: the wrapped allocator's own DataPtr (freed by
// its own deleter when this is deleted) and the size counted.
struct Block {
  c10::DataPtr inner;
  int64_t size;
};

void release(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  current_bytes.fetch_sub(block->size, std::memory_order_relaxed);
  delete block;
}

void raise_peak(int64_t now) {
  int64_t peak = peak_bytes.load(std::memory_order_relaxed);
  while (now > peak && !peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr data = inner_->allocate(n);
    void* ptr = data.get();
    c10::Device device = data.device();
    auto size = static_cast<int64_t>(n);
    auto* block = new Block{std::move(data), size};
    raise_peak(current_bytes.fetch_add(size, std::memory_order_relaxed) + size);
    return {ptr, block, &release, device};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* inner_;
};

std::once_flag installed;

// Install once, at a priority above torch's default CPU allocator (0), wrapping whatever
// CPU allocator is in place. Never removed: blocks it counted must come back through it.
void install() {
  std::call_once(installed, [] {
    static CountingAllocator counting(c10::GetCPUAllocator());
    c10::SetCPUAllocator(&counting, /*priority=*/1);
  });
}

bool is_installed() {
  return c10::GetCPUAllocator() != nullptr && dynamic_cast<CountingAllocator*>(c10::GetCPUAllocator()) != nullptr;
}

// [bytes allocated now, peak since the last reset] of the blocks counted, and whether the
// counter is the CPU allocator in use (1) or was displaced by another (0).
std::vector<int64_t> stats() {
  return {current_bytes.load(), peak_bytes.load(), is_installed() ? 1 : 0};
}

void reset_peak() {
  peak_bytes.store(current_bytes.load());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(localprop, m) {
  // CPU memory accounting (see above): install the counting allocator (idempotent);
  // read [allocated, peak, installed]; set the peak to what is allocated now.
  m.def("cpu_memory_install() -> ()", &install);
  m.def("cpu_memory_stats() -> int[]", &stats);
  m.def("cpu_memory_reset_peak() -> ()", &reset_peak);
}
