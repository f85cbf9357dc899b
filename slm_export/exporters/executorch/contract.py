"""ExecuTorch's LLM runner contract, which every .pte of this target follows, and the kernels an app links.

ExecuTorch's own runner (`TextLLMRunner`, extension/llm/runner: the C++ behind the Android `LlmModule`
and the iOS runner) runs a .pte given only the file and a tokenizer. What executorch 1.5.1's runner
needs (llm_runner_helper.cpp, text_decoder_runner.cpp, text_prefiller.cpp, io_manager.h):

- a method `forward` with exactly two inputs, tokens [1, n] int64 and the cache position [1] int64,
  and one output, logits; it samples from the last row ([1, vocab] here, the last token's);
- the metadata methods (constant methods, as ExecuTorch's export_llm writes them):
  `get_max_seq_len` (required: the most tokens one call takes; the runner feeds a longer prompt in
  chunks of this many), `get_max_context_len` (the KV cache's length), `use_kv_cache`,
  `enable_dynamic_shape` (true: a prompt chunk in one call, not token by token), `get_eos_ids`
  (replace the tokenizer's EOS as stop ids), `use_sdpa_with_kv_cache`; `get_bos_id` and
  `get_vocab_size` it takes from the tokenizer instead, and `get_n_layers` it does not read: they
  are written as export_llm writes them, for other runners;
- no method named `prefill` or `decode`: the runner would run those instead.
With `get_max_seq_len` below `get_max_context_len`, 1.5.1's runner checks only that each prompt
fits the cache, not the position a conversation has reached: past max context the program's
`llama::update_cache` fails the call (it checks its bounds) rather than writing out of bounds.

The second method, `logits`, is ours (module.py): every row's logits of the last forward call, for
parity and perplexity. The runner never loads it.
"""
from __future__ import annotations

FORWARD, LOGITS = "forward", "logits"


def runner_metadata(decoder, options, chunk: int, sdpa: bool) -> dict:
    """The constant methods of the .pte: name -> value (int, bool, or a list of ints for get_eos_ids)."""
    meta = {
        "get_max_seq_len": chunk,
        "get_max_context_len": options.max_context,
        "get_vocab_size": decoder.vocab_size,
        "get_n_layers": decoder.num_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": sdpa,  # attention is an SDPA op over the cache inside the program
        "enable_dynamic_shape": True,
    }
    if options.bos_token_id is not None:
        meta["get_bos_id"] = options.bos_token_id
    if options.eos_token_ids:
        meta["get_eos_ids"] = list(options.eos_token_ids)
    return meta


# Operator namespaces -> the library that registers their kernels (op names as the .pte lists them)
_LIBRARIES = (
    ("aten::", "executorch", "ExecuTorch's portable / optimized kernels (kernels/portable, kernels/optimized)"),
    ("executorch_prim::", "executorch", "ExecuTorch's runtime (primitive ops, always registered)"),
    ("quantized_decomposed::", "executorch", "ExecuTorch's quantized kernels (kernels/quantized)"),
    ("llama::", "executorch", "ExecuTorch's LLM custom ops (extension/llm/custom_ops)"),
    ("slm::", "slm-export", "slm-export's kernels: cpp/llama_ops.cpp built with -DSLM_EXPORT_OWN_OPS_ONLY beside "
                            "ExecuTorch's LLM custom ops (or alone, without ExecuTorch's, it registers llama:: too)"),
)


def kernel_libraries(operators: set[str]) -> list[dict]:
    """What an app must link to run a program whose operators are `operators`, besides the XNNPACK
    backend that runs its delegates: [{library, from, ops}], in the order of _LIBRARIES."""
    out = []
    for prefix, origin, library in _LIBRARIES:
        ops = sorted(op for op in operators if op.startswith(prefix))
        if ops:
            out.append({"library": library, "from": origin, "ops": ops})
    unknown = sorted(op for op in operators if not op.startswith(tuple(p for p, _, _ in _LIBRARIES)))
    if unknown:
        out.append({"library": "unknown (not a library slm-export knows)", "from": "?", "ops": unknown})
    return out


def own_kernels(operators: set[str]) -> list[str]:
    """The program's operators no ExecuTorch library provides (our fp16-cache ops)."""
    return sorted(op for op in operators if op.startswith("slm::"))
