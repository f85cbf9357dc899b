"""Shortcuts through torch's, ExecuTorch's and torchao's export passes: fewer and cheaper graph walks,
and (from `constants_shared_with_preprocess` on) less memory while XNNPACK partitions, preprocesses
and packs, and while `to_executorch` packs the embedding.

Each is a context manager that patches one thing for the duration of an export, checks first that
the installed versions are the ones it was written against (else it stands aside), and builds the
same bytes as the stock path (tests/test_executorch.py compares four graphs both ways).

The first: ExecuTorch's ATen -> Edge passes, with neighbouring op-rewriting passes run as one graph walk.

Why: each of these passes is an `ExportPass` that rewrites a few ops but re-traces every node of
the graph with fake tensors to do it. With the dynamic chunk length every node carries symbolic
shapes, and one walk over SmolLM2-135M's ~3,300 nodes took ~9 s here (2 cores, AVX2 EPYC): six
such walks before partitioning were ~55 s of an export.

Each of them only overrides `call_operator` and ends in `super().call_operator(...)`, so a class
that inherits from several runs their rewrites one after the other on each op, in one walk: an op
that one pass emits (a rewritten op, or a cast it inserts) goes through the passes after it, as it
does when they run in turn. Only passes that are adjacent in ExecuTorch's order are fused, so the
order is unchanged, with one exception: torch's view -> view_copy rewrite (its own walk, ~10 s) joins
the first fused walk, moving it after ReplaceSymSizeOpPass, a graph-level pass that only renames
sym_size targets (the two touch disjoint ops, so they commute). Graph-level passes run as before.

XNNPACK's preprocessing has the same kind of walk: its linear conversion (the one pass our
partitioner asks for) re-traces every delegate's graph after rewriting [add]mm into linear, and our
graphs have no [add]mm. `idle_linear_conversion_skipped()` skips the re-trace when the rewrite
changed nothing (~10 s). And `to_executorch`'s spec propagation re-traces the top-level graph,
running every delegate call on fake tensors, that is every delegated node once more (~9 s), to learn
output shapes the delegate nodes already carry: `delegate_outputs_reused()` takes those.

The fusion is checked, not assumed: tests lower four tiny models whose graphs differ most (an int4
Gemma-2, an int8 weight-only Qwen2, an int8-cache Llama, an fp16 Phi-3) with and without it and
compare the serialized programs byte for byte (tests/test_executorch.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class Shortcut:
    """Whether a shortcut applies to the installed ExecuTorch/torchao (on), and how often it was taken."""

    on: bool
    count: int = 0


def _view_copy_pass():
    """torch's ReplaceViewOpsWithViewCopyOpsPass (the same two rules) as a `call_operator` rewrite."""
    import torch
    from executorch.exir.pass_base import ExportPass
    from torch._export.passes.replace_view_ops_with_view_copy_ops_pass import (
        _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS, get_view_copy_of_view_op)

    class ViewCopyPass(ExportPass):
        def call_operator(self, op, args, kwargs, meta):
            if op in _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS:
                op = _NON_FUNCTIONAL_OPS_TO_FUNCTIONAL_OPS[op]
            elif isinstance(op, torch._ops.OpOverload) and (view_copy := get_view_copy_of_view_op(op._schema)):
                op = view_copy
            return super().call_operator(op, args, kwargs, meta)

    return ViewCopyPass


class _NoPass:
    """Stands in for a pass whose rewrite runs inside a fused walk."""

    def __call__(self, graph_module):
        from torch.fx.passes.infra.pass_base import PassResult

        return PassResult(graph_module, False)


def _fused(*passes):
    """One ExportPass class that applies `passes`' call_operator rewrites in the given order."""
    from executorch.exir.pass_base import ExportPass

    for p in passes:
        if ExportPass not in p.__bases__ or "call_operator" not in vars(p):
            raise TypeError(f"{p.__name__} is not a plain call_operator ExportPass; it cannot be fused")
    return type("Fused" + "".join(p.__name__.removesuffix("Pass") for p in passes), passes, {"__module__": __name__})


