"""The app developer's README for an ExecuTorch bundle, written from the recorded method signature,
and the C++ example (cpp/) every export carries."""
from __future__ import annotations

import shutil
from pathlib import Path

from ...text import format_chat

SAMPLE_QUESTION = "What is the capital of France?"


def _runtime_row(ops: list[str]) -> str:
    ours = [op for op in ops if op.startswith("slm::")]
    if ours:  # an fp16 KV cache (--kv-bits 16): our kernels, not in ExecuTorch's prebuilt libraries
        return (f"ExecuTorch >= 1.5 with the XNNPACK backend, the quantized kernels (`quantized_decomposed::embedding_byte`, "
                f"`embedding_4bit`) and slm-export's ops {', '.join(f'`{op}`' for op in ours)} (fp16 KV cache): compile "
                "`cpp/llama_ops.cpp` (with `cpp/attention.h`) into your app beside ExecuTorch (C++17; ExecuTorch's "
                "prebuilt Android AAR and iOS frameworks do not have these ops, so for those export with `--kv-bits 32`). "
                "On Linux (a Pi, a laptop) the pip wheel's C++ runtime runs it without torch: see C++ below")
    return ("ExecuTorch >= 1.5 with the XNNPACK backend, the LLM custom ops (`llama::update_cache`, `llama::custom_sdpa`) "
            "and the quantized kernels (`quantized_decomposed::embedding_byte`, `embedding_4bit`); the prebuilt Android AAR "
            "and iOS frameworks of ExecuTorch's LLM demo apps include all three. On Linux (a Pi, a laptop) the pip wheel's "
            "C++ runtime runs it without torch, with the two custom ops from `cpp/llama_ops.cpp`: see C++ below")


_STOCK_PYTHON = """import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers llama:: kernels
from executorch.kernels import quantized  # noqa: F401  registers quantized embedding kernels
from executorch.runtime import Runtime

forward = Runtime.get().load_program("model.pte").load_method("forward")


def step(tokens, pos, rows):  # -> logits [len(rows), vocab]
    return forward.execute([torch.tensor([tokens]), torch.tensor([pos]), torch.tensor(rows)])[0]"""

_OUR_PYTHON = """import numpy as np
from slm_export.runtimes.native import NativeProgram  # slm-export installed; builds the runner once with g++

program = NativeProgram("model.pte", "forward", threads=2, vocab={vocab})


def step(tokens, pos, rows):  # -> logits [len(rows), vocab]
    return program.forward(np.array([tokens]), pos, np.array(rows))"""


# What llama_ops.cpp registers: a program that calls only these runs with cpp/ as it is.
OUR_KERNELS = ("llama::update_cache", "llama::custom_sdpa", "slm::update_cache", "slm::sdpa")


