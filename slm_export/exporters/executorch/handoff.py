"""The app developer's README for an ExecuTorch bundle, written from the recorded methods, runner metadata
and kernels, and the C++ example (cpp/) every export carries.

The README holds whole programs for ExecuTorch's own LLM runner, which the .pte's contract is for
(contract.py): Python and C++ (`TextLLMRunner`), Kotlin (Android `LlmModule`), Swift (iOS `TextRunner`).
The Python one is run by the tests as written; the C++ one needs ExecuTorch built from source (the pip
wheel ships neither the runner's headers nor its library) and the Kotlin and Swift ones an Android or
Apple toolchain, none of which is here: the README says so where it shows them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ...text import format_chat
from ...units import MB

SAMPLE_QUESTION = "What is the capital of France?"


def _version(manifest: dict) -> str:
    """The executorch version the file was made with ("1.5.1" of "1.5.1+cpu"): the app's runtime should match."""
    return str(manifest["versions"].get("executorch") or "1.5.1").split("+")[0]


def _kernel_rows(manifest: dict) -> str:
    """The manifest's `kernels` as Markdown list items: what an app links beside the XNNPACK backend."""
    kernels = manifest.get("target_extra", {}).get("kernels", [])
    rows = ["- ExecuTorch's XNNPACK backend (the delegate that runs every linear)"]
    rows += [f"- {k['library']}: {', '.join(f'`{op}`' for op in k['ops'])}" for k in kernels if k["ops"]]
    return "\n".join(rows)


def _runtime_row(own: list[str], version: str) -> str:
    if own:  # an fp16 KV cache (--kv-bits 16): our kernels, not in ExecuTorch's prebuilt libraries
        return (f"ExecuTorch {version} with the XNNPACK backend, its LLM custom ops and quantized kernels, **and** "
                f"slm-export's ops {', '.join(f'`{op}`' for op in own)} (fp16 KV cache), which no ExecuTorch build has: "
                "see \"What an app links\". ExecuTorch's prebuilt Android AAR and iOS frameworks cannot run this file: "
                "for those, export with `--kv-bits 32` (the default)")
    return (f"ExecuTorch {version}: its `TextLLMRunner` (C++, Python), Android `LlmModule` and iOS `TextRunner` run it "
            "as it is (XNNPACK backend, LLM custom ops and quantized kernels, all in ExecuTorch's prebuilt Android AAR "
            "and iOS frameworks). On Linux (a Pi, a laptop) the pip wheel's C++ runtime runs it without torch, with the "
            "two custom ops from `cpp/llama_ops.cpp`: see \"C++ without the runner\"")


_RUNNER_PYTHON = """import torch  # noqa: F401  executorch's Python bindings need libtorch loaded first
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers the llama:: kernels
from executorch.kernels import quantized  # noqa: F401  registers the quantized embedding kernels
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

prompt = {prompt!r}  # {prompt_note}
runner = TextLLMRunner("model.pte", "tokenizer.json")  # reads the metadata methods: stop ids, max context
pieces = []
config = GenerationConfig(echo=False, max_new_tokens=64, temperature=0.0)  # 0: greedy
runner.generate(prompt, config, token_callback=pieces.append)  # the runner also prints each piece
print()
print("answer:", "".join(pieces).removesuffix({stop_text!r}))  # the last piece is the stop token's"""

_OUR_PYTHON = """import numpy as np
from tokenizers import Tokenizer
from slm_export.runtimes.native import NativeProgram  # slm-export installed; builds the runner once with g++

prompt = {prompt!r}  # {prompt_note}
program = NativeProgram("model.pte", threads=2, vocab={vocab})  # our kernels, the slm:: ops among them
tok = Tokenizer.from_file("tokenizer.json")
ids = tok.encode(prompt, add_special_tokens=False).ids
pos, logits = 0, None
for i in range(0, len(ids), {chunk}):  # the prompt in chunks of at most {chunk} tokens
    chunk = ids[i:i + {chunk}]
    logits = program.forward(np.array([chunk]), pos)  # the last token's logits [1, vocab]
    pos += len(chunk)
out = []
for _ in range(64):
    next_id = int(logits[-1].argmax())
    if next_id in {stop}:
        break
    out.append(next_id)
    logits = program.forward(np.array([[next_id]]), pos)
    pos += 1
print(tok.decode(out))"""

