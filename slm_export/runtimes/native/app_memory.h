// How a process running a .pte keeps its memory to what the model needs: slm-export's runner
// (runner.cpp) and the C++ example every ExecuTorch export carries (cpp/generate.cpp) both use it,
// so the memory `slm-export bench` measures is the memory an app that copies the example gets.
//
// Each choice was measured on SmolLM2-135M int4 against ExecuTorch's defaults (docs/targets.md, "ExecuTorch", "Memory"):
//   - the .pte is mmapped without mlock (Module::LoadMode::Mmap), so its pages are shared with the
//     page cache and can be dropped after XNNPACK has packed the weights it needs;
//   - PlannedArenas: the planned buffers (activations and the KV cache) are anonymous mmaps, whose
//     pages the kernel maps on first write: a 2048-token cache costs memory only for the tokens
//     used, where Module's own arenas (std::vector) zero-fill every byte at load;
//   - FileMappings::drop after each call: the embedding table is read from the .pte's mapped
//     constants, and the kernel maps 16 neighbouring cached pages on every fault, so a 512-token
//     prompt left ~20 MB of a 28 MB table resident for rows it never reads again. The pages stay
//     in the OS page cache (shared, reclaimable); the next read of a row maps it again (Linux);
//   - share_xnnpack_workspace: XNNPACK's delegates (one per layer) share one workspace, set
//     explicitly rather than left to the build's default: with one workspace each, SmolLM2-135M
//     took 34 MB more at the first step and 37 MB more at the first 128-token chunk.
#pragma once

#include <executorch/extension/module/module.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/core/hierarchical_allocator.h>

#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace slm {

using executorch::runtime::Error;

// Call before loading a program. 1 = WorkspaceSharingMode::PerModel (the option keys live in
// backends/xnnpack/runtime/XNNPACKBackend.h, which the wheel does not ship).
inline Error share_xnnpack_workspace() {
  executorch::runtime::BackendOptions<1> xnnpack;
  xnnpack.set_option("workspace_sharing_mode", 1);
  return executorch::runtime::set_option("XnnpackBackend", xnnpack.view());
}

// The planned buffers of one or more methods as anonymous mmaps, each buffer as large as the largest
// of the methods' at its index; pass allocator() to Module::load_method of each. Methods that share
// them share the program's mutable state (a program exported with share_mutable_buffers places it
// in one buffer, at the same offsets for every method) and overlap their activations: run one at a
// time and copy an output out before the next call.
class PlannedArenas {
 public:
  // False (and nothing held) if a buffer cannot be reserved or a method cannot be read.
  bool reserve(executorch::extension::Module& module, const std::vector<std::string>& methods) {
    std::vector<size_t> sizes;
    for (const auto& method : methods) {
      auto meta = module.method_meta(method);
      if (!meta.ok()) return false;
      for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
        const size_t size = static_cast<size_t>(meta->memory_planned_buffer_size(i).get());
        if (i >= sizes.size()) sizes.push_back(0);
        sizes[i] = std::max(sizes[i], size);
      }
    }
    for (const size_t size : sizes) {
      void* p = size ? mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) : nullptr;
      if (size && p == MAP_FAILED) {
        release();
        return false;
      }
      arenas_.emplace_back(static_cast<uint8_t*>(p), size);
    }
    allocator_ = std::make_unique<executorch::runtime::HierarchicalAllocator>(
        executorch::runtime::Span<executorch::runtime::Span<uint8_t>>(arenas_.data(), arenas_.size()));
    return true;
  }
  executorch::runtime::HierarchicalAllocator* allocator() { return allocator_.get(); }
  // Unmaps the buffers: only after the Module that uses them is gone.
  void release() {
    allocator_.reset();
    for (auto& a : arenas_)
      if (a.size()) munmap(a.data(), a.size());
    arenas_.clear();
  }
  ~PlannedArenas() { release(); }

 private:
  std::vector<executorch::runtime::Span<uint8_t>> arenas_;
  std::unique_ptr<executorch::runtime::HierarchicalAllocator> allocator_;
};

// The read-only ranges at which a file (the .pte) is mapped into this process, found in
// /proc/self/maps once the program is loaded (none where /proc is missing: then drop() does nothing).
class FileMappings {
 public:
  explicit FileMappings(const char* path) {
    char real[PATH_MAX];
    if (!realpath(path, real)) return;
    std::ifstream maps("/proc/self/maps");
    std::string line;
    while (std::getline(maps, line)) {
      const size_t slash = line.find('/');
      if (slash == std::string::npos || line.compare(slash, std::string::npos, real) != 0) continue;
      unsigned long begin = 0, end = 0;
      char perms[5] = {};
      if (std::sscanf(line.c_str(), "%lx-%lx %4s", &begin, &end, perms) == 3 && perms[1] == '-')
        ranges_.emplace_back(reinterpret_cast<void*>(begin), end - begin);
    }
    // No readahead around a row read from disk: it would bring neighbouring rows in as one larger
    // page-cache folio, which a fault then maps whole (see WRITE_PIECE in exporters/executorch/lower.py).
    for (const auto& [addr, len] : ranges_) madvise(addr, len, MADV_RANDOM);
  }
  // After each forward call: unmap the pages read (the page cache keeps them).
  void drop() const {
    for (const auto& [addr, len] : ranges_) madvise(addr, len, MADV_DONTNEED);
  }

 private:
  std::vector<std::pair<void*, size_t>> ranges_;
};

}  // namespace slm
