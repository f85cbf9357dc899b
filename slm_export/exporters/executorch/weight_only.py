"""int8 weight-only linears (fp32 activations x int8 per-channel weights) inside the XNNPACK delegate.

executorch 1.5.1's partitioner knows three precisions for a linear: fp32, static quantization (a
quantized input and output) and dynamic quantization (8da4w / 8da8w). A dequantized weight feeding a
linear whose input stays fp32 is classified as static and then refused ("Expected act input to be
dequant node"), which leaves the linear outside the delegate, where the runtime has no kernel for
torchao's dequantize_affine. XNNPACK has the kernel (xnn_fully_connected_nc_f32_qc8w) and ExecuTorch's
serializer already writes an fp32 input with a per-channel int8 filter (op_linear.py), so this config
only lets the partitioner hand such a linear over. Measured: the .pte's logits equal the quantized
PyTorch program's to ~1e-5 on tiny models of every family (tests/test_executorch.py).

What the serializer cannot carry, ExecuTorchExporter.check refuses or the module avoids: zero points
(it drops them, so weights must be symmetric), int4 groups (XNNPACK's fp32-activation kernels take
none) and a bias (it wants a quantized input for one; torch_parts.split_biases adds it separately).
"""
from __future__ import annotations


def weight_only_linear_config():
    """LinearConfig, plus fp32-input linears whose weight is dequantized per channel."""
    from executorch.backends.xnnpack.partition.config.gemm_configs import GEMMConfig, LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_per_channel, is_quant, tag_as_implicit_q_dq
    from executorch.backends.xnnpack.utils.utils import get_input_node

    class WeightOnlyLinearConfig(LinearConfig):
        def get_deps(self, node, ep):
            weight, activation = get_input_node(node, self.weight_idx), get_input_node(node, self.act_idx)
            if not is_dequant(weight) or is_dequant(activation) or any(is_quant(u) for u in node.users):
                return super().get_deps(node, ep)  # fp32, static or dynamic quantization: as before
            has_bias = len(node.args) > self.bias_idx and node.args[self.bias_idx] is not None
            if has_bias or not is_per_channel(weight):
                return False, []
            # the dequant, the int8 weight, its scales and zero points, as for a quantized weight
            valid, deps = GEMMConfig._get_weight_deps(self, node, ep, ConfigPrecisionType.STATIC_QUANT)
            if valid:
                for dep in deps:
                    if is_dequant(dep):
                        tag_as_implicit_q_dq(dep)
            return valid, deps

    return LinearConfig, WeightOnlyLinearConfig
