"""Derive a model's :class:`~mergelab.models.graph.UnitGraph` by tracing its forward computation.

The model is exported with ``torch.export.export(..., strict=False)`` (an ATen-level graph in which every parameter
and buffer is an input, mapped to its state-dict key by the graph signature, and every node knows the module that
ran it, ``node.meta["nn_module_stack"]``). Then every axis of every tensor is a node of a union-find, and each
operation links the axes it ties (Git Re-Basin's permutation spec, derived instead of written):

- a linear or convolution links its weight's input axis to its input's channel axis and gives its output a channel
  axis of its own (the weight's output axis, shared by its bias); a depthwise convolution ties its outputs to its
  inputs (channel multiplier ``m``: output ``j`` reads input ``j // m``, a block structure over the inputs);
- a norm links its vectors to the channel axis (GroupNorm also splits the channels into its groups, see below);
- elementwise operations (activations, residual additions, per-channel scales such as layer scale or the gating of
  squeeze-excite, broadcasting included) unify the axes they align; pooling, dropout, identity, permutes and
  transposes carry axes along; reductions over an axis drop it; concatenation along an axis makes it the
  concatenation of its parts' groups;
- a reshape that splits a channel axis ``X`` into ``(blocks, within)`` and then uses the parts separately, as
  multi-head attention does (``(B, N, 3D) -> (B, N, 3, H, D/H)``, unbound into ``q, k, v`` and passed to scaled
  dot-product attention), makes the leading factor an index of parts (``unbind``/``select``: ``X`` is the
  concatenation of ``q``, ``k``, ``v``) or a block index (the heads: ``q``'s and ``k``'s head dims are contracted
  together, so ``q`` and ``k`` are one group, heads are a batch axis of ``q``, ``k`` and ``v``, so their blocks
  share one parent group);
- input pixels and the outputs are pinned (a special node: never permuted), as is every axis an operation treats
  positionally (kernel and spatial positions, tokens, a slice or an index along an axis).

An operation outside this list, or a use of an axis that the rules cannot express (a reshape merging channels with
positions, a grouped convolution, a per-dimension parameter inside attention heads), raises one :class:`UserError`
naming the operation and the module: a graph is derived exactly or not at all.

Structured groups (:class:`~mergelab.models.graph.Blocks`): a group of ``n`` units in ``count`` consecutive blocks
whose permutation moves blocks as wholes, by the permutation of a parent group of ``count`` units (``None``: blocks
stay in place), and permutes freely inside each block. Attention: ``q``/``k`` group and ``v``/``out`` group, blocks =
heads, parent = one heads group shared by both. GroupNorm: blocks = its groups, parent = a group of its own.
Depthwise convolution with multiplier ``m``: the output group's blocks are the inputs' channels, parent = the input
group.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergelab.errors import UserError
from mergelab.models.graph import Blocks, Group, Layer, UnitGraph

aten = torch.ops.aten

PIN = 0  # the union-find node of every axis that is never permuted


@dataclass(frozen=True)
class Factor:
    """Axis ``index`` of the reshape of channel node ``node`` into ``factors`` (resolved on use)."""

    split: int
    index: int


class _Split:
    """A reshape of channel node ``node`` into ``factors``; ``parts``: its nodes once unbound along factor 0."""

    def __init__(self, node: int, factors: tuple[int, ...]):
        self.node, self.factors = node, factors
        self.parts: list[int] | None = None


def _op_name(target) -> str:
    return getattr(target, "__name__", str(target)).replace(".default", "")


# Elementwise operations of one tensor (same function on every element): the output carries the input's axes.
UNARY = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_", "relu6", "leaky_relu", "leaky_relu_", "elu",
    "elu_", "mish", "mish_", "softplus", "exp", "log", "sqrt", "rsqrt", "neg", "abs", "erf", "clamp", "clamp_",
    "clamp_min", "clamp_max", "dropout", "dropout_", "feature_dropout", "alpha_dropout", "clone", "contiguous",
    "alias", "detach", "to.dtype", "to.dtype_layout", "to.device", "_to_copy", "type_as", "lift_fresh_copy",
    "pow.Tensor_Scalar", "reciprocal", "sign", "square", "logical_not",
}
BINARY = {"add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor", "mul.Tensor", "mul_.Tensor", "div.Tensor",
          "div_.Tensor", "maximum", "minimum", "where.self", "add.Scalar", "mul.Scalar", "div.Scalar", "sub.Scalar",
          "rsub.Scalar", "pow.Tensor_Tensor", "lerp.Scalar"}
VIEWS = {"view", "reshape", "_unsafe_view", "flatten.using_ints", "unflatten.int", "squeeze.dim", "squeeze.dims",
         "squeeze", "unsqueeze", "view_as"}
REDUCE = {"mean.dim", "sum.dim_IntList", "amax", "amin", "var.correction", "std.correction", "var.dim", "std.dim",
          "mean.default", "sum.default", "logsumexp"}
POOL = {"adaptive_avg_pool2d", "adaptive_avg_pool1d", "avg_pool2d", "avg_pool1d", "max_pool2d", "max_pool1d",
        "max_pool2d_with_indices", "adaptive_max_pool2d", "_adaptive_avg_pool2d", "upsample_nearest2d.vec",
        "upsample_bilinear2d.vec", "_upsample_bicubic2d_aa.vec", "_upsample_bilinear2d_aa.vec",
        "upsample_bicubic2d.vec", "constant_pad_nd", "pad"}
NORMS = {"batch_norm", "layer_norm", "rms_norm", "group_norm"}
IGNORED = {"_assert_tensor_metadata", "sym_size.int", "sym_numel", "sym_stride.int", "_assert_scalar",
           "sym_constrain_range_for_size", "_assert_async.msg"}
SUPPORTED = ("linear and conv (incl. depthwise), batch/layer/group/RMS norm, elementwise ops, pooling, reshapes, "
             "cat, unbind/select, softmax, matmul and scaled dot-product attention")


class _Tracer:
    def __init__(self, exported, model: nn.Module):
        self.ep, self.model = exported, model
        signature = exported.graph_signature
        self.keys = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}  # placeholder -> state key
        self.parent = [PIN]
        self.size = [1]
        self.label: dict[int, tuple[int, str]] = {}  # node -> (order, name) of the weight op writing it
        self.concat: dict[int, list[int]] = {}
        self.blocks: dict[int, tuple[int, int]] = {}  # node -> (parent node, count)
        self.splits: list[_Split] = []
        self.part_of: dict[int, tuple[int, int]] = {}  # part node -> (concatenated node, index)
        self.key_axes: dict[str, list[Any]] = {}
        self.layouts: dict[Any, Any] = {}
        self.layers: list[dict] = []
        self.order = 0
        self.feature_dims: dict[str, int] = {}
        self.elementwise: set[str] = set()

    # ----------------------------------------------------------------------------------------- union-find
    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def pinned(self, node: int) -> bool:
        return self.find(node) == PIN

    def union(self, a: int, b: int, where: str) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b == PIN:
            a, b = b, a
        if a != PIN and self.size[a] != self.size[b]:
            raise UserError(f"cannot derive the unit graph: {where} ties axes of sizes {self.size[a]} and "
                            f"{self.size[b]}")
        if a != PIN and (a in self.label) < (b in self.label):
            a, b = b, a  # keep a labelled root
        if a != PIN and b in self.label and a in self.label and self.label[b] < self.label[a]:
            self.label[a] = self.label[b]
        self.parent[b] = a
        concat_b, blocks_b = self.concat.pop(b, None), self.blocks.pop(b, None)
        if a == PIN:
            for part in concat_b or ():
                self.union(PIN, part, where)
            if blocks_b is not None:
                self.union(PIN, blocks_b[0], where)
            return
        if b in self.label and a not in self.label:
            self.label[a] = self.label[b]
        if concat_b is not None:
            if a in self.blocks:
                raise UserError(f"cannot derive the unit graph: {where} ties a concatenation to blocks")
            if a in self.concat:
                parts_a = self.concat[a]
                if [self.size[self.find(p)] for p in parts_a] != [self.size[self.find(p)] for p in concat_b]:
                    raise UserError(f"cannot derive the unit graph: {where} ties concatenations of different parts")
                for pa, pb in zip(parts_a, concat_b):
                    self.union(pa, pb, where)
            else:
                self.concat[a] = concat_b
        if blocks_b is not None:
            if a in self.concat:
                raise UserError(f"cannot derive the unit graph: {where} ties a concatenation to blocks")
            if a in self.blocks:
                if self.blocks[a][1] != blocks_b[1]:
                    raise UserError(f"cannot derive the unit graph: {where} ties {self.blocks[a][1]} blocks "
                                    f"(heads or norm groups) to {blocks_b[1]}")
                self.union(self.blocks[a][0], blocks_b[0], where)
            else:
                self.blocks[a] = blocks_b

    def set_blocks(self, node: int, parent: int, count: int, where: str) -> None:
        fresh = self.new(self.size[self.find(node)])
        self.blocks[fresh] = (parent, count)
        self.union(node, fresh, where)

    def set_concat(self, node: int, parts: list[int], where: str) -> None:
        fresh = self.new(sum(self.size[self.find(p)] for p in parts))
        self.concat[fresh] = parts
        self.union(node, fresh, where)

    # ------------------------------------------------------------------------------------------ dims
    def resolve(self, dim, where: str):
        """``("node", n)`` or ``("inner", n)`` (inside the blocks of ``n``) for a tensor axis."""
        if isinstance(dim, int):
            return ("node", dim)
        split = self.splits[dim.split]
        if len(split.factors) != 2:
            raise UserError(f"cannot derive the unit graph: {where} uses a channel axis reshaped into "
                            f"{split.factors} (supported: blocks x within, e.g. heads x head dim)")
        root = self.find(split.node)
        if root == PIN:
            return ("node", PIN)
        if root not in self.blocks:
            self.set_blocks(root, self.new(split.factors[0]), split.factors[0], where)
            root = self.find(split.node)
        parent, count = self.blocks[root]
        if count != split.factors[0]:
            raise UserError(f"cannot derive the unit graph: {where} splits {count} blocks into {split.factors[0]}")
        return ("node", parent) if dim.index == 0 else ("inner", split.node)

    def unify(self, a, b, where: str) -> None:
        ra, rb = self.resolve(a, where), self.resolve(b, where)
        if ra[0] == rb[0]:
            self.union(ra[1], rb[1], where)
            return
        node = ra[1] if ra[0] == "node" else rb[1]
        inner = rb[1] if ra[0] == "node" else ra[1]
        if self.pinned(node):
            self.union(PIN, inner, where)
            return
        raise UserError(f"cannot derive the unit graph: {where} ties an axis inside attention heads (or norm groups) "
                        "to another axis, e.g. a per-head-dim parameter; not supported")

    def pin(self, dim, where: str) -> None:
        self.unify(dim, PIN, where)

    def is_pin(self, dim) -> bool:
        if isinstance(dim, int):
            return self.pinned(dim)
        return self.pinned(self.splits[dim.split].node)

    # -------------------------------------------------------------------------------------------- run
    def where(self, node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path, kind = list(stack.values())[-1] if stack else ("", type(self.model))
        kind = kind if isinstance(kind, str) else kind.__qualname__
        return f"operation {_op_name(node.target)} in module {path or '(root)'} ({kind.rsplit('.', 1)[-1]})"

    def module_of(self, node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        return list(stack.values())[-1][0] if stack else ""

    def shape(self, value) -> tuple[int, ...]:
        return tuple(int(s) for s in value.meta["val"].shape)

    def run(self) -> None:
        signature = self.ep.graph_signature
        params = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                value = node.meta.get("val")
                if not isinstance(value, torch.Tensor):
                    continue
                if node.name in params:
                    dims = [self.new(s) for s in value.shape]
                    self.key_axes[params[node.name]] = dims
                    self.layouts[node] = dims
                else:
                    self.layouts[node] = [PIN] * value.ndim
            elif node.op == "call_function":
                self.order += 1
                self.call(node)
            elif node.op == "output":
                for out in node.args[0]:
                    for dim in self.layouts.get(out, []):
                        self.pin(dim, "the model's output")
            elif node.op != "get_attr":
                raise UserError(f"cannot derive the unit graph: graph node {node.op} {node.target} is not supported")

    def dims_of(self, value):
        """The union-find nodes (or :class:`Factor` axes) of ``value``'s axes."""
        return self.layouts[value]

    def call(self, node) -> None:
        name = _op_name(node.target)
        where = self.where(node)
        args = node.args
        if node.target is operator.getitem:
            self.layouts[node] = self.layouts[args[0]][args[1]]
            return
        if name in IGNORED:
            return
        value = node.meta.get("val")
        if name in UNARY:
            self.layouts[node] = list(self.dims_of(args[0]))
        elif name in BINARY:
            self.layouts[node] = self.broadcast(node, [a for a in args if isinstance(a, torch.fx.Node)], where)
        elif name in ("linear",):
            self.linear(node, where)
        elif name in ("conv2d", "conv1d", "convolution"):
            self.conv(node, where)
        elif name == "batch_norm" or name == "_native_batch_norm_legit_no_training":
            x = self.dims_of(args[0])
            for vector in args[1:5]:
                if isinstance(vector, torch.fx.Node):
                    self.unify(self.dims_of(vector)[0], x[1], where)
            self.layouts[node] = list(x) if name == "batch_norm" else (list(x), None, None)
            self.record_norm(node, args[1:5], x[1])
        elif name in ("layer_norm", "rms_norm"):
            x = self.dims_of(args[0])
            count = len(args[1])
            vectors = [a for a in args[2:4] if isinstance(a, torch.fx.Node)]
            for vector in vectors:
                for offset in range(count):
                    self.unify(self.dims_of(vector)[offset], x[x.__len__() - count + offset], where)
            self.layouts[node] = list(x)
            if count == 1:
                self.record_norm(node, vectors, x[-1])
            elif vectors:
                raise UserError(f"cannot derive the unit graph: {where} normalises over several axes with a weight")
        elif name == "group_norm":
            x = self.dims_of(args[0])
            groups = int(args[1])
            channels = self.shape(args[0])[1]
            if 1 < groups < channels:
                resolved = self.resolve(x[1], where)
                if resolved[0] != "node":
                    raise UserError(f"cannot derive the unit graph: {where} on an axis inside blocks")
                parent = self.new(groups)
                self.label[parent] = (self.order, self.module_of(node) + ".groups")
                self.set_blocks(resolved[1], parent, groups, where)
            vectors = [a for a in args[2:4] if isinstance(a, torch.fx.Node)]
            for vector in vectors:
                self.unify(self.dims_of(vector)[0], x[1], where)
            self.layouts[node] = list(x)
            self.record_norm(node, vectors, x[1])
        elif name in VIEWS:
            self.layouts[node] = self.reshape(self.dims_of(args[0]), self.shape(args[0]), tuple(value.shape), where)
        elif name == "permute":
            x = self.dims_of(args[0])
            self.layouts[node] = [x[d % len(x)] for d in args[1]]
        elif name in ("transpose.int", "swapaxes"):
            x = list(self.dims_of(args[0]))
            a, b = args[1] % len(x), args[2] % len(x)
            x[a], x[b] = x[b], x[a]
            self.layouts[node] = x
        elif name in ("t",):
            self.layouts[node] = list(reversed(self.dims_of(args[0])))
        elif name in ("expand", "expand_as", "repeat"):
            x = self.dims_of(args[0])
            old, new = self.shape(args[0]), tuple(value.shape)
            lead = len(new) - len(old)
            out = [PIN] * lead
            for d, dim in enumerate(x):
                if old[d] != new[lead + d]:
                    self.pin(dim, where)
                    out.append(PIN)
                else:
                    out.append(dim)
            self.layouts[node] = out
        elif name in REDUCE:
            self.reduce(node, where)
        elif name in POOL:
            x = self.dims_of(args[0])
            keep = 2 if len(x) >= 3 else 1
            for dim in x[keep:]:
                self.pin(dim, where)
            out = list(x[:keep]) + [PIN] * (len(x) - keep)
            self.layouts[node] = (out, [PIN] * len(out)) if "with_indices" in name else out
        elif name in ("softmax.int", "_softmax", "log_softmax.int", "_log_softmax"):
            self.layouts[node] = list(self.dims_of(args[0]))
        elif name in ("slice.Tensor",):
            x = list(self.dims_of(args[0]))
            dim = args[1] % len(x)
            if self.shape(args[0])[dim] != tuple(value.shape)[dim]:
                self.pin(x[dim], where)
                x[dim] = PIN
            self.layouts[node] = x
        elif name in ("select.int", "unbind.int"):
            self.unbind(node, name, where)
        elif name == "cat":
            self.cat(node, where)
        elif name in ("split.Tensor", "split_with_sizes", "chunk"):
            self.split(node, where)
        elif name in ("matmul", "bmm"):
            self.matmul(node, where)
        elif name == "scaled_dot_product_attention":
            self.sdpa(node, where)
        else:
            raise UserError(f"cannot derive the unit graph: {where} is not supported (supported: {SUPPORTED})")

    # ------------------------------------------------------------------------------------------- rules
    def broadcast(self, node, operands, where: str):
        shape = tuple(node.meta["val"].shape)
        out = []
        for d in range(len(shape)):
            dims = []
            for operand in operands:
                op_shape = self.shape(operand)
                offset = len(shape) - len(op_shape)
                if d >= offset and op_shape[d - offset] == shape[d] and shape[d] != 1:
                    dims.append(self.dims_of(operand)[d - offset])
            for other in dims[1:]:
                self.unify(dims[0], other, where)
            out.append(dims[0] if dims else PIN)
        return out

    def record_norm(self, node, vectors, channel) -> None:
        keys = [self.key_of(v) for v in vectors if isinstance(v, torch.fx.Node)]
        keys = [k for k in keys if k is not None]
        if keys:
            self.layers.append(dict(node=node, kind="bn", keys=keys, name=self.module_of(node), in_dim=channel,
                                    out_dim=channel))

    def key_of(self, value) -> str | None:
        return self.keys.get(value.name)

    def linear(self, node, where: str) -> None:
        x, weight = self.dims_of(node.args[0]), node.args[1]
        w = self.dims_of(weight)
        self.unify(x[-1], w[1], where)
        bias = node.args[2] if len(node.args) > 2 else None
        if isinstance(bias, torch.fx.Node):
            self.unify(self.dims_of(bias)[0], w[0], where)
        self.label_writer(w[0], node)
        self.layouts[node] = list(x[:-1]) + [w[0]]
        self.layers.append(dict(node=node, kind="linear", keys=[self.key_of(a) for a in (weight, bias)
                                                                 if isinstance(a, torch.fx.Node)],
                                name=self.module_of(node), in_dim=w[1], out_dim=w[0]))

    def label_writer(self, dim: int, node) -> None:
        root = self.find(dim)
        if root != PIN and root not in self.label:
            self.label[root] = (self.order, self.module_of(node))

    def conv(self, node, where: str) -> None:
        args = node.args
        x, weight = self.dims_of(args[0]), args[1]
        w = self.dims_of(weight)
        groups = int(args[-1]) if len(args) >= 7 else 1
        if _op_name(node.target) == "convolution":
            groups = int(args[8])
            if args[6]:
                raise UserError(f"cannot derive the unit graph: {where}: transposed convolution is not supported")
        in_channels, out_channels = self.shape(args[0])[1], self.shape(weight)[0]
        for dim in list(x[2:]) + list(w[2:]):
            self.pin(dim, where)
        bias = args[2] if len(args) > 2 else None
        if isinstance(bias, torch.fx.Node):
            self.unify(self.dims_of(bias)[0], w[0], where)
        in_dim = w[1]
        if groups == 1:
            self.unify(x[1], w[1], where)
        elif groups == in_channels and self.shape(weight)[1] == 1:
            self.pin(w[1], where)
            in_dim = x[1]
            multiplier = out_channels // in_channels
            if multiplier == 1:
                self.unify(w[0], x[1], where)
            else:
                resolved = self.resolve(x[1], where)
                if resolved[0] != "node":
                    raise UserError(f"cannot derive the unit graph: {where}: depthwise conv inside blocks")
                self.set_blocks(w[0], resolved[1], in_channels, where)
        else:
            raise UserError(f"cannot derive the unit graph: {where}: grouped convolution with {groups} groups of "
                            f"{self.shape(weight)[1]} channels is not supported (plain and depthwise are)")
        self.label_writer(w[0], node)
        self.layouts[node] = [x[0], w[0]] + [PIN] * (len(x) - 2)
        self.layers.append(dict(node=node, kind="conv", keys=[self.key_of(a) for a in (weight, bias)
                                                               if isinstance(a, torch.fx.Node)],
                                name=self.module_of(node), in_dim=in_dim, out_dim=w[0]))

    def reduce(self, node, where: str) -> None:
        x = self.dims_of(node.args[0])
        name = _op_name(node.target)
        if name in ("mean.default", "sum.default"):
            self.layouts[node] = []
            return
        dims = node.args[1] if len(node.args) > 1 else None
        dims = range(len(x)) if dims is None else [d % len(x) for d in (dims if isinstance(dims, (list, tuple))
                                                                         else [dims])]
        keep = len(node.meta["val"].shape) == len(x)
        out = []
        for d, dim in enumerate(x):
            if d in dims:
                self.resolve(dim, where)  # reducing inside blocks is allowed, but fixes the block structure
                if keep:
                    out.append(PIN)
            else:
                out.append(dim)
        self.layouts[node] = out

    def reshape(self, dims, old: tuple[int, ...], new: tuple[int, ...], where: str):
        out: list[Any] = [PIN] * len(new)
        i = j = 0
        while i < len(old) or j < len(new):
            if i < len(old) and old[i] == 1:
                self.pin(dims[i], where)
                i += 1
                continue
            if j < len(new) and new[j] == 1:
                j += 1
                continue
            ins, outs = [i], [j]
            a, b = old[i], new[j]
            while a != b:
                if a < b:
                    i += 1
                    ins.append(i)
                    a *= old[i]
                else:
                    j += 1
                    outs.append(j)
                    b *= new[j]
            i, j = i + 1, j + 1
            ins = [k for k in ins if old[k] != 1]
            outs = [k for k in outs if new[k] != 1]
            if len(ins) == 1 and len(outs) == 1:
                out[outs[0]] = dims[ins[0]]
            elif len(ins) == 1:
                dim = dims[ins[0]]
                if self.is_pin(dim):
                    continue
                if not isinstance(dim, int):
                    raise UserError(f"cannot derive the unit graph: {where} splits an already split channel axis")
                self.splits.append(_Split(dim, tuple(new[k] for k in outs)))
                for index, k in enumerate(outs):
                    out[k] = Factor(len(self.splits) - 1, index)
            elif len(outs) == 1:
                merged = [dims[k] for k in ins]
                if all(self.is_pin(d) for d in merged):
                    continue
                first = merged[0]
                if (all(isinstance(d, Factor) and d.split == first.split and d.index == n for n, d in
                        enumerate(merged)) if isinstance(first, Factor) else False) and \
                        len(merged) == len(self.splits[first.split].factors):
                    out[outs[0]] = self.splits[first.split].node
                    continue
                if len(merged) == 2 and all(isinstance(d, Factor) for d in merged):
                    outer, inner = (self.resolve(d, where) for d in merged)
                    root = self.find(inner[1])
                    if outer[0] == "node" and inner[0] == "inner" and root in self.blocks and \
                            self.find(self.blocks[root][0]) == self.find(outer[1]):
                        out[outs[0]] = inner[1]  # blocks x within merged back: the blocked group itself
                        continue
                raise UserError(f"cannot derive the unit graph: {where} merges a channel axis with other axes "
                                "(e.g. flattening a feature map that was not pooled); not supported")
            elif not all(self.is_pin(dims[k]) for k in ins):
                raise UserError(f"cannot derive the unit graph: {where} reshapes a channel axis in a way not supported")
        return out

    def unbind(self, node, name: str, where: str) -> None:
        x = list(self.dims_of(node.args[0]))
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(x)
        value = node.meta["val"]
        count = len(value) if name == "unbind.int" else None
        target = x[dim]
        rest = x[:dim] + x[dim + 1:]
        if isinstance(target, Factor) and target.index == 0 and not self.is_pin(target):
            split = self.splits[target.split]
            if split.parts is None:
                size = math.prod(split.factors[1:])
                split.parts = [self.new(size) for _ in range(split.factors[0])]
                self.set_concat(split.node, split.parts, where)
                for k, part in enumerate(split.parts):
                    self.part_of[part] = (split.node, k)
            sub = {}
            for k, part in enumerate(split.parts):
                if len(split.factors) == 2:
                    sub[k] = lambda d, p=part: p
                else:
                    self.splits.append(_Split(part, split.factors[1:]))
                    sub[k] = lambda d, s=len(self.splits) - 1: Factor(s, d.index - 1)

            def layout(k):
                return [sub[k](d) if isinstance(d, Factor) and d.split == target.split else d for d in rest]

            if count is None:
                self.layouts[node] = layout(node.args[2] % split.factors[0])
            else:
                self.layouts[node] = [layout(k) for k in range(count)]
            return
        self.pin(target, where)
        self.layouts[node] = rest if count is None else [list(rest) for _ in range(count)]

    def cat(self, node, where: str) -> None:
        tensors = [t for t in node.args[0]]
        ndim = len(node.meta["val"].shape)
        dim = (node.args[1] if len(node.args) > 1 else 0) % ndim
        layouts = [self.dims_of(t) for t in tensors]
        out = list(layouts[0])
        for d in range(ndim):
            if d == dim:
                continue
            for other in layouts[1:]:
                self.unify(layouts[0][d], other[d], where)
        parts = [lay[dim] for lay in layouts]
        if any(self.is_pin(p) for p in parts):
            for p in parts:
                self.pin(p, where)
            out[dim] = PIN
        else:
            resolved = [self.resolve(p, where) for p in parts]
            if any(r[0] != "node" for r in resolved):
                raise UserError(f"cannot derive the unit graph: {where} concatenates inside blocks")
            fresh = self.new(sum(self.size[self.find(r[1])] for r in resolved))
            self.set_concat(fresh, [r[1] for r in resolved], where)
            out[dim] = fresh
        self.layouts[node] = out

    def split(self, node, where: str) -> None:
        x = list(self.dims_of(node.args[0]))
        dim = (node.args[2] if len(node.args) > 2 else 0) % len(x)
        values = node.meta["val"]
        target = x[dim]
        if self.is_pin(target):
            self.layouts[node] = [list(x[:dim]) + [PIN] + list(x[dim + 1:]) for _ in values]
            return
        resolved = self.resolve(target, where)
        if resolved[0] != "node":
            raise UserError(f"cannot derive the unit graph: {where} splits inside blocks")
        parts = [self.new(int(v.shape[dim])) for v in values]
        self.set_concat(resolved[1], parts, where)
        self.layouts[node] = [list(x[:dim]) + [p] + list(x[dim + 1:]) for p in parts]

    def matmul(self, node, where: str) -> None:
        a, b = self.dims_of(node.args[0]), self.dims_of(node.args[1])
        if len(a) < 2 or len(b) < 2:
            raise UserError(f"cannot derive the unit graph: {where} with a vector operand is not supported")
        self.unify(a[-1], b[-2], where)
        batch_a, batch_b = a[:-2], b[:-2]
        shape = tuple(node.meta["val"].shape)[:-2]
        out = []
        for d in range(len(shape)):
            dims = []
            for lay, full in ((batch_a, self.shape(node.args[0])[:-2]), (batch_b, self.shape(node.args[1])[:-2])):
                offset = len(shape) - len(lay)
                if d >= offset and full[d - offset] == shape[d] and shape[d] != 1:
                    dims.append(lay[d - offset])
            for other in dims[1:]:
                self.unify(dims[0], other, where)
            out.append(dims[0] if dims else PIN)
        self.layouts[node] = out + [a[-2], b[-1]]

    def sdpa(self, node, where: str) -> None:
        q, k, v = (self.dims_of(t) for t in node.args[:3])
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, torch.fx.Node):
            for dim in self.dims_of(mask):
                self.pin(dim, where)
        self.unify(q[-1], k[-1], where)
        self.unify(k[-2], v[-2], where)
        for d in range(len(q) - 2):
            self.unify(q[d], k[d], where)
            self.unify(q[d], v[d], where)
        self.layouts[node] = list(q[:-1]) + [v[-1]]

    # ------------------------------------------------------------------------------------------ result
    def graph(self) -> UnitGraph:
        state = self.model.state_dict()
        names: dict[int, Group] = {}
        used: set[str] = set()

        def base_name(root: int) -> str:
            """The first layer writing the group; ``<concatenation>[k]`` for a part; else its first key axis."""
            if root in self.label:
                return self.label[root][1] or "stem"
            part = next((p for p in self.part_of if self.find(p) == root), None)
            if part is not None:
                whole, k = self.part_of[part]
                return f"{name_of(self.find(whole))}[{k}]"
            return next((f"{key}:{axis}" for key, dims in self.key_axes.items() for axis, d in enumerate(dims)
                         if isinstance(d, int) and self.find(d) == root), f"group{root}")

        def name_of(root: int) -> Group:
            if root not in names:
                name = candidate = base_name(root)
                n = 1
                while candidate in used:
                    n += 1
                    candidate = f"{name}~{n}"
                used.add(candidate)
                names[root] = candidate
            return names[root]

        groups: dict[Group, int] = {}
        blocks: dict[Group, Blocks] = {}

        def axis_entry(dim):
            root = self.find(dim)
            if root == PIN or self.size[root] == 1:
                return None
            if root in self.concat:
                entry = []
                for part in self.concat[root]:
                    sub = axis_entry(part)
                    if sub is None:
                        raise UserError("cannot derive the unit graph: a concatenation mixes permuted and fixed "
                                        f"channels ({name_of(root)})")
                    entry.extend(sub if isinstance(sub, tuple) else (sub,))
                return tuple(entry)
            return group(root)

        def group(root: int) -> Group:
            name = name_of(root)
            if name not in groups:
                groups[name] = self.size[root]
                if root in self.blocks:
                    parent, count = self.blocks[root]
                    parent_root = self.find(parent)
                    if 1 < count < self.size[root]:
                        if parent_root == PIN:
                            blocks[name] = Blocks(None, count)
                        else:
                            if parent_root not in self.label:
                                self.label[parent_root] = (self.order, f"{name}.heads")
                            parent_entry = axis_entry(parent_root)
                            if not isinstance(parent_entry, str):
                                raise UserError(f"cannot derive the unit graph: blocks of {name} are not a group")
                            blocks[name] = Blocks(parent_entry, count)
            return name

        axes: dict[str, tuple] = {}
        for key, tensor in state.items():
            dims = self.key_axes.get(key)
            axes[key] = (None,) * tensor.ndim if dims is None else tuple(axis_entry(d) for d in dims)
        layers, seen = [], set()
        unused = {}  # module -> its unpermuted keys no operation reads as a weight (BatchNorm's num_batches_tracked)
        in_layers = {k for info in self.layers for k in info["keys"]}
        for key in state:
            if key not in in_layers and all(a is None for a in axes[key]):
                unused.setdefault(key.rsplit(".", 1)[0] if "." in key else "", []).append(key)
        for info in self.layers:
            keys = tuple(k for k in info["keys"] if k is not None)
            if info["kind"] == "bn" and keys:
                keys += tuple(unused.pop(keys[0].rsplit(".", 1)[0] if "." in keys[0] else "", ()))
            out = axis_entry(info["out_dim"])
            in_ = axis_entry(info["in_dim"]) if isinstance(info["in_dim"], int) else None
            seen.update(keys)
            hook = self.hook_of(info["node"], info["out_dim"])
            layers.append(Layer(info["name"], info["kind"], keys, in_, out, hook))
        for info in self.layers:  # the channel axis of every weight layer's own output, for per-layer statistics
            layout, root = self.layouts.get(info["node"]), self.find(info["out_dim"])
            if isinstance(layout, tuple):
                layout = layout[0]
            if isinstance(layout, list) and root != PIN:
                dims = [d for d, dim in enumerate(layout) if isinstance(dim, int) and self.find(dim) == root]
                if dims:
                    self.feature_dims.setdefault(info["name"], dims[0])
        # Parameters used elementwise (layer scale, position embedding, class token): per-channel "scale" layers,
        # placed where they are first used; their hook is found like a weight layer's, from that use.
        position = {node: k for k, node in enumerate(self.ep.graph.nodes)}
        placeholders = {self.key_of(node): node for node in self.ep.graph.nodes if node.op == "placeholder"}
        placed = [(position[info["node"]], layer) for info, layer in zip(self.layers, layers)]
        for key in state:
            if key in seen or all(a is None for a in axes[key]) or key not in placeholders:
                continue
            owner = key.rsplit(".", 1)[0] if "." in key else ""
            entry = next(a for a in axes[key] if a is not None)
            use = min(placeholders[key].users, key=position.get)
            dim = next(d for d, a in zip(self.key_axes[key], axes[key]) if a is not None)
            placed.append((position[use], Layer(owner, "scale", (key,), entry, entry, self.hook_of(use, dim))))
        layers = [layer for _, layer in sorted(placed, key=lambda item: item[0])]
        return UnitGraph(groups, axes, tuple(layers), blocks, self.feature_dims, frozenset(self.elementwise))

    # ------------------------------------------------------------------------------------------- hooks
    def module_outputs(self) -> dict:
        """Graph node -> the innermost module whose output it is."""
        if hasattr(self, "_outputs"):
            return self._outputs
        outputs = {}
        for node in self.ep.graph.nodes:
            if node.op != "call_function":
                continue
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            for path, _type in reversed(stack):
                leaves = any(user.op == "output" or path not in
                             [p for p, _t in (user.meta.get("nn_module_stack") or {}).values()]
                             for user in node.users)
                if leaves and path:
                    outputs[node] = path
                    break
        self._outputs = outputs
        return outputs

    def hook_of(self, node, out_dim: int) -> str:
        """The module whose output carries ``node``'s output channels after its norm and activation: walk forward
        through single-use channel-preserving operations (norms, activations, additions, permutes); records the
        channel axis of that output in ``feature_dims``."""
        outputs = self.module_outputs()
        current = node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if user.op != "call_function":
                break
            name = _op_name(user.target)
            if not (name in UNARY or name in BINARY or name in NORMS or name in ("permute", "transpose.int")):
                break
            current = user
        module = outputs.get(current)
        if module is not None and _op_name(current.target) in UNARY and isinstance(current.args[0], torch.fx.Node) \
                and self.module_of(current.args[0]) != module and current in self.layouts \
                and self.layouts[current] == self.layouts.get(current.args[0]):
            self.elementwise.add(module)  # an activation module: its input is the pre-activation, same axes
        if module is None:  # not a module's output: the weight layer's own output (before its activation)
            module, current = self.module_of(node), node
            if module not in outputs.values():
                return ""  # no module outputs this tensor: no feature point
        layout = self.layouts.get(current)
        root = self.find(out_dim)
        if isinstance(layout, list) and root != PIN:
            for d, dim in enumerate(layout):
                if isinstance(dim, int) and self.find(dim) == root:
                    self.feature_dims[module] = d
                    break
        return module


