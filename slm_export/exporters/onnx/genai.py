"""genai_config.json: the export folder (and so its bundle) opens in onnxruntime-genai as it is.

onnxruntime-genai (og.Model / og.Tokenizer / og.Generator) runs a decoder graph described by
genai_config.json beside it. Our graph already has what its CPU decoder expects (checked against
onnxruntime-genai 0.18.0 and its model builder, which makes the same kind of graph):
- its tensor names: input_ids, attention_mask (int64, [batch, past + new]), past_key_values.N.key /
  .value -> present.N.key / .value, [batch, kv_heads, sequence, head_dim], logits;
- GroupQueryAttention deriving seqlens_k (mask sum - 1) and total_sequence_length (mask width) from
  attention_mask in the graph, and its rotary from the graph's own cos/sin tables, so genai feeds no
  position_ids (it feeds only the inputs the graph has);
- past and present may be one buffer (past_present_share_buffer: genai allocates max_length positions
  once and the kernel writes new rows in place, as our runner does);
- logits_to_keep, which genai does not know, has a default in the graph (all positions: the
  [batch, new tokens, vocab] logits genai allocates; it reads the last row).
The int8 KV cache (--kv-bits 8) runs too: genai takes the cache dtype from the graph's past inputs,
and the scales live in the graph.

The model type is genai's generic "decoder" for every architecture: rotary, norms, soft-caps and
sliding windows are all inside the graph, and a family name would turn on genai's own handling of
that family (e.g. "phi3" rewinds LongRoPE at 4,097 tokens), which this graph does not need.
Search defaults are greedy decoding, what `slm-export generate` does and `verify` checks; the
model's own sampling settings are in generation_config.json (and the manifest's generation.sampling), not here.
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "genai_config.json"
PACKAGE = "onnxruntime-genai"
TESTED_WITH = "0.18.0"  # the version the config and the bundle README's Python program are tested with
# what og.Tokenizer reads from the folder (checked by moving each away): the chat template is read from
# chat_template.jinja, where transformers 5 saves it ("Empty chat template." without it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def genai_config(manifest: dict) -> dict:
    """genai_config.json for an export whose manifest is `manifest` (model, io, max_context, tokenizer)."""
    m, kv, tok = manifest["model"], manifest["io"]["kv_layout"], manifest.get("tokenizer") or {}
    # genai refuses an id outside the vocabulary (a config's default eos of another tokenizer); the model
    # cannot produce one anyway
    in_vocab = lambda i: isinstance(i, int) and 0 <= i < m["vocab_size"]  # noqa: E731
    eos = [i for i in tok.get("eos_token_ids") or [] if in_vocab(i)]
    if not eos:
        raise ValueError("no end-of-sequence token id in the vocabulary: onnxruntime-genai would never stop "
                         "before max_length")
    pad = tok.get("pad_token_id") if in_vocab(tok.get("pad_token_id")) else None
    model = {
        "type": "decoder",
        "context_length": manifest["max_context"],
        "vocab_size": m["vocab_size"],
        "eos_token_id": eos,
        # genai reads the last non-pad position's logits of a prompt; no pad token: the first eos (as its builder)
        "pad_token_id": eos[0] if pad is None else pad,
        "decoder": {
            "filename": manifest["model_file"],
            "session_options": {"log_id": PACKAGE, "provider_options": []},
            "head_size": kv["head_dim"],
            "hidden_size": m["hidden_size"],
            "num_attention_heads": m["heads"],
            "num_hidden_layers": kv["layers"],
            "num_key_value_heads": kv["kv_heads"],
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits",
                        "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
        },
    }
    if in_vocab(tok.get("bos_token_id")):
        model["bos_token_id"] = tok["bos_token_id"]
    search = {
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1,
        "max_length": manifest["max_context"], "min_length": 0,
        "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
        "past_present_share_buffer": bool(kv.get("buffer_sharing", True)),
    }
    return {"model": model, "search": search}


def write_genai_config(folder: Path, manifest: dict) -> dict:
    """Write genai_config.json into `folder`; returns the manifest's record of it (app_runtimes entry)."""
    tok = manifest.get("tokenizer") or {}
    reads = [CONFIG_FILE, manifest["model_file"], manifest["target_extra"]["data_file"]]
    if tok.get("present"):
        reads += [f for f in TOKENIZER_FILES if (Path(folder) / f).is_file()]
    try:
        config = genai_config(manifest)
    except ValueError as e:
        return {"config": None, "why": f"no {CONFIG_FILE} written: {e}"}
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return {
        "config": CONFIG_FILE,
        "files": reads,
        "tested_with": f"{PACKAGE} {TESTED_WITH}",
        "search": "greedy (do_sample false), max_length = max context",
        **({} if tok.get("present") else
           {"note": "no tokenizer: og.Tokenizer cannot open this folder; feed token ids (generator.append_tokens)"}),
    }
