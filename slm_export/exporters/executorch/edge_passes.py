"""ExecuTorch's ATen -> Edge passes, with neighbouring op-rewriting passes run as one graph walk.

Why: each of these passes is an `ExportPass` that rewrites a few ops but re-traces every node of
the graph with fake tensors to do it. With the dynamic chunk length every node carries symbolic
shapes, and one walk over SmolLM2-135M's ~3,300 nodes took ~9 s here (2 cores, AVX2 EPYC): six
such walks before partitioning were ~55 s of an export.

Each of them only overrides `call_operator` and ends in `super().call_operator(...)`, so a class
that inherits from several runs their rewrites one after the other on each op, in one walk: an op
that one pass emits (a rewritten op, or a cast it inserts) goes through the passes after it, as it
does when they run in turn. Only passes that are adjacent in ExecuTorch's order are fused, so the
order is unchanged. Graph-level passes between them run as before.

The fusion is checked, not assumed: tests lower four tiny models whose graphs differ most (an int4
Gemma-2, an int8 weight-only Qwen2, an int8-cache Llama, an fp16 Phi-3) with and without it and
compare the serialized programs byte for byte (tests/test_executorch.py).
"""
from __future__ import annotations

import contextlib


def _fused(*passes):
    """One ExportPass class that applies `passes`' call_operator rewrites in the given order."""
    from executorch.exir.pass_base import ExportPass

    for p in passes:
        if ExportPass not in p.__bases__ or "call_operator" not in vars(p):
            raise TypeError(f"{p.__name__} is not a plain call_operator ExportPass; it cannot be fused")
    return type("Fused" + "".join(p.__name__.removesuffix("Pass") for p in passes), passes, {"__module__": __name__})


@contextlib.contextmanager
def fused_edge_passes():
    """Within this block, `to_edge_transform_and_lower` walks the graph 2 times instead of 6 for
    these passes (ExecuTorch 1.5.1's list in executorch/exir/passes/__init__.py)."""
    from executorch.exir import EdgeCompileConfig
    from executorch.exir.passes import FoldRedundantDequantizeQuantizePass, ScalarToTensorPass, SymToTensorPass
    from executorch.exir.passes.normalize_transpose_pass import NormalizeTransposePass
    from executorch.exir.passes.prune_empty_tensors_pass import PruneEmptyTensorsPass
    from executorch.exir.passes.remove_mixed_type_operators import RemoveMixedTypeOperators
    from executorch.exir.passes.remove_noop_pass import RemoveNoopPass, RemoveToCopyPass
    from executorch.exir.passes.replace_broken_ops_with_function_ops_pass import ReplaceBrokenOpsWithFunctionalOpsPass
    from executorch.exir.passes.replace_sym_size_op_pass import ReplaceSymSizeOpPass
    from executorch.exir.program import _program

    stock_passes, stock_op_replace = _program._get_aten_to_edge_passes, _program.OpReplacePass
    stock_pre, _ = stock_passes(EdgeCompileConfig())
    expected = [ReplaceSymSizeOpPass, NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass,
                ScalarToTensorPass, SymToTensorPass, RemoveNoopPass, PruneEmptyTensorsPass, RemoveToCopyPass,
                FoldRedundantDequantizeQuantizePass, RemoveMixedTypeOperators]
    # The list holds its graph-level passes wrapped in functions (pass_result_wrapper). With another
    # ExecuTorch's list, run that list as it is.
    if [type(getattr(p, "__wrapped__", p)) for p in stock_pre] != expected:
        yield False
        return
    first = _fused(NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass, ScalarToTensorPass, SymToTensorPass)
    # OpReplacePass is appended by _generate_edge_program right after this list's last pass.
    last = _fused(RemoveMixedTypeOperators, stock_op_replace)

    def fused_passes(config):
        _, post = stock_passes(config)
        return [stock_pre[0], first(), *stock_pre[5:9]], post  # stock_pre[9] is fused into `last`

    _program._get_aten_to_edge_passes, _program.OpReplacePass = fused_passes, last
    try:
        yield True
    finally:
        _program._get_aten_to_edge_passes, _program.OpReplacePass = stock_passes, stock_op_replace
