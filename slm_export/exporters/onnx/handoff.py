"""The app developer's README for an ONNX bundle: how to load and run it, with the recorded names."""
from __future__ import annotations

from .genai import PACKAGE, TESTED_WITH

# The Kotlin and C# programs are written against onnxruntime-genai's Java and C# APIs in its source at
# this version (git a0c04eb); the calls they make are those of the 0.18.0 Python binding the tests run.
# Neither is compiled or run here (no JVM / .NET SDK with the native library on this machine).
API_SOURCE = "0.16.0-dev (git a0c04eb, 2026-08-22)"


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
    genai = (manifest.get("app_runtimes") or {}).get(PACKAGE)
    genai_row = (f"`genai_config.json`: `og.Model(\".\")` opens this folder as it is ({genai['tested_with']}; "
                 "see [onnxruntime-genai](#onnxruntime-genai))" if genai and genai.get("config")
                 else (genai or {}).get("why", "no `genai_config.json` (exported before slm-export wrote one): re-export"))
    return f"""# {manifest['source'].get('name') or manifest['architecture']} for ONNX Runtime ({manifest['quant']['label']})

Made by slm-export {manifest['versions'].get('slm-export')} with onnxruntime {manifest['versions'].get('onnxruntime')}.
Every file's sha256 is in `manifest.json`; `slm-export inspect .` checks them.

| | |
|---|---|
| model | `model.onnx` + `model.onnx.data` (keep them side by side) |
| runtime | {runtime}, CPU execution provider (uses com.microsoft MatMulNBits, GroupQueryAttention) |
| tokenizer | `tokenizer.json` (Hugging Face tokenizers format) |
| onnxruntime-genai | {genai_row} |
| max context | {manifest['max_context']} tokens |
| stop tokens | {eos} |
| layers / kv heads / head dim | {kv['layers']} / {kv['kv_heads']} / {kv['head_dim']} |
| vocab | {m['vocab_size']} |

## Inputs and outputs

- `input_ids` int64 `[1, n]`: the new tokens (the whole prompt first, then one token per step)
- `attention_mask` int64 `[1, past + n]`: all ones
- `logits_to_keep` int64 `[1]`: `1` = logits of the last position only (use this to generate); optional, `0` (every position) when not fed
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

{genai_section(manifest)}
## slm-export

```bash
slm-export generate . --prompt "What is the capital of France?"
slm-export verify .     # parity against PyTorch (needs the source model)
slm-export bench .      # latency and memory on this machine
```
"""