def app_readme(manifest: dict) -> str:
    m, io = manifest["model"], manifest["io"]
    ops = manifest.get("target_extra", {}).get("custom_ops", [])
    if any(op.startswith("slm::") for op in ops):
        python_title, python_setup = "slm-export's torch-free runner", _OUR_PYTHON.format(vocab=m["vocab_size"])
    else:
        python_title, python_setup = "executorch's runtime bindings", _STOCK_PYTHON
    kv, chunk = io["kv_layout"], io["prefill_chunk"]
    tok = manifest.get("tokenizer", {})
    template = tok.get("chat_template") or "(none: feed the raw prompt)"
    eos = tok.get("eos_token_ids", [])
    missing = sorted(op for op in ops if op not in OUR_KERNELS)
    cpp_note = (f"\nThis export also calls {', '.join(f'`{op}`' for op in missing)} (`--kv-bits 8`), which these kernels "
                "do not implement: link ExecuTorch's `extension/llm/custom_ops` built from source (its pip copy links "
                "libtorch), or export with `--kv-bits 32` or `16`.\n" if missing else "")
    cpp_build, stop = cpp_build_command(), " ".join(str(i) for i in eos)
    cpp_prompt = (format_chat(tok["chat_template"], SAMPLE_QUESTION, tok.get("bos_token"), tok.get("eos_token"))
                  if tok.get("chat_template") else SAMPLE_QUESTION)
    cpp_prompt_note = ("the question in the chat template; the template holds the special tokens"
                       if tok.get("chat_template") else "no chat template: the raw text")
    return f"""# {manifest['source'].get('name') or manifest['architecture']} for ExecuTorch ({manifest['quant']['label']})

Made by slm-export {manifest['versions'].get('slm-export')} with executorch {manifest['versions'].get('executorch')}.
Every file's sha256 is in `manifest.json`; `slm-export inspect .` checks them.

| | |
|---|---|
| model | `model.pte`: one method, `forward`, XNNPACK delegate |
| runtime | {_runtime_row(ops)} |
| tokenizer | `tokenizer.json` (Hugging Face tokenizers format) |
| max context | {manifest['max_context']} tokens (the KV cache is inside the program: {kv['bytes'] / 2**20:.0f} MiB) |
| stop tokens | {eos} |
| vocab | {m['vocab_size']} |

## The method

`forward(tokens, input_pos, logit_rows) -> logits`

- `tokens` int64 `[1, n]`, 1 <= n <= {chunk}: the new tokens. A longer prompt goes in chunks of at most {chunk}.
- `input_pos` int64 `[1]`: how many tokens are already in the cache (0 for a new conversation).
- `logit_rows` int64 `[k]`: which of the n rows to return logits for; `[n - 1]` to generate.
- output: `logits` float32 `[k, {m['vocab_size']}]`.

The KV cache lives in the program and is written in place: keep one loaded `Module` per conversation,
and start a new conversation by calling again with `input_pos = 0` (nothing needs clearing).

## Prompt format

```
{template}
```

## Python ({python_title})

```python
{python_setup}
from tokenizers import Tokenizer

tok = Tokenizer.from_file("tokenizer.json")
ids = tok.encode("<your prompt, formatted with the chat template>", add_special_tokens=False).ids
pos, logits = 0, None
for i in range(0, len(ids), {chunk}):
    chunk = ids[i:i + {chunk}]
    logits = step(chunk, pos, [len(chunk) - 1])
    pos += len(chunk)
out = []
for _ in range(64):
    next_id = int(logits[-1].argmax())
    if next_id in {set(eos) or '{-1}'}:
        break
    out.append(next_id)
    logits = step([next_id], pos, [0])
    pos += 1
print(tok.decode(out))
```

## C++ (`{CPP_EXAMPLE}`)

`{CPP_EXAMPLE}` runs a prompt and a greedy decode loop through ExecuTorch's `Module` API, the same calls an
app's native layer makes. Beside it are slm-export's kernels for the LLM ops (`llama_ops.cpp`, `attention.h`)
and `app_memory.h`, the memory choices of slm-export's runner (the KV cache costs memory only for the tokens
used; comments say what each saved). On Linux (a Pi, a laptop) it builds against the executorch pip wheel's
C++ runtime (no torch), with the flags slm-export's runner is built with, so it generates what `verify` and
`bench` measured (leave out `-march=native` when you cross-compile). Your app's tokenizer does what the two
Python parts do:

```sh
{cpp_build}
python - > prompt_ids.txt <<'EOF'
from tokenizers import Tokenizer
prompt = {cpp_prompt!r}  # {cpp_prompt_note}
print(*Tokenizer.from_file('tokenizer.json').encode(prompt, add_special_tokens=False).ids)
EOF
./generate model.pte 32 {stop} < prompt_ids.txt > answer_ids.txt   # the generated token ids
python -c "from tokenizers import Tokenizer; print(Tokenizer.from_file('tokenizer.json').decode([int(t) for t in open('answer_ids.txt').read().split()]))"
```
{cpp_note}
## Android (Kotlin, org.pytorch.executorch)

```kotlin
val module = Module.load(File(filesDir, "model.pte").absolutePath)
fun step(tokens: LongArray, pos: Long): FloatArray {{
    val t = Tensor.fromBlob(tokens, longArrayOf(1, tokens.size.toLong()))
    val p = Tensor.fromBlob(longArrayOf(pos), longArrayOf(1))
    val rows = Tensor.fromBlob(longArrayOf(tokens.size - 1L), longArrayOf(1))
    return module.forward(EValue.from(t), EValue.from(p), EValue.from(rows))[0].toTensor().dataAsFloatArray
}}
// prompt in chunks of <= {chunk} tokens, then one token per step; argmax (or sample) over the {m['vocab_size']} logits
```
"""


CPP_DIR = "cpp"
CPP_EXAMPLE = f"{CPP_DIR}/generate.cpp"
# Our kernels for the LLM ops (ExecuTorch's own ship only linked to libtorch)
# and the memory choices of its runner (app_memory.h), copied beside the example.
CPP_SOURCES = ("llama_ops.cpp", "attention.h", "app_memory.h")