@contextlib.contextmanager
def fused_edge_passes():
    """Within this block, `to_edge_transform_and_lower` walks the graph 2 times instead of 7 for
    these passes (torch's view -> view_copy and ExecuTorch 1.5.1's list in executorch/exir/passes/__init__.py)."""
    from executorch.exir import EdgeCompileConfig
    from executorch.exir.passes import FoldRedundantDequantizeQuantizePass, ScalarToTensorPass, SymToTensorPass
    from executorch.exir.passes.normalize_transpose_pass import NormalizeTransposePass
    from executorch.exir.passes.prune_empty_tensors_pass import PruneEmptyTensorsPass
    from executorch.exir.passes.remove_mixed_type_operators import RemoveMixedTypeOperators
    from executorch.exir.passes.remove_noop_pass import RemoveNoopPass, RemoveToCopyPass
    from executorch.exir.passes.replace_broken_ops_with_function_ops_pass import ReplaceBrokenOpsWithFunctionalOpsPass
    from executorch.exir.passes.replace_sym_size_op_pass import ReplaceSymSizeOpPass
    from executorch.exir.program import _program
    from torch._export.passes import ReplaceViewOpsWithViewCopyOpsPass

    stock_passes, stock_op_replace = _program._get_aten_to_edge_passes, _program.OpReplacePass
    stock_pre, _ = stock_passes(EdgeCompileConfig())
    expected = [ReplaceSymSizeOpPass, NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass,
                ScalarToTensorPass, SymToTensorPass, RemoveNoopPass, PruneEmptyTensorsPass, RemoveToCopyPass,
                FoldRedundantDequantizeQuantizePass, RemoveMixedTypeOperators]
    # The list holds its graph-level passes wrapped in functions (pass_result_wrapper). With another
    # ExecuTorch's list, run that list as it is.
    if ([type(getattr(p, "__wrapped__", p)) for p in stock_pre] != expected
            or _program.ReplaceViewOpsWithViewCopyOpsPass is not ReplaceViewOpsWithViewCopyOpsPass):
        yield False
        return
    first = _fused(_view_copy_pass(), NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass,
                   ScalarToTensorPass, SymToTensorPass)
    # OpReplacePass is appended by _generate_edge_program right after this list's last pass.
    last = _fused(RemoveMixedTypeOperators, stock_op_replace)

    def fused_passes(config):
        _, post = stock_passes(config)
        return [stock_pre[0], first(), *stock_pre[5:9]], post  # stock_pre[9] is fused into `last`

    _program._get_aten_to_edge_passes, _program.OpReplacePass = fused_passes, last
    _program.ReplaceViewOpsWithViewCopyOpsPass = _NoPass  # its rewrite runs first in `first`
    try:
        yield True
    finally:
        _program._get_aten_to_edge_passes, _program.OpReplacePass = stock_passes, stock_op_replace
        _program.ReplaceViewOpsWithViewCopyOpsPass = ReplaceViewOpsWithViewCopyOpsPass


@contextlib.contextmanager
def _swapped(owner, name: str, stock, replacement, taken: Shortcut):
    """`owner.<name>` is `replacement` within the block, if it is `stock` (the version the shortcut was
    written for; otherwise it is left alone and the Shortcut yielded is off)."""
    if getattr(owner, name) is not stock:
        yield Shortcut(on=False)
        return
    setattr(owner, name, replacement)
    try:
        yield taken
    finally:
        setattr(owner, name, stock)


def _graph_key(graph) -> list:
    return [(n.name, n.op, n.target, repr(n.args), repr(n.kwargs)) for n in graph.nodes]


@contextlib.contextmanager
def idle_linear_conversion_skipped():
    """Within this block, XNNPACK's preprocessing re-traces a delegate's graph after its linear
    conversion only when the conversion changed that graph. Yields a Shortcut counting the skips."""
    from executorch.backends.xnnpack import xnnpack_preprocess
    from executorch.backends.transforms.addmm_mm_to_linear import apply_addmm_mm_to_linear_transform
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from torch.fx.passes.infra.pass_base import PassResult

    class ConvertToLinearWhenNeeded(ConvertToLinearPass):
        def call(self, graph_module):
            # The stock pass rewrites each [add]mm/bmm of a linear, then applies this transform, then
            # re-traces. With none of those ops and nothing changed by the transform, skip the re-trace.
            if not any(n.target in self.targets for n in graph_module.graph.nodes):
                before = _graph_key(graph_module.graph)
                graph_module.graph = apply_addmm_mm_to_linear_transform(graph_module.graph)
                if _graph_key(graph_module.graph) == before:
                    taken.count += 1
                    return PassResult(graph_module, False)
            return super().call(graph_module)

    taken = Shortcut(on=True)
    with _swapped(xnnpack_preprocess, "ConvertToLinearPass", ConvertToLinearPass, ConvertToLinearWhenNeeded,
                  taken) as result:
        yield result