_RUNNER_CPP = """// answer.cpp: ExecuTorch's TextLLMRunner (the C++ behind LlmModule and the iOS runner) with this bundle.
#include <executorch/extension/llm/runner/llm_runner_helper.h>
#include <executorch/extension/llm/runner/text_llm_runner.h>

#include <cstdio>
#include <string>

using executorch::extension::llm::GenerationConfig;

int main() {{
  auto runner = executorch::extension::llm::create_text_llm_runner(
      "model.pte", executorch::extension::llm::load_tokenizer("tokenizer.json"));
  if (!runner || runner->load() != executorch::runtime::Error::Ok) {{
    std::fprintf(stderr, "cannot load model.pte with tokenizer.json (the log above says why)\\n");
    return 1;
  }}
  GenerationConfig config;
  config.echo = false;
  config.max_new_tokens = 64;
  config.temperature = 0.0f;  // greedy
  const std::string prompt = {prompt};  // {prompt_note}
  std::string answer;
  if (runner->generate(prompt, config, [&](const std::string& piece) {{ answer += piece; }}) !=
      executorch::runtime::Error::Ok) {{
    return 1;
  }}
  std::printf("\\nanswer: %s\\n", answer.c_str());
  return 0;
}}"""

_KOTLIN = """// MainActivity.kt: ExecuTorch's LlmModule with this bundle (org.pytorch:executorch-android:{version}).
// model.pte and tokenizer.json go in the app's files dir (filesDir) first, e.g. from a download.
package com.example.slmanswer

import android.app.Activity
import android.os.Bundle
import android.widget.TextView
import java.io.File
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmGenerationConfig
import org.pytorch.executorch.extension.llm.LlmModule

class MainActivity : Activity() {{
    override fun onCreate(savedInstanceState: Bundle?) {{
        super.onCreate(savedInstanceState)
        val view = TextView(this)
        setContentView(view)
        Thread {{  // generate() returns when the answer is complete: never on the UI thread
            val module = LlmModule(File(filesDir, "model.pte").path, File(filesDir, "tokenizer.json").path, 0.0f)
            module.load()  // reads the metadata methods: stop ids, max context
            val answer = StringBuilder()
            val config = LlmGenerationConfig.create().echo(false).maxNewTokens(64).temperature(0.0f).build()
            module.generate(PROMPT, config, object : LlmCallback {{
                override fun onResult(result: String) {{
                    answer.append(result)
                    val text = answer.toString()
                    runOnUiThread {{ view.text = text }}
                }}
            }})
            module.close()
        }}.start()
    }}

    companion object {{
        const val PROMPT = {prompt}  // {prompt_note}
    }}
}}"""

