"""Run an optimum-onnx export with plain onnxruntime; runs inside the optimum_onnx venv, started by optimum_onnx.py.

    python optimum_onnx_child.py CONFIG_JSON      (see protocol.child_main)

The artifact is the folder `optimum-cli export onnx --task text-generation-with-past` wrote (or
`optimum-cli onnxruntime quantize` for int8): one .onnx file taking input_ids, attention_mask,
position_ids and past_key_values.{i}.key/value, returning logits and present.{i}.key/value.
It is driven the way optimum's ORTModelForCausalLM drives it on CPU (no IO binding: numpy in,
numpy out, each step's present.* fed back as the next past_key_values.*), without importing
torch, transformers or optimum, so the measured RSS is onnxruntime's and the model's.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from protocol import Session, child_main

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def onnx_file(artifact: str) -> Path:
    """The one .onnx file of the artifact folder (model.onnx, or model_quantized.onnx after quantize)."""
    path = Path(artifact)
    if path.is_file():
        return path
    files = sorted(path.glob("*.onnx"))
    if len(files) != 1:
        raise RuntimeError(f"expected one .onnx file in {path}, found {[f.name for f in files]}")
    return files[0]


class OrtSession(Session):
    def __init__(self, path: Path, threads: int):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.sess.get_inputs()}
        outputs = [o.name for o in self.sess.get_outputs()]
        for name in ("input_ids", "attention_mask"):
            if name not in inputs:
                raise RuntimeError(f"{path.name} has no `{name}` input (inputs: {list(inputs)})")
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = ["present." + n[len("past_key_values."):] for n in self.past_names]
        missing = [n for n in ["logits", *self.present_names] if n not in outputs]
        if not self.past_names or missing:
            raise RuntimeError(f"{path.name} is not a with-past decoder: no past inputs or missing outputs {missing}")
        self.out_names = ["logits", *self.present_names]
        self.has_position_ids = "position_ids" in inputs
        # Empty cache: [batch 1, kv heads, 0, head dim]; heads and head dim are fixed in optimum's export.
        self.empty = {}
        for n in self.past_names:
            shape, dtype = inputs[n].shape, _DTYPES.get(inputs[n].type)
            if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int) or dtype is None:
                raise RuntimeError(f"unsupported past input {n}: shape {shape}, type {inputs[n].type}")
            self.empty[n] = np.zeros((1, shape[1], 0, shape[3]), dtype=dtype)
        self.reset()

    def reset(self) -> None:
        self.past = dict(self.empty)
        self.pos = 0

    def _run(self, ids: list[int]) -> np.ndarray:
        n, p = len(ids), self.pos
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "attention_mask": np.ones((1, p + n), dtype=np.int64), **self.past}
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(p, p + n, dtype=np.int64)[None, :]
        logits, *present = self.sess.run(self.out_names, feeds)
        self.past = dict(zip(self.past_names, present))
        self.pos = p + n
        return logits[0]  # [n, vocab]

    def feed(self, ids: list[int]) -> np.ndarray:
        return self._run(ids)[-1]

    def feed_all(self, ids: list[int]) -> np.ndarray:
        return self._run(ids)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def open_session(artifact: str, threads: int):
    session = OrtSession(onnx_file(artifact), threads)
    # The exporter's versions from the venv's metadata (not imported: they would count in the RSS).
    versions = {"onnxruntime": ort.__version__, "optimum_onnx": _version("optimum-onnx"),
                "optimum": _version("optimum"), "transformers": _version("transformers"), "torch": _version("torch")}
    return session, versions


if __name__ == "__main__":
    sys.exit(child_main(open_session))