@contextlib.contextmanager
def delegate_outputs_reused():
    """Within this block, SpecPropPass's re-trace takes a delegate call's output (fake tensors) from
    the node's metadata, set when `to_backend` made the node, instead of running the delegated graph.
    Yields a Shortcut counting the delegate calls not re-run."""
    from executorch.exir.delegate import executorch_call_delegate
    from executorch.exir.pass_base import ExportPass, ProxyValue
    from executorch.exir.passes import spec_prop_pass
    from torch.utils import _pytree as pytree

    class DelegateOutputsReused(ExportPass):
        def _fx(self, kind, target, args, kwargs, meta):
            if target is not executorch_call_delegate or "val" not in meta.data:
                return super()._fx(kind, target, args, kwargs, meta)
            # ExportPass._fx without the interpreter call (which would run the delegated graph)
            res_data = meta.data["val"]
            taken.count += 1  # (the test fails if an ExecuTorch no longer calls _fx here)
            args_proxy, kwargs_proxy = pytree.tree_map_only(ProxyValue, lambda x: x.proxy, (args, kwargs))
            res_proxy = self.tracer.create_proxy(kind, target, args_proxy, kwargs_proxy)
            res_proxy.node.meta.update(meta.data)
            self.tracer.set_metadata(res_proxy.node, res_data)
            return ProxyValue(res_data, res_proxy)

    taken = Shortcut(on=True)
    with _swapped(spec_prop_pass, "ExportPass", ExportPass, DelegateOutputsReused, taken) as result:
        yield result


def _tensor_meta(t) -> tuple:
    return tuple(str(s) for s in t.shape), tuple(str(s) for s in t.stride()), t.dtype, t.device


@dataclass(frozen=True)
class _EmptyLike:
    """What a fake output was (shape, strides, dtype, device), to make another like it."""

    shape: tuple
    stride: tuple
    dtype: object
    device: object

    @classmethod
    def of(cls, t) -> "_EmptyLike":
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

    def make(self):
        import torch

        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


