"""Build the ONNX decoder graph straight from a `Decoder` description.

Why build the graph by hand rather than trace PyTorch: tracing gives hundreds of small ops and a
lm_head that reaches its MatMul through a Transpose (so quantizers skip it). Writing the graph
lets us emit onnxruntime's fused CPU kernels directly, the way onnxruntime-genai's builder does:
  SkipSimplifiedLayerNormalization  residual add + RMSNorm in one kernel
  MatMulNBits                       int4/int8 weights, q|k|v fused into one MatMul
  GroupQueryAttention               rotary + KV-cache append + attention in one kernel; the KV
                                    buffers can be shared between steps (no copy per token)
Inputs and outputs follow onnxruntime-genai's names, so its tooling and app code recognise them:
  input_ids [batch, seq] int64, attention_mask [batch, total] int64,
  past_key_values.{i}.key/value [batch, kv_heads, past, head_dim] -> present.{i}.key/value,
  logits [batch, kept, vocab]; `logits_to_keep` (int64 [1]: 0 = all positions, 1 = the last only;
  optional, 0 when not fed). onnxruntime-genai runs the graph as it is (genai.py writes its config).
"""
from __future__ import annotations

import dataclasses
import sys
from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pathlib import Path

from ...architectures import Decoder, Linear
from ...quantize import QuantizedWeight, QuantPlan, QuantReport, QuantSpec, WeightEntry
from ...quantize.plan import EMBEDDING, LM_HEAD
from ...quantize.quantizer import linear_codes, linear_plan
from .quant import pack_matmul_nbits

OPSET = 23  # RMSNormalization (standard since opset 23) for the norms that have no residual
LOGITS_TO_KEEP_DEFAULT = 0  # when the caller does not feed logits_to_keep: all positions
MS = "com.microsoft"
EXTERNAL_MIN = 1024  # bytes (as sys.getsizeof counts them) from which an initializer goes to the data file


class _Graph:
    """Collects nodes and initializers; every helper returns its output name(s).

    With `data`, an open external-data file, every initializer of EXTERNAL_MIN bytes or more is
    written to it as it is made and only its place is kept, as onnx.save_model(save_as_external_data=True,
    size_threshold=EXTERNAL_MIN) would write it at the end: the same bytes, without the whole model's
    weights held in the graph first.
    """

    def __init__(self, data=None, location: str | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self.data, self.location = data, location

    def const(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        if self.data is not None and sys.getsizeof(b"") + array.nbytes >= EXTERNAL_MIN:  # onnx's own size test
            # The tensor never holds its bytes: protobuf keeps a cleared field's memory until the message dies.
            tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
            offset = self.data.tell()
            self.data.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).data)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
        else:
            tensor = numpy_helper.from_array(array, name)
        self.inits.append(tensor)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None, **attrs):
        self._n += 1
        name = name or f"{op_type}_{self._n}"
        outs = [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_named(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", name: str | None = None, **attrs):
        self._n += 1
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name or f"{op_type}_{self._n}", domain=domain, **attrs))
        return outputs


def named_linears(dec: Decoder) -> list[tuple[str, Linear]]:
    """(node name, Linear) of every matrix multiply the graph holds, in forward order (what `build`
    names them; verify's weight check reads them back by these names)."""
    out = []
    for i, layer in enumerate(dec.layers):
        gate, up = layer.gate_up.parts()
        out += [(f"layers.{i}.qkv_proj", layer.qkv), (f"layers.{i}.o_proj", layer.o), (f"layers.{i}.gate_proj", gate),
                (f"layers.{i}.up_proj", up), (f"layers.{i}.down_proj", layer.down)]
    return out + [("lm_head", Linear(dec.lm_head, None, [LM_HEAD]))]


