// A torch-free ExecuTorch runner with a C interface (loaded by slm_export/runtimes/native via
// ctypes): the runtime an app links, so its memory is what an app's would be. Its memory choices
// are in app_memory.h, shared with the C++ example every export carries.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include "app_memory.h"

#include <cstdio>
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

struct Runner {
  slm::PlannedArenas arenas;  // declared before the module, so destroyed after it
  std::unique_ptr<Module> module;
  std::unique_ptr<slm::FileMappings> file;
};

void set_error(char* err, size_t len, const std::string& msg) {
  if (err && len) std::snprintf(err, len, "%s", msg.c_str());
}

std::string code(Error e) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "error 0x%x", static_cast<unsigned>(e));
  return buf;
}

}  // namespace

extern "C" {

// Opens a program and loads `method` (its other methods load on their first call). All methods
// share one set of planned buffers: the program's mutable state (the KV cache) is one allocation
// its methods read and write (exported with share_mutable_buffers), and their activations overlap,
// as only one runs at a time and each call's output is copied out before the next.
void* slm_et_open(const char* path, const char* method, int threads, char* err, size_t err_len) {
  if (threads > 0) executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  if (const Error e = slm::share_xnnpack_workspace(); e != Error::Ok) {
    set_error(err, err_len, "cannot set XNNPACK's workspace sharing (" + code(e) + ")");
    return nullptr;
  }
  auto r = std::make_unique<Runner>();
  r->module = std::make_unique<Module>(path, Module::LoadMode::Mmap);
  const auto names = r->module->method_names();
  if (!names.ok() || !r->arenas.reserve(*r->module, std::vector<std::string>(names->begin(), names->end()))) {
    set_error(err, err_len, std::string("cannot read the methods of ") + path + " or reserve their planned buffers");
    return nullptr;
  }
  const Error e = r->module->load_method(method, r->arenas.allocator());
  if (e != Error::Ok) {
    set_error(err, err_len, std::string("cannot load method '") + method + "' of " + path + " (" + code(e) +
                                "; an operator missing from this runner is named in the log above)");
    return nullptr;
  }
  r->file = std::make_unique<slm::FileMappings>(path);
  return r.release();
}

// Runs `method` with inputs (tokens [1, n], input_pos [1]) if n > 0, then rows [k] if k > 0, and
// copies its [rows, vocab] logits to `out`: forward(tokens, input_pos), logits(rows), or the
// forward(tokens, input_pos, logit_rows) of files made before the logits method.
int slm_et_call(void* handle, const char* method, const int64_t* tokens, int64_t n, int64_t pos, const int64_t* rows,
                int64_t k, float* out, int64_t out_len, char* err, size_t err_len) {
  auto* r = static_cast<Runner*>(handle);
  if (!r->module->is_method_loaded(method)) {
    const Error e = r->module->load_method(method, r->arenas.allocator());
    if (e != Error::Ok) {
      set_error(err, err_len, std::string("cannot load method '") + method + "' (" + code(e) + ")");
      return 1;
    }
  }
  int64_t position = pos;
  executorch::extension::TensorPtr tok, at, sel;
  std::vector<EValue> inputs;
  if (n > 0) {
    tok = executorch::extension::from_blob(const_cast<int64_t*>(tokens), {1, static_cast<int>(n)}, ScalarType::Long);
    at = executorch::extension::from_blob(&position, {1}, ScalarType::Long);
    inputs.emplace_back(*tok);
    inputs.emplace_back(*at);
  }
  if (k > 0) {
    sel = executorch::extension::from_blob(const_cast<int64_t*>(rows), {static_cast<int>(k)}, ScalarType::Long);
    inputs.emplace_back(*sel);
  }
  auto result = r->module->execute(method, inputs);
  r->file->drop();  // see app_memory.h
  if (!result.ok()) {
    set_error(err, err_len, std::string(method) + " failed (" + code(result.error()) + ")");
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
