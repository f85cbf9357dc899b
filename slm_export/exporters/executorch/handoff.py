"""The app developer's README for an ExecuTorch bundle, written from the recorded method signature."""
from __future__ import annotations


def _runtime_row(ops: list[str]) -> str:
    ours = [op for op in ops if op.startswith("slm::")]
    if ours:  # an fp16 KV cache (--kv-bits 16): our kernels, not in ExecuTorch's prebuilt libraries
        return (f"ExecuTorch >= 1.5 with the XNNPACK backend, the quantized kernels (`quantized_decomposed::embedding_byte`, "
                f"`embedding_4bit`) and slm-export's ops {', '.join(f'`{op}`' for op in ours)} (fp16 KV cache): compile "
                "`llama_ops.cpp` and `attention.h` from slm-export's `slm_export/runtimes/native/` into your app beside "
                "ExecuTorch (C++17; ExecuTorch's prebuilt Android AAR and iOS frameworks do not have these ops, so for "
                "those export with `--kv-bits 32`). On Linux (a Pi, a laptop) the pip wheel's C++ runtime runs it without "
                "torch with those files and `runner.cpp`: what `slm-export bench` measured")
    return ("ExecuTorch >= 1.5 with the XNNPACK backend, the LLM custom ops (`llama::update_cache`, `llama::custom_sdpa`) "
            "and the quantized kernels (`quantized_decomposed::embedding_byte`, `embedding_4bit`); the prebuilt Android AAR "
            "and iOS frameworks of ExecuTorch's LLM demo apps include all three. On Linux (a Pi, a laptop) the pip wheel's "
            "C++ runtime runs it without torch, with the two custom ops from slm-export's `slm_export/runtimes/native/` "
            "(`llama_ops.cpp`, `attention.h`, `runner.cpp`: what `slm-export bench` measured)")


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
