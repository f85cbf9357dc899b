"""onnxruntime runner: IO binding with the KV cache kept in place between steps.

GroupQueryAttention accepts the same buffer as past and present, so the cache is one numpy array
per layer and tensor, written in place by the kernel: no copy of the cache per token.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import RUNTIMES
from .base import Runner


@RUNTIMES.register("onnxruntime")
class OnnxRunner(Runner):
    packages = ("onnxruntime",)

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        super().__init__(folder, manifest, threads)
        import onnxruntime as ort

        self._ort = ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # errors only: onnxruntime warns at every load that logits_to_keep's default (an initializer
        # that is also an input, graph.py) "will not be treated as constant"; it was never one
        opts.log_severity_level = 3
        kv = manifest["io"]["kv_layout"]
        try:
            self.session = ort.InferenceSession(str(self.folder / manifest["model_file"]), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own Fail/InvalidGraph types)
            if kv.get("dtype") != "int8":
                raise
            from ..errors import SlmExportError

            made = manifest.get("versions", {}).get("onnxruntime")
            raise SlmExportError(f"onnxruntime {ort.__version__} cannot load {self.folder}'s int8 KV cache "
                                 f"(GroupQueryAttention with k_scale/v_scale on CPU; exported with onnxruntime {made}): "
                                 f"upgrade onnxruntime, or re-export with --kv-bits 32 ({str(e).splitlines()[0][:200]})") from None
        self.layers, self.kv_heads, self.head_dim = kv["layers"], kv["kv_heads"], kv["head_dim"]
        self.kv_dtype = np.dtype(kv.get("dtype", "float32"))  # int8: --kv-bits 8 (scales live in the graph)
        self.capacity = 0
        self.cache: list[np.ndarray] = []
        self.binding = None
        # Per-step inputs prepared once: a step then only rebinds views, no new arrays (~0.3 ms/token).
        # logits_to_keep has a default in the graph (an overridable initializer, for onnxruntime-genai),
        # which bind_cpu_input cannot find by name; an OrtValue binds it.
        self._keep = {flag: ort.OrtValue.ortvalue_from_numpy(np.array([0 if flag else 1], np.int64))
                      for flag in (True, False)}
        self._mask = np.ones((1, self.max_context), np.int64)
        self._one_token = np.zeros((1, 1), np.int64)
        self._last_logits = np.zeros((1, 1, manifest["model"]["vocab_size"]), np.float32)
        self._last_logits_value = ort.OrtValue.ortvalue_from_numpy(self._last_logits)

    @staticmethod
    def import_sdk() -> None:
        import onnxruntime  # noqa: F401

    def reset(self, capacity: int) -> None:
        capacity = min(max(capacity, 1), self.max_context)
        shape = (1, self.kv_heads, capacity, self.head_dim)
        self.cache = [np.zeros(shape, self.kv_dtype) for _ in range(2 * self.layers)]
        self.capacity, self.position = capacity, 0
        self._bind_cache()

    def _bind_cache(self) -> None:
        self.binding = self.session.io_binding()
        self.binding.bind_output("logits")  # first, so it is get_outputs()[0]
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                value = self._ort.OrtValue.ortvalue_from_numpy(self.cache[2 * i + j])  # wraps, no copy
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", value)

    def _grow(self, needed: int) -> None:
        capacity = min(max(needed, 2 * self.capacity), self.max_context)
        grown = []
        for buf in self.cache:
            new = np.zeros((1, self.kv_heads, capacity, self.head_dim), self.kv_dtype)
            new[:, :, : self.position] = buf[:, :, : self.position]
            grown.append(new)
        self.cache, self.capacity = grown, capacity
        self._bind_cache()

    def forward(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        n = len(token_ids)
        self.check_room(n)
        total = self.position + n
        if total > self.capacity:
            self._grow(total)
        b = self.binding
        if n == 1:
            self._one_token[0, 0] = token_ids[0]
            ids = self._one_token
        else:
            ids = np.asarray([token_ids], dtype=np.int64)
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("attention_mask", self._mask[:, :total])
        b.bind_ortvalue_input("logits_to_keep", self._keep[all_logits])
        if all_logits:
            b.bind_output("logits")  # ORT allocates [1, n, vocab]
        else:  # the kernel writes the last row straight into our array: no output objects per step
            b.bind_ortvalue_output("logits", self._last_logits_value)
        self.session.run_with_iobinding(b)
        self.position = total
        if all_logits:
            return b.get_outputs()[0].numpy()[0]  # logits are bound first: see _bind_cache
        return self._last_logits[0].copy()