_SWIFT = """// AnswerApp.swift: ExecuTorch's TextRunner with this bundle, as a SwiftUI app (iOS 17+, macOS 12+). Swift
// package https://github.com/pytorch/executorch, branch "swiftpm-{version}"; link the products executorch_llm,
// backend_xnnpack, kernels_llm, kernels_optimized and kernels_quantized (kernels and backends register
// themselves: add -all_load to Other Linker Flags). model.pte and tokenizer.json go in the app's resources.
import ExecuTorchLLM
import SwiftUI

func answer() throws -> String {{
    guard let model = Bundle.main.path(forResource: "model", ofType: "pte"),
          let tokenizer = Bundle.main.path(forResource: "tokenizer", ofType: "json") else {{
        throw NSError(domain: "answer", code: 1,
                      userInfo: [NSLocalizedDescriptionKey: "model.pte or tokenizer.json is not in the app's resources"])
    }}
    let runner = TextRunner(modelPath: model, tokenizerPath: tokenizer)
    try runner.load()  // reads the metadata methods: stop ids, max context
    let prompt = {prompt}  // {prompt_note}
    var text = ""
    try runner.generate(prompt, Config {{
        $0.isEchoEnabled = false
        $0.maximumNewTokens = 64
        $0.temperature = 0  // greedy
    }}) {{ piece in
        text += piece
    }}
    return text
}}

struct AnswerView: View {{
    @State private var text = "..."

    var body: some View {{
        Text(text).padding().onAppear {{
            DispatchQueue.global(qos: .userInitiated).async {{  // generate() returns when the answer is complete
                let result: String
                do {{
                    result = try answer()
                }} catch {{
                    result = "generation failed: \\(error)"
                }}
                DispatchQueue.main.async {{ text = result }}
            }}
        }}
    }}
}}

@main
struct AnswerApp: App {{
    var body: some Scene {{
        WindowGroup {{ AnswerView() }}
    }}
}}"""


def _string_literal(text: str, kotlin: bool = False) -> str:
    """`text` as a C++, Kotlin or Swift string literal (the three share these escapes; Kotlin also needs $)."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"} | ({"$": "\\$"} if kotlin else {})
    if any(not (32 <= ord(ch) < 127) and ch not in escapes for ch in text):
        raise ValueError(f"the sample prompt {text!r} has characters these snippets do not escape")
    return '"' + "".join(escapes.get(ch, ch) for ch in text) + '"'


# What llama_ops.cpp registers: a program that calls only these runs with cpp/ as it is.
OUR_KERNELS = ("llama::update_cache", "llama::custom_sdpa", "slm::update_cache", "slm::sdpa")


def _check_contract(manifest: dict) -> None:
    from ...errors import SlmExportError

    if "logit_rows" in manifest["io"]["methods"]["forward"]["inputs"]:
        raise SlmExportError(
            "this .pte was made by an earlier slm-export: its forward(tokens, input_pos, logit_rows) is not ExecuTorch's "
            "LLM runner contract, so the app README would not fit it. Export it again (slm-export --target executorch "
            "...), then bundle that; slm-export's own runner still runs this one")


def app_readme(manifest: dict) -> str:
    _check_contract(manifest)
    m, io = manifest["model"], manifest["io"]
    extra = manifest.get("target_extra", {})
    ops = extra.get("custom_ops", [])
    own = [op for op in ops if op.startswith("slm::")]
    version = _version(manifest)
    kv, chunk = io["kv_layout"], io["prefill_chunk"]
    tok = manifest.get("tokenizer", {})
    template = tok.get("chat_template") or "(none: feed the raw prompt)"
    eos = tok.get("eos_token_ids", [])
    missing = sorted(op for op in ops if op not in OUR_KERNELS)
    cpp_note = (f"\nThis export also calls {', '.join(f'`{op}`' for op in missing)} (`--kv-bits 8`), which these kernels "
                "do not implement: link ExecuTorch's `extension/llm/custom_ops` built from source (its pip copy links "
                "libtorch), or export with `--kv-bits 32` or `16`.\n" if missing else "")
    cpp_build, stop = cpp_build_command(), " ".join(str(i) for i in eos)
    prompt = (format_chat(tok["chat_template"], SAMPLE_QUESTION, tok.get("bos_token"), tok.get("eos_token"))
              if tok.get("chat_template") else SAMPLE_QUESTION)
    prompt_note = ("the question in the chat template; the template holds the special tokens"
                   if tok.get("chat_template") else "no chat template: the raw text")
    native = dict(prompt=_string_literal(prompt), prompt_note=prompt_note, version=version)
    if own:
        python_title = "slm-export's torch-free runner: ExecuTorch's Python TextLLMRunner has no slm:: kernels"
        python = _OUR_PYTHON.format(vocab=m["vocab_size"], prompt=prompt, prompt_note=prompt_note, chunk=chunk,
                                    stop=set(eos) or "{-1}")
        python_note = ""
    else:
        python_title = "ExecuTorch's TextLLMRunner"
        python = _RUNNER_PYTHON.format(prompt=prompt, prompt_note=prompt_note, stop_text=tok.get("eos_token") or "")
        python_note = (f"\n`pip install executorch=={version}` (its wheel has `TextLLMRunner` and pulls in torch). In "
                       f"executorch {version},\na token that ends inside a multi-byte UTF-8 character (an emoji split over "
                       "two tokens) makes the Python\nbinding raise `UnicodeDecodeError` from the callback.\n")
    meta_rows = "\n".join(f"| `{name}` | {value} |" for name, value in io.get("runner_metadata", {}).items())
    own_note = (f"\n**This file also calls slm-export's own kernels** ({', '.join(f'`{op}`' for op in own)}: the fp16 KV "
                "cache of `--kv-bits 16`), which no ExecuTorch build has: compile `cpp/llama_ops.cpp` (with "
                "`cpp/attention.h`, C++17) into your app. Beside ExecuTorch's LLM custom ops (a source build with "
                "`TextLLMRunner`), add `-DSLM_EXPORT_OWN_OPS_ONLY` so that it registers only the `slm::` ops (a second "
                "registration of a `llama::` op aborts at load); without them, compile it as it is (it registers both, as "
                "`cpp/generate.cpp` below does). ExecuTorch's prebuilt Android AAR and iOS frameworks cannot take these "
                "kernels: for those apps, export with `--kv-bits 32` (the default).\n"
                if own else "\nNothing of slm-export's own: every kernel is in ExecuTorch's builds.\n")
    return f"""# {manifest['source'].get('name') or manifest['architecture']} for ExecuTorch ({manifest['quant']['label']})