@contextlib.contextmanager
def quant_op_shapes_memoized():
    """Within this block, torchao's quantize/dequantize/choose_qparams ops compute their output's shape
    once per input shape and arguments, not once per node and per graph walk.

    torchao defines them as Python decompositions (CompositeImplicitAutograd). Tracing and every
    re-tracing pass run that Python on fake tensors (symbolic shapes) to learn what each node
    outputs: ~20 small ops per node, for ~850 such nodes in SmolLM2-135M 8da4w, every walk. Under
    the Python dispatcher (which tracing enables) they run our kernel instead: on the first call with
    given input shapes, strides, dtypes and arguments it runs torchao's own decomposition and records
    the outputs' shapes, strides and dtypes; later calls with the same inputs (within the same fake
    mode) make empty tensors of those. Real tensors always run torchao's code. Yields a Shortcut
    counting the calls answered from what was recorded.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _pytree as pytree

    ops = [torch.ops.torchao.choose_qparams_affine.default, torch.ops.torchao.quantize_affine.default,
           torch.ops.torchao.dequantize_affine.default]
    cia = torch._C.DispatchKey.CompositeImplicitAutograd
    if any(cia in op.py_kernels for op in ops):  # someone else overrides them: leave them alone
        yield Shortcut(on=False)
        return
    taken = Shortcut(on=True)

    def memoized(op):
        outputs: dict = {}  # input key -> the outputs as _EmptyLike (in torchao's pytree structure)

        def kernel(*args, **kwargs):
            flat = pytree.tree_leaves((args, kwargs))
            fakes = [a for a in flat if isinstance(a, FakeTensor)]
            if not fakes or len(fakes) != sum(isinstance(a, torch.Tensor) for a in flat):
                return op._op_dk(cia, *args, **kwargs)  # real tensors: torchao's code
            # the mode itself, not its id: the key keeps it alive, so no later mode can reuse its id
            key = (fakes[0].fake_mode,) + tuple(_tensor_meta(a) if isinstance(a, torch.Tensor) else repr(a)
                                                for a in flat)
            if key not in outputs:
                out = op._op_dk(cia, *args, **kwargs)
                outputs[key] = pytree.tree_map_only(torch.Tensor, _EmptyLike.of, out)
                return out
            taken.count += 1
            return pytree.tree_map_only(_EmptyLike, _EmptyLike.make, outputs[key])
        return kernel

    for op in ops:
        op.py_impl(cia)(memoized(op))
    try:
        yield taken
    finally:
        for op in ops:
            del op.py_kernels[cia]
            op._dispatch_cache.clear()


@contextlib.contextmanager
def constants_shared_with_preprocess():
    """Within this block, the copy of each delegate's program that `to_backend` hands to XNNPACK's
    preprocessing shares the program's constant tensors instead of copying them.

    ExecuTorch deep-copies every partition's program before preprocessing any ("in case backends change
    graph inside preprocess"), so all delegated weights existed twice at once: +135 MB of int8 codes for
    SmolLM2-135M int4, every fp32 weight for a float program. XNNPACK changes only the copy's graph
    and reads the constants (to serialize them into new bytes); the graph is still copied, the
    tensors are not. Yields a Shortcut counting the programs copied so.
    """
    import copy

    import torch
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir.backend.backend_details import BackendDetails

    name = "copy_exported_program_for_preprocess"
    stock = vars(BackendDetails).get(name)
    if stock is None or name in vars(XnnpackBackend):  # not the ExecuTorch this was written for
        yield Shortcut(on=False)
        return
    taken = Shortcut(on=True)

    def copy_sharing_constants(cls, edge_program, compile_specs):
        tensors = [*edge_program.state_dict.values(), *edge_program.constants.values()]
        taken.count += 1
        # deepcopy takes what its memo holds as already copied: the same tensor objects, in a new graph
        return copy.deepcopy(edge_program, {id(t): t for t in tensors if isinstance(t, torch.Tensor)})

    setattr(XnnpackBackend, name, classmethod(copy_sharing_constants))
    try:
        yield taken
    finally:
        delattr(XnnpackBackend, name)


# Rows of an int4 weight packed at a time by `int4_packed_in_row_blocks` (bounds its scratch memory).
PACK_ROWS_BYTES = 16 * 1024 * 1024


@contextlib.contextmanager
def int4_packed_in_row_blocks():
    """Within this block, XNNPACK packs each int4 weight's codes two to a byte a block of rows at a time.

    The stock `convert_to_qc4w` makes whole-weight temporaries (the codes as uint8, plus 8, the shifted
    half): about 2.5 bytes per weight at once, 0.65 GB for Llama-3.2-1B's lm_head, the export's peak.
    Row blocks keep them to PACK_ROWS_BYTES; the packed bytes are the same. Yields a Shortcut
    counting the weights packed so."""
    import torch
    import torch.nn.functional as F
    from executorch.backends.xnnpack.operators.node_visitor import NodeVisitor

    stock = vars(NodeVisitor).get("convert_to_qc4w")

    def convert_to_qc4w(inp):
        lo, hi = inp.min().item(), inp.max().item()
        assert -8 <= lo and hi <= 7, f"convert_to_qc4w: [min,max] out of [-8, 7] range, got [{lo}, {hi}]"
        if inp.ndim != 2:
            inp = inp.squeeze()
        assert inp.ndim == 2, f"convert_to_qc4w: expecting input tensor to be 2d, got {inp.ndim}"
        oc, ic = inp.shape
        packed = torch.empty(oc, (ic + 1) // 2, dtype=torch.uint8)
        step = max(1, PACK_ROWS_BYTES // max(ic, 1))
        for start in range(0, oc, step):
            rows = inp[start:start + step].to(torch.uint8)
            rows += 8
            if ic % 2:
                rows = F.pad(rows, (0, 1, 0, 0), value=8)  # the stock pads the codes with 0: +8 above
            packed[start:start + step] = rows[:, 1::2] << 4 | rows[:, ::2]
        taken.count += 1
        return packed

    if not isinstance(stock, staticmethod):  # not the ExecuTorch this was written for
        yield Shortcut(on=False)
        return
    taken = Shortcut(on=True)
    NodeVisitor.convert_to_qc4w = staticmethod(convert_to_qc4w)
    try:
        yield taken
    finally:
        NodeVisitor.convert_to_qc4w = stock


@contextlib.contextmanager
def embedding_packed_in_row_blocks():
    """Within this block, `to_executorch`'s constant propagation packs an int4 embedding table two
    codes to a byte a block of rows at a time (ExecuTorch's `_pack_embedding_weight` makes
    whole-table temporaries, 2 bytes per code: 0.5 GB for Llama-3.2-1B's table). Same bytes; other
    widths go to the stock kernel. Yields a Shortcut counting the tables packed so."""
    import torch

    try:
        from executorch.exir.passes._quant_patterns_and_replacements import _pack_embedding_weight as op
        stock = op._backend_fns[None]
    except (ImportError, AttributeError, KeyError):  # not the ExecuTorch this was written for
        yield Shortcut(on=False)
        return
    taken = Shortcut(on=True)

    def pack(weight, bitwidth):
        if bitwidth != 4 or weight.ndim != 2 or weight.shape[1] % 2:
            return stock(weight, bitwidth)
        rows, dim = weight.shape
        packed = torch.empty(rows, dim // 2, dtype=torch.uint8)
        step = max(1, PACK_ROWS_BYTES // max(dim, 1))
        for start in range(0, rows, step):
            pairs = weight[start:start + step].add(8).view(torch.uint8).view(-1, dim // 2, 2)
            packed[start:start + step] = pairs[:, :, 0] << 4 | pairs[:, :, 1]
        taken.count += 1
        return packed

    op._backend_fns[None] = pack
    try:
        yield taken
    finally:
        op._backend_fns[None] = stock


@contextlib.contextmanager
def delegated_weights_freed(freeable: list):
    """Within this block, the memory of each tensor in `freeable` is freed as soon as XNNPACK's
    preprocessing has serialized the delegate that reads it.

    Every holder of a weight (the module, torch.export's programs, the Edge program, the delegate's
    copy) refers to one storage; resizing that storage to nothing frees the codes for all of them
    (a later read fails loudly: an empty storage, not stale bytes). So the lowering holds at once
    the codes of the delegates still to come and the serialized bytes of those done, not both in
    full. `freeable` must hold only weights that one delegate reads, in torch's own memory (numpy's
    cannot be resized): quant.quantized_weights(owned=...) makes them. Yields a Shortcut counting
    the tensors freed."""
    import torch
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    stock = vars(XnnpackBackend).get("preprocess")
    if not isinstance(stock, staticmethod):  # not the ExecuTorch this was written for
        yield Shortcut(on=False)
        return
    owners = {t.untyped_storage().data_ptr(): t for t in freeable}
    taken = Shortcut(on=True)

    def preprocess(edge_program, compile_specs):
        result = stock.__func__(edge_program, compile_specs)
        for t in [*edge_program.state_dict.values(), *edge_program.constants.values()]:
            owner = owners.pop(t.untyped_storage().data_ptr(), None) if isinstance(t, torch.Tensor) else None
            if owner is not None:
                owner.untyped_storage().resize_(0)
                taken.count += 1
        return result

    XnnpackBackend.preprocess = staticmethod(preprocess)
    try:
        yield taken
    finally:
        XnnpackBackend.preprocess = stock


def _nodes_of(nodes: list, mask: int):
    """The nodes whose indices are the set bits of `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield nodes[low.bit_length() - 1]
        mask ^= low


@contextlib.contextmanager
def compact_dependency_closure():
    """Within this block, ExecuTorch's group partitioner keeps each node's transitive downstream
    nodes as one integer bitmask instead of a Python set.

    Its `_DependencyViewer` builds, for every node, the set of all nodes downstream of it and the set
    of all upstream: nodes^2 set entries, ~590 MB for SmolLM2-135M's ~6,000-node graph, alive while
    XNNPACK partitions (the export's peak). The partitioner reads only the downstream ones, each as
    `any(n in group for n in downstreams_of(node))`; bitmasks hold the same closure in nodes^2 / 8
    bytes and yield the same nodes, so the partitions are the same. Yields a Shortcut counting the
    closures read.
    """
    from executorch.exir.backend.canonical_partitioners import group_partitioner

    class CompactDependencyViewer:
        def __init__(self, graph_module):
            self._nodes = list(graph_module.graph.nodes)
            self._index = {n: i for i, n in enumerate(self._nodes)}
            self._down = self._closure(reversed(self._nodes), lambda n: n.users)
            self._up = None  # the stock viewer's upstream sets are never read: made only if asked

        def _closure(self, order, neighbours) -> dict:
            masks: dict = {}
            for node in order:
                mask = 0
                for other in neighbours(node):
                    mask |= (1 << self._index[other]) | masks.get(other, 0)
                masks[node] = mask
            return masks

        def downstreams_of(self, node):
            taken.count += 1
            return _nodes_of(self._nodes, self._down.get(node, 0))

        def upstreams_of(self, node):
            if self._up is None:
                self._up = self._closure(self._nodes, lambda n: n.all_input_nodes)
            return _nodes_of(self._nodes, self._up.get(node, 0))

    taken = Shortcut(on=True)
    with _swapped(group_partitioner, "_DependencyViewer", group_partitioner._DependencyViewer,
                  CompactDependencyViewer, taken) as result:
        yield result
