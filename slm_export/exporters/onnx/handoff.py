"""The app developer's README for an ONNX bundle: how to load and run it, with the recorded names."""
from __future__ import annotations


def app_readme(manifest: dict) -> str:
    m, kv = manifest["model"], manifest["io"]["kv_layout"]
    tok = manifest.get("tokenizer", {})
    template = tok.get("chat_template") or "(none: feed the raw prompt)"
    eos = tok.get("eos_token_ids", [])
    ort_version = manifest["versions"].get("onnxruntime")
    int8_kv = kv.get("dtype") == "int8"  # --kv-bits 8: GroupQueryAttention's int8 cache, scales in the graph
    runtime = (f"ONNX Runtime with GroupQueryAttention's int8 KV cache on CPU (made and checked with {ort_version})"
               if int8_kv else "ONNX Runtime >= 1.22")
    np_kv, kv_type = ("np.int8", "int8") if int8_kv else ("np.float32", "float32")
    kt_kv = ("ByteBuffer.allocateDirect(0), longArrayOf(1, {h}, 0, {d}), OnnxJavaType.INT8" if int8_kv
             else "FloatBuffer.allocate(0), longArrayOf(1, {h}, 0, {d})").format(h=kv["kv_heads"], d=kv["head_dim"])
    kv_note = ("\n  The cache is int8: the kernel quantizes new rows with the per-channel scales stored in the graph "
               "(`layers.{i}.attn.k_scale` / `v_scale`), so start from zeros of dtype int8 and never rescale it yourself."
               if int8_kv else "")
    return f"""# {manifest['source'].get('name') or manifest['architecture']} for ONNX Runtime ({manifest['quant']['label']})

Made by slm-export {manifest['versions'].get('slm-export')} with onnxruntime {manifest['versions'].get('onnxruntime')}.
Every file's sha256 is in `manifest.json`; `slm-export inspect .` checks them.

| | |
|---|---|
| model | `model.onnx` + `model.onnx.data` (keep them side by side) |
| runtime | {runtime}, CPU execution provider (uses com.microsoft MatMulNBits, GroupQueryAttention) |
| tokenizer | `tokenizer.json` (Hugging Face tokenizers format) |
| max context | {manifest['max_context']} tokens |
| stop tokens | {eos} |
| layers / kv heads / head dim | {kv['layers']} / {kv['kv_heads']} / {kv['head_dim']} |
| vocab | {m['vocab_size']} |

## Inputs and outputs

- `input_ids` int64 `[1, n]`: the new tokens (the whole prompt first, then one token per step)
- `attention_mask` int64 `[1, past + n]`: all ones
- `logits_to_keep` int64 `[1]`: `1` = logits of the last position only (use this to generate)
- `past_key_values.{{i}}.key` / `.value` {kv_type} `[1, {kv['kv_heads']}, past, {kv['head_dim']}]`, i = 0..{kv['layers'] - 1}: start with `past = 0`
- outputs: `logits` float32 `[1, kept, {m['vocab_size']}]`, `present.{{i}}.key` / `.value`: feed them back as the next step's past.
  To avoid a copy per token, bind one buffer `[1, {kv['kv_heads']}, capacity, {kv['head_dim']}]` per tensor as both past and
  present with IO binding; GroupQueryAttention writes the new rows in place.{kv_note}

## Prompt format

Chat template (Jinja, as in `tokenizer_config.json`):

```
{template}
```

## Python

```python
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer

tok = Tokenizer.from_file("tokenizer.json")
sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
ids = tok.encode("<your prompt, formatted with the chat template>", add_special_tokens=False).ids
past = {{f"past_key_values.{{i}}.{{k}}": np.zeros((1, {kv['kv_heads']}, 0, {kv['head_dim']}), {np_kv})
        for i in range({kv['layers']}) for k in ("key", "value")}}
out, new = [], ids
for _ in range(64):
    total = len(ids) + len(out)
    res = sess.run(None, {{"input_ids": np.array([new], np.int64), "attention_mask": np.ones((1, total), np.int64),
                          "logits_to_keep": np.array([1], np.int64), **past}})
    next_id = int(res[0][0, -1].argmax())
    if next_id in {set(eos) or '{-1}'}:
        break
    out.append(next_id)
    past = {{name.replace("present", "past_key_values"): v for name, v in zip([o.name for o in sess.get_outputs()][1:], res[1:])}}
    new = [next_id]
print(tok.decode(out))
```

## Kotlin (ONNX Runtime Android, `com.microsoft.onnxruntime:onnxruntime-android`)

```kotlin
val env = OrtEnvironment.getEnvironment()
val session = env.createSession(File(dir, "model.onnx").absolutePath, OrtSession.SessionOptions())
var past: Map<String, OnnxTensor> = (0 until {kv['layers']}).flatMap {{ i -> listOf("key", "value").map {{ k ->
    "past_key_values.$i.$k" to OnnxTensor.createTensor(env, {kt_kv}) }} }}.toMap()
var newIds: LongArray = promptIds          // from your tokenizer (tokenizer.json)
var total = newIds.size
var previous: OrtSession.Result? = null    // holds the present tensors we feed back as past
val output = mutableListOf<Long>()
val eos = setOf({', '.join(f'{e}L' for e in eos)})
for (step in 0 until 64) {{
    val inputs = past + mapOf(
        "input_ids" to OnnxTensor.createTensor(env, arrayOf(newIds)),
        "attention_mask" to OnnxTensor.createTensor(env, arrayOf(LongArray(total) {{ 1L }})),
        "logits_to_keep" to OnnxTensor.createTensor(env, longArrayOf(1)))
    val res = session.run(inputs)
    previous?.close()
    previous = res
    val logits = (res.get("logits").get() as OnnxTensor).floatBuffer   // [1, 1, {m['vocab_size']}]
    val next = (0 until {m['vocab_size']}).maxBy {{ logits.get(it) }}.toLong()
    if (next in eos) break
    output += next
    past = (0 until {kv['layers']}).flatMap {{ i -> listOf("key", "value").map {{ k ->
        "past_key_values.$i.$k" to (res.get("present.$i.$k").get() as OnnxTensor) }} }}.toMap()
    newIds = longArrayOf(next); total += 1
}}
```

## slm-export

```bash
slm-export generate . --prompt "What is the capital of France?"
slm-export verify .     # parity against PyTorch (needs the source model)
slm-export bench .      # latency and memory on this machine
```
"""