Made by slm-export {manifest['versions'].get('slm-export')} with executorch {manifest['versions'].get('executorch')}.
Every file's sha256 is in `manifest.json`; `slm-export inspect .` checks them.

| | |
|---|---|
| model | `model.pte`: ExecuTorch's LLM runner contract (`forward` and the metadata methods), XNNPACK delegate |
| runtime | {_runtime_row(own, version)} |
| tokenizer | `tokenizer.json` (Hugging Face tokenizers format; ExecuTorch's runners read it as it is) |
| max context | {manifest['max_context']} tokens (the KV cache is inside the program: {kv['bytes'] / MB:.0f} MB) |
| stop tokens | {eos} (also in the file: `get_eos_ids`) |
| vocab | {m['vocab_size']} |

## The program

`model.pte` follows the contract of ExecuTorch's LLM runner (`TextLLMRunner`, the C++ behind Android's
`LlmModule` and the iOS `TextRunner`): given only `model.pte` and `tokenizer.json`, those runners load it and
answer (Python, C++, Kotlin and Swift below).

`forward(tokens, input_pos) -> logits`

- `tokens` int64 `[1, n]`, 1 <= n <= {chunk}: the new tokens. A longer prompt goes in chunks of at most {chunk}
  (the runners do this themselves: `get_max_seq_len`).
- `input_pos` int64 `[1]`: how many tokens are already in the cache (0 for a new conversation).
- output: `logits` float32 `[1, {m['vocab_size']}]`, the last token's.