class DecoderGraphBuilder:
    def __init__(self, dec: Decoder, spec: QuantSpec, plan: QuantPlan, codes: dict[str, QuantizedWeight],
                 data=None, location: str | None = None):
        self.dec, self.spec, self.plan, self.codes = dec, spec, plan, codes
        self.g = _Graph(data, location)
        self.report = QuantReport()
        self._packed: dict[str, tuple] = {}  # name -> (PackedWeight, initializer names): a table shared once
        # Writing to a data file, the codes of a weight are dropped once the graph no longer needs them
        # (the caller hands them over): at most one weight is held twice, as codes and packed.
        self._uses = Counter(s for _, lin in named_linears(dec) for s in dict.fromkeys(lin.sources)) \
            if data is not None else None

    def _pack(self, name: str, codes_of) -> tuple:
        """(PackedWeight, its initializers) of node `name`, packed from `codes_of()` the first time."""
        if name not in self._packed:
            pw, g = pack_matmul_nbits(codes_of()), self.g
            inputs = [g.const(f"{name}.qweight", pw.packed), g.const(f"{name}.scales", pw.scales)]
            if pw.zero_points is not None:
                inputs.append(g.const(f"{name}.zero_points", pw.zero_points))
            if self.g.data is not None:  # written: keep its shape and size, not its bytes
                pw = dataclasses.replace(pw, packed=np.broadcast_to(np.zeros((), np.uint8), pw.packed.shape))
            self._packed[name] = (pw, inputs)
        return self._packed[name]

    def _done_with(self, lin: Linear) -> None:
        if self._uses is None:
            return
        for source in dict.fromkeys(lin.sources):
            self._uses[source] -= 1
            if self._uses[source] == 0:
                self.codes.pop(source, None)

    # ------------------------------------------------------------------ weights

    def matmul(self, x: str, lin: Linear, name: str) -> str:
        """x @ W.T (+ bias), W as the plan stores it (MatMulNBits codes, or float)."""
        g, w = self.g, lin.weight
        n, k = w.shape
        plan = linear_plan(self.plan, lin)
        if plan.bits is None:
            wt = g.const(f"{name}.weight", np.ascontiguousarray(w.T))
            y = g.op("MatMul", [x, wt], name=name)
            entry = WeightEntry(name, lin.sources, [n, k], "float32 MatMul", None, None, w.nbytes, w.nbytes, plan.reason, lin.split)
        else:
            pw, inputs = self._pack(name, lambda: linear_codes(self.codes, lin))
            self._done_with(lin)
            # accuracy_level 4 = int8 activations (VNNI kernels); 0 = float activations (weight-only)
            level = 4 if self.spec.activations == "int8" else 0
            y = g.op("MatMulNBits", inputs=[x] + inputs, domain=MS, name=name,
                     K=k, N=n, bits=pw.bits, block_size=pw.block_size, accuracy_level=level)
            scheme = (f"int{pw.bits} MatMulNBits block={pw.block_size} {'sym' if plan.symmetric else 'asym'} "
                      f"acc={level} {plan.method}")
            entry = WeightEntry(name, lin.sources, [n, k], scheme, pw.bits, pw.block_size, w.nbytes, pw.nbytes,
                                plan.reason, lin.split)
        self.report.add(entry)
        if lin.bias is not None:
            y = g.op("Add", [y, g.const(f"{name}.bias", lin.bias)])
        return y

    def embedding(self, ids: str) -> str:
        g, table = self.g, self.dec.embed
        plan = self.plan[EMBEDDING]
        if plan.shares == LM_HEAD:
            # Tied and quantized alike: gather rows straight out of the lm_head's MatMulNBits
            # weights [vocab, blocks, bytes] (no copy, no Reshape that constant folding would
            # duplicate), so the table is stored and held in memory once.
            pw, (qweight, *_) = self._pack("lm_head", lambda: self.codes[LM_HEAD])
            scales = g.const("embed_tokens.scales", pw.scales.reshape(table.shape[0], -1, 1))
            rows = g.op("GatherBlockQuantized", [qweight, ids, scales], domain=MS, name="embed_tokens",
                        bits=pw.bits, block_size=pw.block_size, gather_axis=0, quantize_axis=2)
            x = g.op("Reshape", [rows, g.const("embed_shape", np.array([0, 0, -1], np.int64))])
            entry = WeightEntry("embed_tokens", [EMBEDDING], list(table.shape),
                                f"int{pw.bits} GatherBlockQuantized block={pw.block_size}", pw.bits, pw.block_size,
                                table.nbytes, pw.scales.nbytes, plan.reason, shares="lm_head")
        elif plan.bits is None:
            x = g.op("Gather", [g.const("embed_tokens.weight", table), ids], name="embed_tokens")
            entry = WeightEntry("embed_tokens", [EMBEDDING], list(table.shape), "float32 Gather",
                                None, None, table.nbytes, table.nbytes, plan.reason)
        else:
            # int8 per row: Gather the int8 rows and their scales, multiply.
            qw = self.codes[EMBEDDING]
            rows = g.op("Gather", [g.const("embed_tokens.qweight", qw.codes.astype(np.int8)), ids], name="embed_tokens")
            scales = g.op("Gather", [g.const("embed_tokens.scales", qw.scales.reshape(-1, 1)), ids])
            x = g.op("Mul", [g.op("Cast", [rows], to=TensorProto.FLOAT), scales])
            entry = WeightEntry("embed_tokens", [EMBEDDING], list(table.shape), f"int8 per-row Gather {plan.method}",
                                8, table.shape[1], table.nbytes, qw.codes.nbytes + qw.scales.nbytes, plan.reason)
        self.report.add(entry)
        if self.dec.embed_scale != 1.0:
            x = g.op("Mul", [x, g.const("embed_scale", np.array(self.dec.embed_scale, np.float32))])
        return x

    def skip_norm(self, branch: str, residual: str, weight: np.ndarray, name: str) -> tuple[str, str]:
        """(RMSNorm(residual + branch) * weight, residual + branch) in one kernel.

        The kernel's mean and inv_std_var outputs are left unnamed: asked for, they made this op a
        third slower (onnxruntime 1.32's profiler, SmolLM2-135M decode after 512 tokens: 544 against
        411 us per step over its 60 norms).
        """
        h, summed = f"{name}/out0", f"{name}/out3"
        self.g.op_named("SkipSimplifiedLayerNormalization", [branch, residual, self.g.const(name, weight)],
                        [h, "", "", summed], domain=MS, name=name, epsilon=self.dec.rms_eps)
        return h, summed

    # ------------------------------------------------------------------ graph

    def build(self) -> onnx.ModelProto:
        dec, g = self.dec, self.g
        eps = dec.rms_eps
        # seqlens_k (int32 [batch]) = tokens in the cache after this step - 1; total = mask width.
        mask_sum = g.op("ReduceSum", ["attention_mask", g.const("axes_1", np.array([1], np.int64))], keepdims=0)
        seqlens_k = g.op("Cast", [g.op("Sub", [mask_sum, g.const("one_i64", np.array(1, np.int64))])], to=TensorProto.INT32)
        total_len = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const("idx_1", np.array(1, np.int64))], axis=0)],
                         to=TensorProto.INT32)
        cos = g.const("cos_cache", dec.rope_cos.astype(np.float32))
        sin = g.const("sin_cache", dec.rope_sin.astype(np.float32))

        x = self.embedding("input_ids")
        residual, branch = x, None
        for i, layer in enumerate(dec.layers):
            p = f"layers.{i}"
            if branch is None:
                h = g.op("RMSNormalization", [residual, g.const(f"{p}.attn_norm", layer.attn_norm)],
                         axis=-1, epsilon=eps, name=f"{p}.attn_norm")
            else:
                h, residual = self.skip_norm(branch, residual, layer.attn_norm, f"{p}.attn_norm")
            qkv = self.matmul(h, layer.qkv, f"{p}.qkv_proj")
            attn_attrs = dict(num_heads=dec.num_heads, kv_num_heads=dec.num_kv_heads, scale=dec.attn_scale,
                              do_rotary=1, rotary_interleaved=0)
            if dec.attn_softcap:
                attn_attrs["softcap"] = dec.attn_softcap
            if layer.sliding_window and layer.sliding_window < dec.max_context:
                attn_attrs["local_window_size"] = layer.sliding_window
            attn, _, _ = g.op_named(
                "GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len, cos, sin],
                [f"{p}.attn/out0", f"present.{i}.key", f"present.{i}.value"], domain=MS, name=f"{p}.attn", **attn_attrs)
            branch = self.matmul(attn, layer.o, f"{p}.o_proj")
            if layer.post_attn_norm is not None:
                branch = g.op("RMSNormalization", [branch, g.const(f"{p}.post_attn_norm", layer.post_attn_norm)],
                              axis=-1, epsilon=eps)
            h, residual = self.skip_norm(branch, residual, layer.ffn_norm, f"{p}.ffn_norm")
            # gate and up as two MatMuls, not one fused MatMul + Split: same speed here, and the
            # Split's two outputs are extra [tokens, intermediate] buffers (23 MB more peak RSS
            # after a 512-token prompt on SmolLM2-135M).
            gate_lin, up_lin = layer.gate_up.parts()
            gate = self.matmul(h, gate_lin, f"{p}.gate_proj")
            up = self.matmul(h, up_lin, f"{p}.up_proj")
            if dec.activation == "silu":
                act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
            else:
                act = g.op("FastGelu", [gate], domain=MS)
            branch = self.matmul(g.op("Mul", [act, up]), layer.down, f"{p}.down_proj")
            if layer.post_ffn_norm is not None:
                branch = g.op("RMSNormalization", [branch, g.const(f"{p}.post_ffn_norm", layer.post_ffn_norm)],
                              axis=-1, epsilon=eps)

        h, _ = self.skip_norm(branch, residual, dec.final_norm, "final_norm")
        # Keep only the last `logits_to_keep` positions before the lm_head (0 keeps all): a prompt
        # of 512 tokens then costs one lm_head row, not 512.
        start = g.op("Neg", ["logits_to_keep"])
        h = g.op("Slice", [h, start, g.const("slice_end", np.array([np.iinfo(np.int64).max], np.int64)), g.const("slice_axis", np.array([1], np.int64))])
        # A tied lm_head is written as its own [hidden, vocab] weight, so it reaches MatMulNBits
        # directly (a Transpose of the embedding would hide it from quantizers and stay fp32).
        lm = Linear(dec.lm_head, None, [LM_HEAD])
        logits = self.matmul(h, lm, "lm_head")
        if dec.final_softcap:
            cap = g.const("final_softcap", np.array(dec.final_softcap, np.float32))
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap])]), cap])
        g.op_named("Identity", [logits], ["logits"])
        return self._model()

    def _model(self) -> onnx.ModelProto:
        dec, g = self.dec, self.g
        kv_shape = ["batch_size", dec.num_kv_heads, "past_sequence_length", dec.head_dim]
        present_shape = ["batch_size", dec.num_kv_heads, "total_sequence_length", dec.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "kept_sequence_length", dec.vocab_size])]
        for i in range(dec.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present_shape))
        inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
        # An input with an initializer of the same name is optional (onnxruntime: an overridable
        # initializer): a caller that does not feed it, like onnxruntime-genai, gets every position's
        # logits, the shape genai allocates for them. It was never a constant: nothing folds less.
        g.const("logits_to_keep", np.array([LOGITS_TO_KEEP_DEFAULT], np.int64))
        graph = helper.make_graph(g.nodes, f"{dec.architecture}_decoder", inputs, outputs, initializer=g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="slm-export")
        model.ir_version = 10
        return model


def build_decoder_graph(dec: Decoder, spec: QuantSpec, plan: QuantPlan, codes: dict[str, QuantizedWeight],
                        data_file: Path | None = None) -> tuple[onnx.ModelProto, QuantReport]:
    """The graph and its quant report; with `data_file`, its large initializers are written there as the
    graph is built (the model then refers to them by offset: save it with onnx.save_model(model, path))."""
    if data_file is None:
        builder = DecoderGraphBuilder(dec, spec, plan, codes)
        return builder.build(), builder.report
    with open(data_file, "xb") as data:
        builder = DecoderGraphBuilder(dec, spec, plan, codes, data, Path(data_file).name)
        return builder.build(), builder.report
