"""KV-cache scales for onnxruntime-genai's builder, calibrated as slm-export calibrates its own.

    python ortgenai_calibrate.py CONFIG_JSON     (runs inside the ortgenai venv; started by ortgenai.py)

The builder's int8 KV cache (`kv_cache_quant_scheme=int8_per_channel`) needs a scale file it does not
make. This makes one the way slm-export's `--kv-bits 8` does (slm_export/exporters/onnx/kv_cache.py):
the fp32-cache int4 model runs the last CALIBRATION tokens of the shipped passage in onnxruntime, and
each (layer, kv head, channel) gets max |cached value| * margin / 127. So both int8 caches have the
same text, margin and granularity. CONFIG: {"artifact", "passage", "tokens", "margin", "out_json"}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main() -> int:
    cfg = json.loads(sys.argv[1])
    folder = Path(cfg["artifact"])
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    head_dim = genai["decoder"]["head_size"]
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(Path(cfg["passage"]).read_text(),
                                                                     add_special_tokens=False).ids[-cfg["tokens"]:]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    names = []
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, head_dim), np.float32)
            names.append(inp.name.replace("past_key_values", "present"))
        elif inp.name not in feeds:
            raise SystemExit(f"calibration: unexpected input {inp.name} in {folder / 'model.onnx'}")
    present = dict(zip(names, session.run(names, feeds)))
    layers = len(names) // 2
    scale = lambda a: np.maximum(np.abs(a).max(axis=2) * cfg["margin"] / 127, 1e-6).reshape(-1).tolist()  # noqa: E731
    scales = {"k_scales": [scale(present[f"present.{i}.key"]) for i in range(layers)],
              "v_scales": [scale(present[f"present.{i}.value"]) for i in range(layers)]}
    # No "qmax": the builder would rescale the scales to its own divisor (128 for int8); these are
    # already what the graph should hold, threshold / 127 as slm-export's.
    Path(cfg["out_json"]).write_text(json.dumps({"scales": scales, "tokens": len(ids)}))
    print(json.dumps({"layers": layers, "tokens": len(ids)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