`logits(rows) -> logits` (slm-export's; the runners never call it): `rows` int64 `[k]`, rows of the tokens the
last `forward` call appended (`0..n-1` for all); output float32 `[k, {m['vocab_size']}]`. Every position's logits
(perplexity, scoring a text): load it from the same program as `forward`, whose KV cache it shares.

The KV cache lives in the program and is written in place: keep one loaded program per conversation, and
start a new conversation by calling again with `input_pos = 0` (nothing needs clearing; the runners' `reset()`
does this). The runners stop at `get_eos_ids` (and hand the stop token's text, e.g. `{tok.get('eos_token') or ''}`, to
their callback as the last piece) and stay within `get_max_context_len` in one `generate` call;
across the calls of a conversation keep the total under it yourself: ExecuTorch {version}'s runner does not
check it when `get_max_seq_len` is below `get_max_context_len`, and a call past the end fails
(`llama::update_cache` checks its bounds) rather than answering.

| metadata method | value |
|---|---|
{meta_rows}

## What an app links

{_kernel_rows(manifest)}
{own_note}
## Prompt format

```
{template}
```

## Python ({python_title})

```python
{python}
```
{python_note}
## C++ (ExecuTorch's TextLLMRunner)

```cpp
{_RUNNER_CPP.format(**native)}
```

Build ExecuTorch {version} from source with its LLM preset (`cmake --preset llm` in a checkout of tag `v{version}`:
the runner, the XNNPACK backend, the LLM custom ops and the quantized kernels) and link `answer.cpp` as its
`examples/models/llama` links `llama_main` (`extension_llm_runner`, `tokenizers`, `custom_ops`, `quantized_ops_lib`,
`optimized_native_cpu_ops_lib`, `xnnpack_backend`; kernels and backends whole-archive). The pip wheel has neither
the runner's headers nor its library, so this program was not compiled where this bundle was made; the Python
above runs the same runner.

## C++ without the runner (`{CPP_EXAMPLE}`)

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
prompt = {prompt!r}  # {prompt_note}
print(*Tokenizer.from_file('tokenizer.json').encode(prompt, add_special_tokens=False).ids)
EOF
./generate model.pte 32 {stop} < prompt_ids.txt > answer_ids.txt   # the generated token ids
python -c "from tokenizers import Tokenizer; print(Tokenizer.from_file('tokenizer.json').decode([int(t) for t in open('answer_ids.txt').read().split()]))"
```
{cpp_note}
## Android (Kotlin, ExecuTorch's LlmModule)

```kotlin
{_KOTLIN.format(version=version, prompt=_string_literal(prompt, kotlin=True), prompt_note=prompt_note)}
```

`build.gradle.kts`: `implementation("org.pytorch:executorch-android:{version}")` (its AAR has the XNNPACK backend,
the LLM custom ops and the quantized kernels). Written against the `LlmModule`, `LlmGenerationConfig` and
`LlmCallback` API of ExecuTorch {version}; not compiled or run where this bundle was made (no Android toolchain
there).

## iOS / macOS (Swift, ExecuTorch's TextRunner)

```swift
{_SWIFT.format(**native)}
```

Written against the `TextRunner` and `Config` API of ExecuTorch {version}'s `ExecuTorchLLM` (ExecuTorch publishes
each release's Swift package on a branch `swiftpm-<version>`; `TextRunner` is marked experimental, so Xcode warns);
not compiled or run where this bundle was made (no Apple toolchain there).
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
//   build: README.md, section "C++ without the runner"      run: ./generate model.pte MAX_NEW_TOKENS [STOP_ID ...] < prompt_ids.txt
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

// forward(tokens [1, n], input_pos [1]): appends n tokens at cache position `pos` and returns the
// greedy choice after the last of them.
static int64_t next_token(Module& module, const slm::FileMappings& file, std::vector<int64_t>& tokens, int64_t pos) {{
  auto ids = from_blob(tokens.data(), {{1, static_cast<int>(tokens.size())}}, ScalarType::Long);
  auto at = from_blob(&pos, {{1}}, ScalarType::Long);
  auto result = module.forward({{EValue(*ids), EValue(*at)}});
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
  if (!arenas.reserve(module, {{"forward"}}) || module.load_method("forward", arenas.allocator()) != Error::Ok) {{
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