def genai_section(manifest: dict) -> str:
    """The onnxruntime-genai part of the README: whole programs that open this folder as it is."""
    genai = (manifest.get("app_runtimes") or {}).get(PACKAGE)
    if not genai or not genai.get("config"):
        why = (genai or {}).get("why") or "this folder has no genai_config.json (exported before slm-export wrote one)"
        return f"## onnxruntime-genai\n\nNot for this folder: {why}. Re-export it with slm-export to get one.\n"
    tok = manifest.get("tokenizer") or {}
    if not tok.get("present"):
        return ("## onnxruntime-genai\n\n`og.Model(\".\")` opens this folder (`genai_config.json`), but it has no "
                "tokenizer: feed token ids with `generator.append_tokens(ids)`.\n")
    chat = "chat_template.jinja" in genai.get("files", [])
    kv_note = (" The KV cache is int8 (`--kv-bits 8`): genai takes the dtype from the graph, whose "
               "GroupQueryAttention holds the calibrated scales." if manifest["io"]["kv_layout"].get("dtype") == "int8" else "")
    py_prompt = ('tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": question}]),\n'
                 '                                       template_str=Path("chat_template.jinja").read_text(),\n'
                 '                                       add_generation_prompt=True)' if chat else "question  # no chat template")
    kt_prompt = ('tokenizer.applyChatTemplate(File(folder, "chat_template.jinja").readText(),\n'
                 '                "[{\\"role\\": \\"user\\", \\"content\\": ${jsonString(question)}}]", null, true)'
                 if chat else "question  // no chat template")
    cs_prompt = ('tokenizer.ApplyChatTemplate(File.ReadAllText(Path.Combine(folder, "chat_template.jinja")),\n'
                 '    JsonSerializer.Serialize(new[] { new { role = "user", content = question } }), "", true)'
                 if chat else "question;  // no chat template")
    return f"""## onnxruntime-genai

This folder is also an onnxruntime-genai model folder: `genai_config.json` names the graph, its inputs and
outputs, the context length ({manifest['max_context']}), the stop tokens {tok.get('eos_token_ids')} and the
search defaults: greedy (`do_sample` false), as `slm-export generate` and `verify` run it; turn on sampling with
`set_search_options` if you want it. genai reads `{'`, `'.join(genai['files'])}`. It feeds no
`logits_to_keep`, so a prompt's forward computes the logits of every prompt position (the graph's default)
and genai reads the last.{kv_note}

### Python (tested)

A whole program, run in this folder (`python answer.py "your question"`). The tests run it as written on a
tiny model and on SmolLM2-135M-Instruct, where it answers "Paris" with exactly the tokens of
`slm-export generate`.

```python
# pip install onnxruntime-genai=={TESTED_WITH}   (tested with {TESTED_WITH}; it installs onnxruntime too)
import json
import sys
from pathlib import Path

import onnxruntime_genai as og

question = sys.argv[1] if len(sys.argv) > 1 else "What is the capital of France?"
model = og.Model(".")  # reads genai_config.json
tokenizer = og.Tokenizer(model)
prompt = {py_prompt}
ids = tokenizer.encode(prompt)
params = og.GeneratorParams(model)
params.set_search_options(max_length=min(len(ids) + 64, {manifest['max_context']}))  # the prompt + up to 64 new tokens
generator = og.Generator(model, params)
generator.append_tokens(ids)
stream = tokenizer.create_stream()
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
print()
```

### Kotlin (Android or JVM; not compiled here)

Written against the Java API of onnxruntime-genai {API_SOURCE}, package `ai.onnxruntime.genai`
(Android: the `com.microsoft.onnxruntime:onnxruntime-genai-android` AAR of the same version). Copy this
folder onto the device (e.g. into `filesDir`) and call `answer` off the main thread.

```kotlin
import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import ai.onnxruntime.genai.Tokenizer
import java.io.File

fun jsonString(s: String): String =
    "\\"" + s.replace("\\\\", "\\\\\\\\").replace("\\"", "\\\\\\"").replace("\\n", "\\\\n") + "\\""

fun answer(folder: String, question: String): String {{
    Model(folder).use {{ model ->
        Tokenizer(model).use {{ tokenizer ->
            val prompt = {kt_prompt}
            val ids = tokenizer.encode(prompt).use {{ it.getSequence(0) }}
            GeneratorParams(model).use {{ params ->
                params.setSearchOption("max_length", minOf(ids.size + 64, {manifest['max_context']}).toDouble())
                Generator(model, params).use {{ generator ->
                    generator.appendTokens(ids)
                    val out = StringBuilder()
                    tokenizer.createStream().use {{ stream ->
                        while (!generator.isDone()) {{
                            generator.generateNextToken()
                            out.append(stream.decode(generator.getLastTokenInSequence(0)))
                        }}
                    }}
                    return out.toString()
                }}
            }}
        }}
    }}
}}

fun main(args: Array<String>) {{
    println(answer(args.getOrElse(0) {{ "." }}, args.getOrElse(1) {{ "What is the capital of France?" }}))
}}
```

### C# (.NET 8; not compiled here)

Written against the C# API of onnxruntime-genai {API_SOURCE} (NuGet `Microsoft.ML.OnnxRuntimeGenAI`, the same
version). A whole program (`Program.cs`, top-level statements; `dotnet run -- FOLDER "your question"`):

```csharp
using System;
using System.IO;
using System.Text.Json;
using Microsoft.ML.OnnxRuntimeGenAI;

string folder = args.Length > 0 ? args[0] : ".";
string question = args.Length > 1 ? args[1] : "What is the capital of France?";
using var model = new Model(folder);
using var tokenizer = new Tokenizer(model);
string prompt = {cs_prompt};
using var sequences = tokenizer.Encode(prompt);
int[] ids = sequences[0].ToArray();
using var generatorParams = new GeneratorParams(model);
generatorParams.SetSearchOption("max_length", Math.Min(ids.Length + 64, {manifest['max_context']}));
using var generator = new Generator(model, generatorParams);
generator.AppendTokens(ids);
using var stream = tokenizer.CreateStream();
while (!generator.IsDone())
{{
    generator.GenerateNextToken();
    Console.Write(stream.Decode(generator.GetNextTokens()[0]));
}}
Console.WriteLine();
```

No Swift program: the source of onnxruntime-genai {API_SOURCE} has no Swift or Objective-C binding (its iOS
build is an xcframework of the C API), so there is no Swift API to state a version of; on iOS the Core ML
export (`slm-export --target coreml`) is the native path.
"""
