"""torch.export -> Edge -> XNNPACK delegate -> .pte, tuned for lowering time on small CPUs.

Where the time goes (SmolLM2-135M, 2 cores): every Edge and XNNPACK pass re-traces every node with
fake tensors, so lowering time is roughly passes x nodes x the cost of a node. These choices keep it
down:
  - the graph is decomposed once, not three times (the partitioner's `ops_to_not_decompose` below,
    and a module with nothing left for the decomposition table): ~11 s saved per pass;
  - the module is written so XNNPACK takes each layer's dense part whole (norms and rope as small
    matmuls, reshapes with -1, no dynamic-length slices): one delegate per layer;
  - XNNPACK's preprocess runs only the linear-conversion pass (its `dqlinear_partitioner` mode),
    not its 17-pass pipeline meant for vision graphs (batch norm, conv, upsampling, layouts), none
    of which occur in this module.
  - the dim-order legalization walk at `to_executorch` is skipped (~8 s): the graph was made without
    dim-order ops (`_skip_dim_order`), and only `to_backend`'s fresh config turned the walk back on;
  - the shortcuts of edge_passes.py (figures for the int4 export on an AVX2 EPYC, 2026-12-05): torch's
    view -> view_copy rewrite and ExecuTorch's op-rewriting Edge passes walk the graph twice instead
    of seven times; XNNPACK's linear conversion re-traces only what it changed (nothing here, ~10 s);
    spec propagation at `to_executorch` reuses the delegates' outputs instead of re-running every
    delegated node (~8 s); torchao's quant ops learn their output shapes once per input shape instead
    of running their Python decomposition at every node of every walk (~25 s).
  All of them build the same bytes as the stock passes (tests/test_executorch.py, four graphs).

Memory: the module's quantized weights are the quantizer's codes (module.py, quant.py), and the
lowering copies no constant wholesale (edge_passes.py's `constants_shared_with_preprocess`, and
`compact_dependency_closure` for the partitioner's O(nodes^2) sets). XNNPACK serializes each delegated
constant into new bytes (int4 packed two to a byte), kept until the .pte is written; each weight's
codes are freed as soon as its delegate is serialized (`delegated_weights_freed`, the export's
`release_weights`), so the two are not held in full at once; int4 codes are packed in row blocks
(`int4_packed_in_row_blocks`, `embedding_packed_in_row_blocks`), not through whole-weight temporaries;
and `write_pte` writes the program's pieces as they are, never joined into one buffer.
"""
from __future__ import annotations

from pathlib import Path

import torch

# Prefill runs in chunks of at most this many tokens. Memory planning sizes every activation for the
# largest shape the method accepts, so this bounds the runtime arena (logits alone are chunk x vocab x 4
# bytes) while keeping prefill matmuls wide enough to be efficient.
PREFILL_CHUNK = 128


def _partitioner():
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.backend.compile_spec_schema import CompileSpec
    from executorch.exir.backend.partitioner import DelegationSpec
    from executorch.exir.delegate import executorch_call_delegate

    from .weight_only import weight_only_linear_config

    stock, weight_only = weight_only_linear_config()
    configs = [weight_only if c is stock else c for c in ALL_PARTITIONER_CONFIGS]

    class LinearGraphXnnpackPartitioner(XnnpackPartitioner):
        """XNNPACK partitioner whose delegates skip the vision-graph passes at preprocess time, that
        lets `to_edge_transform_and_lower` decompose the graph once instead of three times, and that
        takes int8 weight-only linears."""

        def __init__(self):
            super().__init__(configs=configs)  # int8 weight-only linears too (weight_only.py)
            self.delegation_spec = DelegationSpec("XnnpackBackend", [CompileSpec("dqlinear_partitioner", b"")])

        def ops_to_not_decompose(self, ep):
            ops, check = super().ops_to_not_decompose(ep)
            # With a per-node check, to_edge_transform_and_lower decomposes the whole graph two more
            # times (to keep only the preserved nodes that pass it): 2 x ~11 s of re-tracing here.
            # When every such node passes, the check changes nothing, and without it the graph is
            # decomposed once. sym_size (in every dynamic-shape graph) has a no-op entry in the
            # decomposition table that would alone trigger another full pass, so it is kept too.
            # After lowering, ExecuTorch asks again to check what was left undelegated: answer as
            # XNNPACK does, since sym_size is meant to stay.
            nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
            if check is None or any(n.target is executorch_call_delegate for n in nodes):
                return ops, check
            preserved = set(ops)
            if all(check(n) for n in nodes if n.target in preserved):
                return [*ops, torch.ops.aten.sym_size.int], None
            return ops, check

    return LinearGraphXnnpackPartitioner()


def chunk_for(max_context: int) -> int:
    """The most tokens one forward call takes (the runner metadata's get_max_seq_len)."""
    return min(PREFILL_CHUNK, max_context)


