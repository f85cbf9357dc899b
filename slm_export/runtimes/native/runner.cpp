// A torch-free ExecuTorch runner with a C interface (loaded by slm_export/runtimes/native via
// ctypes): the runtime an app links, so its memory is what an app's would be.
//
// Memory choices, each measured against ExecuTorch's Python bindings (README, "Memory"):
//   - the .pte is mmapped without mlock, so its pages are shared with the page cache and can be
//     dropped after XNNPACK has packed the weights it needs;
//   - the planned buffers (activations and the KV cache) are anonymous mmaps, whose pages the
//     kernel maps on first write: a 2048-token cache costs memory only for the tokens used, where
//     the bindings zero-fill every arena up front;
//   - after each call the runner drops its page-table entries for the .pte's mapped constants
//     (madvise DONTNEED; Linux): the embedding table is read there, and the kernel maps 16
//     neighbouring cached pages on every fault, so a 512-token prompt left ~20 MB of a 28 MB table
//     resident for rows it never reads again. The pages stay in the OS page cache (shared,
//     reclaimable); the next read of a row maps it again;
//   - XNNPACK's delegates (one per layer) share one workspace, set explicitly rather than left to
//     the build's default: with one workspace each, SmolLM2-135M took 34 MB more at the first
//     step and 37 MB more at the first 128-token chunk.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/core/hierarchical_allocator.h>

#include <sys/mman.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

// Declared here because the wheel ships the library but not this header.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::HierarchicalAllocator;
using executorch::runtime::Span;

struct Runner {
  std::unique_ptr<Module> module;
  std::vector<Span<uint8_t>> arenas;
  std::unique_ptr<HierarchicalAllocator> planned;
  std::vector<std::pair<void*, size_t>> file_maps;  // the .pte's mappings, read-only

  ~Runner() {
    module.reset();
    for (auto& a : arenas) munmap(a.data(), a.size());
  }
};

void set_error(char* err, size_t len, const std::string& msg) {
  if (err && len) std::snprintf(err, len, "%s", msg.c_str());
}

// The address ranges at which `path` is mapped into this process (empty where /proc is missing).
std::vector<std::pair<void*, size_t>> mappings_of(const char* path) {
  std::vector<std::pair<void*, size_t>> out;
  char real[PATH_MAX];
  if (!realpath(path, real)) return out;
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    const size_t slash = line.find('/');
    if (slash == std::string::npos || line.compare(slash, std::string::npos, real) != 0) continue;
    unsigned long begin = 0, end = 0;
    char perms[5] = {};
    if (std::sscanf(line.c_str(), "%lx-%lx %4s", &begin, &end, perms) == 3 && perms[1] == '-')
      out.emplace_back(reinterpret_cast<void*>(begin), end - begin);
  }
  return out;
}

std::string code(Error e) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "error 0x%x", static_cast<unsigned>(e));
  return buf;
}

}  // namespace

extern "C" {

void* slm_et_open(const char* path, const char* method, int threads, char* err, size_t err_len) {
  if (threads > 0) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  {
    // XNNPACK's option keys (backends/xnnpack/runtime/XNNPACKBackend.h, not shipped in the wheel);
    // 1 = WorkspaceSharingMode::PerModel.
    executorch::runtime::BackendOptions<1> xnnpack;
    xnnpack.set_option("workspace_sharing_mode", 1);
    const Error e = executorch::runtime::set_option("XnnpackBackend", xnnpack.view());
    if (e != Error::Ok) {
      set_error(err, err_len, "cannot set XNNPACK's workspace sharing (" + code(e) + ")");
      return nullptr;
    }
  }
  auto r = std::make_unique<Runner>();
  r->module = std::make_unique<Module>(path, Module::LoadMode::Mmap);
  auto meta = r->module->method_meta(method);
  if (!meta.ok()) {
    set_error(err, err_len, std::string("cannot read method '") + method + "' of " + path + " (" + code(meta.error()) + ")");
    return nullptr;
  }
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    const size_t size = static_cast<size_t>(meta->memory_planned_buffer_size(i).get());
    void* p = size ? mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) : nullptr;
    if (size && p == MAP_FAILED) {
      set_error(err, err_len, "cannot reserve " + std::to_string(size) + " bytes for the planned buffers");
      return nullptr;
    }
    r->arenas.emplace_back(static_cast<uint8_t*>(p), size);
  }
  r->planned = std::make_unique<HierarchicalAllocator>(Span<Span<uint8_t>>(r->arenas.data(), r->arenas.size()));
  const Error e = r->module->load_method(method, r->planned.get());
  if (e != Error::Ok) {
    set_error(err, err_len, std::string("cannot load method '") + method + "' of " + path + " (" + code(e) +
                                "; an operator missing from this runner is named in the log above)");
    return nullptr;
  }
  r->file_maps = mappings_of(path);
  // No readahead around a row read from disk: it would bring neighbouring rows in as one larger
  // page-cache folio, which a fault then maps whole (see WRITE_PIECE in exporters/executorch/lower.py).
  for (const auto& [addr, len] : r->file_maps) madvise(addr, len, MADV_RANDOM);
  return r.release();
}

// Runs forward(tokens[1, n], input_pos[1], rows[k]) and copies the [k, vocab] logits to `out`.
int slm_et_forward(void* handle, const char* method, const int64_t* tokens, int64_t n, int64_t pos,
                   const int64_t* rows, int64_t k, float* out, int64_t out_len, char* err, size_t err_len) {
  auto* r = static_cast<Runner*>(handle);
  int64_t position = pos;
  auto tok = executorch::extension::from_blob(const_cast<int64_t*>(tokens), {1, static_cast<int>(n)}, ScalarType::Long);
  auto at = executorch::extension::from_blob(&position, {1}, ScalarType::Long);
  auto sel = executorch::extension::from_blob(const_cast<int64_t*>(rows), {static_cast<int>(k)}, ScalarType::Long);
  auto result = r->module->execute(method, {EValue(*tok), EValue(*at), EValue(*sel)});
  for (const auto& [addr, len] : r->file_maps) madvise(addr, len, MADV_DONTNEED);  // see the top of this file
  if (!result.ok()) {
    set_error(err, err_len, "forward failed (" + code(result.error()) + ")");
    return 1;
  }
  const auto& logits = result->at(0).toTensor();
  if (logits.numel() != out_len) {
    set_error(err, err_len, "logits have " + std::to_string(logits.numel()) + " values, expected " + std::to_string(out_len));
    return 1;
  }
  std::memcpy(out, logits.const_data_ptr<float>(), sizeof(float) * out_len);
  return 0;
}

void slm_et_close(void* handle) { delete static_cast<Runner*>(handle); }

}  // extern "C"