_CPP = """// generate.cpp: greedy generation with model.pte through ExecuTorch's C++ Module API.
// Written by slm-export for this export. The tokenizer is your app's: this program reads prompt
// token ids on stdin and prints the generated ids on stdout.
//
//   build: README.md, section "C++"      run: ./generate model.pte MAX_NEW_TOKENS [STOP_ID ...] < prompt_ids.txt
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include "app_memory.h"  // slm-export's runner's memory choices: what `slm-export bench` measured

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <set>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

constexpr int64_t kPrefillChunk = {chunk};  // the longest `tokens` input the program takes
constexpr int64_t kMaxContext = {max_context};  // the KV cache's length, inside the program

// forward(tokens [1, n], input_pos [1], logit_rows [1]): appends n tokens at cache position `pos`
// and returns the greedy choice after the last of them.
static int64_t next_token(Module& module, const slm::FileMappings& file, std::vector<int64_t>& tokens, int64_t pos) {{
  int64_t last_row = static_cast<int64_t>(tokens.size()) - 1;
  auto ids = from_blob(tokens.data(), {{1, static_cast<int>(tokens.size())}}, ScalarType::Long);
  auto at = from_blob(&pos, {{1}}, ScalarType::Long);
  auto rows = from_blob(&last_row, {{1}}, ScalarType::Long);
  auto result = module.forward({{EValue(*ids), EValue(*at), EValue(*rows)}});
  file.drop();  // the embedding rows just read need not stay mapped (app_memory.h)
  if (!result.ok()) {{
    std::fprintf(stderr, "forward failed (error 0x%x)\\n", static_cast<unsigned>(result.error()));
    std::exit(1);
  }}
  const auto& logits = result->at(0).toTensor();  // [1, vocab] float32
  const float* x = logits.const_data_ptr<float>();
  return std::max_element(x, x + logits.numel()) - x;
}}

int main(int argc, char** argv) {{
  if (argc < 3) {{
    std::fprintf(stderr, "usage: %s model.pte MAX_NEW_TOKENS [STOP_ID ...] < prompt_ids.txt\\n", argv[0]);
    return 2;
  }}
  if (slm::share_xnnpack_workspace() != Error::Ok) return 1;
  slm::PlannedArenas arenas;  // before the module: it must outlive it
  Module module(argv[1], Module::LoadMode::Mmap);  // no mlock: pages stay shared with the page cache
  if (!arenas.reserve(module, "forward") || module.load_method("forward", arenas.allocator()) != Error::Ok) {{
    std::fprintf(stderr, "cannot load %s (the log above says why)\\n", argv[1]);
    return 1;
  }}
  const slm::FileMappings file(argv[1]);
  const int max_new = std::atoi(argv[2]);
  std::set<int64_t> stop;
  for (int i = 3; i < argc; ++i) stop.insert(std::atoll(argv[i]));
  std::vector<int64_t> prompt;
  for (int64_t id; std::cin >> id;) prompt.push_back(id);
  if (prompt.empty() || static_cast<int64_t>(prompt.size()) >= kMaxContext) {{
    std::fprintf(stderr, "give 1 to %lld prompt token ids on stdin\\n", static_cast<long long>(kMaxContext - 1));
    return 2;
  }}
  // The prompt in chunks; the cache position is the number of tokens already in it.
  int64_t pos = 0, next = -1;
  for (size_t i = 0; i < prompt.size(); i += kPrefillChunk) {{
    std::vector<int64_t> chunk(prompt.begin() + i, prompt.begin() + std::min(prompt.size(), i + kPrefillChunk));
    next = next_token(module, file, chunk, pos);
    pos += static_cast<int64_t>(chunk.size());
  }}
  // Then one token per call, until a stop id, the token budget or the end of the cache.
  for (int n = 0; n < max_new && !stop.count(next) && pos < kMaxContext; ++n) {{
    std::printf("%lld ", static_cast<long long>(next));
    std::vector<int64_t> one{{next}};
    next = next_token(module, file, one, pos++);
  }}
  std::printf("\\n");
  return 0;
}}
"""


def cpp_example(chunk: int, max_context: int) -> str:
    return _CPP.format(chunk=chunk, max_context=max_context)


def cpp_build_command() -> str:
    """The g++ line that builds cpp/generate.cpp against the executorch pip wheel's C++ runtime."""
    from ...runtimes.native import CXXFLAGS, DEFINES, LIBS

    return ("ET=$(python -c \"import importlib.util as u; print(u.find_spec('executorch').submodule_search_locations[0])\")\n"
            f"g++ {' '.join(CXXFLAGS)} -Wno-deprecated-declarations {' '.join(f'-D{d}' for d in DEFINES)} -I$ET/include "
            "-I$ET/include/executorch/runtime/core/portable_type/c10 \\\n"
            f"    {CPP_EXAMPLE} {CPP_DIR}/llama_ops.cpp -o generate -L$ET/lib \\\n"
            f"    -Wl,--no-as-needed {' '.join(f'-l{lib}' for lib in LIBS)} -Wl,--as-needed -Wl,-rpath,$ET/lib")


def write_cpp_example(folder: Path, chunk: int, max_context: int) -> None:
    """cpp/: the example and the kernels it builds with, so the export folder is all an app developer needs."""
    from ...runtimes.native import HERE as NATIVE_SOURCES

    (folder / CPP_DIR).mkdir()
    (folder / CPP_EXAMPLE).write_text(cpp_example(chunk, max_context))
    for name in CPP_SOURCES:
        shutil.copyfile(NATIVE_SOURCES / name, folder / CPP_DIR / name)
