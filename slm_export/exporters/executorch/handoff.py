"""The app developer's README for an ExecuTorch bundle, written from the recorded method signature."""
from __future__ import annotations


def app_readme(manifest: dict) -> str:
    m, io = manifest["model"], manifest["io"]
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
| runtime | ExecuTorch >= 1.5 with the XNNPACK backend, the LLM custom ops (`llama::update_cache`, `llama::custom_sdpa`) and the quantized kernels (`quantized_decomposed::embedding_byte`, `embedding_4bit`); the prebuilt Android AAR and iOS frameworks of ExecuTorch's LLM demo apps include all three. On Linux (a Pi, a laptop) the pip wheel's C++ runtime runs it without torch, with the two custom ops from slm-export's `slm_export/runtimes/native/` (`llama_ops.cpp`, `attention.h`, `runner.cpp`: what `slm-export bench` measured) |
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

## Python (executorch's runtime bindings)

```python
import torch
from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers llama:: kernels
from executorch.kernels import quantized  # noqa: F401  registers quantized embedding kernels
from executorch.runtime import Runtime
from tokenizers import Tokenizer

tok = Tokenizer.from_file("tokenizer.json")
forward = Runtime.get().load_program("model.pte").load_method("forward")
ids = tok.encode("<your prompt, formatted with the chat template>", add_special_tokens=False).ids
pos, logits = 0, None
for i in range(0, len(ids), {chunk}):
    chunk = ids[i:i + {chunk}]
    logits = forward.execute([torch.tensor([chunk]), torch.tensor([pos]), torch.tensor([len(chunk) - 1])])[0]
    pos += len(chunk)
out = []
for _ in range(64):
    next_id = int(logits[-1].argmax())
    if next_id in {set(eos) or '{-1}'}:
        break
    out.append(next_id)
    logits = forward.execute([torch.tensor([[next_id]]), torch.tensor([pos]), torch.tensor([0])])[0]
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