def export_program(module, max_context: int, stock_passes: bool = False, shortcuts: dict | None = None,
                   metadata: dict | None = None, release_weights: bool = False, freeable: list | None = None):
    """The ExecuTorch program (in memory) for `module`'s two methods (module.py), with dynamic chunk
    length; they share the KV cache and the hidden rows (MemoryPlanningPass's share_mutable_buffers).

    `metadata`: constant methods (name -> int, bool or list of ints), as ExecuTorch's LLM runner reads
    them (contract.py). stock_passes=True runs torch's and ExecuTorch's passes as
    shipped, without the shortcuts of edge_passes.py (tests check that both build the same bytes).
    `shortcuts`, if given, receives each shortcut's Shortcut (applied or not, how often taken).
    release_weights=True: once lowered, the module's weights and the delegates' copies of theirs are
    dropped (`release_delegated_weights`): the module cannot be exported again. `freeable`: weights
    (torch tensors, each read by one delegate) whose memory is freed as soon as XNNPACK has
    serialized them (edge_passes.delegated_weights_freed)."""
    import contextlib

    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.capture._capture import patch_forward
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim, export

    from .contract import FORWARD, LOGITS
    from .edge_passes import (compact_dependency_closure, constants_shared_with_preprocess, delegate_outputs_reused,
                              delegated_weights_freed, embedding_packed_in_row_blocks, fused_edge_passes, idle_linear_conversion_skipped,
                              int4_packed_in_row_blocks,
                              quant_op_shapes_memoized)

    chunk = chunk_for(max_context)
    seq, rows = Dim("seq", min=1, max=chunk), Dim("rows", min=1, max=chunk)
    config = EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)
    shortcuts = {} if shortcuts is None else shortcuts

    def use(fast: contextlib.ExitStack, name: str, shortcut) -> None:
        if not stock_passes:
            shortcuts[name] = fast.enter_context(shortcut())

    with contextlib.ExitStack() as fast:
        use(fast, "quant_op_shapes_memoized", quant_op_shapes_memoized)
        with torch.no_grad():
            programs = {FORWARD: export(module, (torch.zeros(1, 2, dtype=torch.long), torch.tensor([0])),
                                        dynamic_shapes=({1: seq}, None), strict=False)}
            with patch_forward(module, type(module).logits):
                programs[LOGITS] = export(module, (torch.tensor([0, 1]),), dynamic_shapes=({0: rows},), strict=False)
        use(fast, "fused_edge_passes", fused_edge_passes)
        use(fast, "idle_linear_conversion_skipped", idle_linear_conversion_skipped)
        use(fast, "constants_shared_with_preprocess", constants_shared_with_preprocess)
        use(fast, "compact_dependency_closure", compact_dependency_closure)
        use(fast, "int4_packed_in_row_blocks", int4_packed_in_row_blocks)
        if freeable:
            use(fast, "delegated_weights_freed", lambda: delegated_weights_freed(freeable))
        edge = to_edge_transform_and_lower(programs, partitioner=[_partitioner()], compile_config=config,
                                           constant_methods=metadata or None)
        del programs  # torch.export's programs hold every weight (release_weights frees them)
    if release_weights:
        release_delegated_weights(module, edge)
    if not stock_passes:
        # to_backend hands on a fresh config, whose _skip_dim_order=False adds LegalizePortableDimOrderPass
        # to to_executorch: a full re-trace (~8 s here) of a graph that has no dim-order ops to legalize.
        edge.compile_config = config
    with contextlib.ExitStack() as fast:
        use(fast, "delegate_outputs_reused", delegate_outputs_reused)
        use(fast, "embedding_packed_in_row_blocks", embedding_packed_in_row_blocks)
        return edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            passes=[QuantFusionPass()],  # quantized embedding -> quantized_decomposed::embedding_{byte,4bit}
            do_quant_fusion_and_const_prop=True,
            # the KV cache and hidden rows: one allocation both methods read and write (memory id 2)
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        ))


def release_delegated_weights(module, edge) -> None:
    """Drop every reference this process holds to the weights XNNPACK has serialized.

    After lowering, each delegate's weights exist twice: as the delegate's serialized bytes (what
    `to_executorch` writes) and as the tensors they were made from, held by the module and by the
    delegate's `original_module` (the partition's program, kept for debugging and re-lowering). The
    latter become meta tensors (shape and dtype kept, no data), so the codes are freed before
    `to_executorch` builds the program: at int4, a byte per weight. Weights outside the delegates
    (the quantized embedding) stay referenced by the program itself."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule
    from torch import nn

    def meta(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    for method in edge.methods:
        for sub in edge.exported_program(method).graph_module.modules():
            if isinstance(sub, LoweredBackendModule):
                program = sub.original_module
                for store in (program.state_dict, program.constants):
                    for name, t in list(store.items()):
                        if isinstance(t, torch.Tensor):
                            store[name] = meta(t)
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(meta(p), requires_grad=False))


# The .pte is written in pieces of this size. Linux 6.x page caches keep a file written in large
# write() calls as large folios, and a read fault on an mmapped large folio maps all of it: the
# runner's embedding lookups (one row per token) then mapped the whole 28 MB table of SmolLM2-135M
# for 128 random prompt tokens, against 8 MB (the kernel's 64 KiB fault-around per row) for the
# same bytes written in 64 KiB pieces or copied with `cp` (measured on 6.18, ext4).
WRITE_PIECE = 64 * 1024


class _SmallWrites:
    """A binary file whose writes reach the OS in pieces of at most WRITE_PIECE bytes."""

    def __init__(self, raw):
        self._raw = raw

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), WRITE_PIECE):
            piece = view[i:i + WRITE_PIECE]
            while piece:  # a raw write may take less than it was given
                piece = piece[self._raw.write(piece):]
        return len(view)


def write_pte(program, path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        program.write_to_file(_SmallWrites(f))