def _example_input(model: nn.Module) -> torch.Tensor:
    size = getattr(model, "input_size", None)
    if size is None:
        net = getattr(model, "net", model)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", ()))
        patch = getattr(net, "patch_embed", None)
        if patch is not None and getattr(patch, "img_size", None) is not None:
            size = (size[0] if size else 3, *patch.img_size)
        first = next((m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if isinstance(first, nn.Conv2d) and size:
            size = (first.in_channels, *size[1:])
    if not size:
        raise UserError(f"cannot derive the unit graph of {type(model).__name__}: its input size is unknown; pass "
                        "an example input")
    param = next(model.parameters())
    return torch.zeros(2, *size, dtype=param.dtype, device=param.device)


def derive_graph(model: nn.Module, example: torch.Tensor | None = None) -> UnitGraph:
    """The unit graph of ``model``, derived by tracing ``model(example)`` (see the module docstring)."""
    example = _example_input(model) if example is None else example
    was_training = model.training
    model.eval()
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # logs a traceback before export raises
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        exported = torch.export.export(model, (example,), strict=False)
    except UserError:
        raise
    except Exception as error:  # torch raises many kinds; the message is what matters
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot derive the unit graph of {type(model).__name__}: torch.export failed: "
                        f"{first[:300]}") from error
    finally:
        model.train(was_training)
        quiet.setLevel(level)
    tracer = _Tracer(exported, model)
    tracer.run()
    return tracer.graph()
