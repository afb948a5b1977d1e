// Exact CPU memory accounting: a CPU allocator that wraps the one torch had and counts
// the bytes it hands out and takes back, with their peak. torch's profiler reports CPU
// allocations only while it records, so a block allocated before it started is freed
// "of unknown size" (not counted), and its size table outlives a session; this counter
// sees every block allocated after it was installed, whenever it is freed.
#include <torch/library.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

std::atomic<int64_t> current_bytes{0};
std::atomic<int64_t> peak_bytes{0};

// A counted block carries its size in a header before the data, one alignment unit long
// so that the data stays aligned as torch's allocator aligns it. The DataPtr it hands out
// is "simple" (its context is the data pointer), as raw_allocate and raw_deleter require
// (ATen's MKL-DNN convolutions allocate that way).
constexpr size_t kHeader = c10::gAlignment;
static_assert(kHeader >= sizeof(int64_t), "the header holds the block's size");

c10::Allocator* inner = nullptr;          // the CPU allocator wrapped
c10::DeleterFnPtr inner_delete = nullptr;  // its raw deleter

void release(void* data) {
  char* raw = static_cast<char*>(data) - kHeader;
  int64_t size = 0;
  std::memcpy(&size, raw, sizeof size);
  current_bytes.fetch_sub(size, std::memory_order_relaxed);
  inner_delete(raw);
}

void raise_peak(int64_t now) {
  int64_t peak = peak_bytes.load(std::memory_order_relaxed);
  while (now > peak && !peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

class CountingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    char* raw = static_cast<char*>(inner->raw_allocate(n + kHeader));
    auto size = static_cast<int64_t>(n);
    std::memcpy(raw, &size, sizeof size);
    raise_peak(current_bytes.fetch_add(size, std::memory_order_relaxed) + size);
    void* data = raw + kHeader;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &release;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

std::once_flag installed;

// Install once, at a priority above torch's default CPU allocator (0), wrapping whatever
// CPU allocator is in place. Never removed: blocks it counted must come back through it.
void install() {
  std::call_once(installed, [] {
    inner = c10::GetCPUAllocator();
    inner_delete = inner->raw_deleter();
    TORCH_CHECK(inner_delete != nullptr, "localprop: the CPU allocator in use has no raw deleter to wrap");
    static CountingAllocator counting;
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
