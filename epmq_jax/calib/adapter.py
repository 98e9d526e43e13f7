"""The adapter protocol between the sequential driver and a model family, and helpers to write one.

The driver (:mod:`epmq_jax.calib.driver`) works on pure parameter pytrees (nested dicts) and
never imports model code. An adapter tells it how to embed the inputs, where the blocks are,
which kernels each block holds (grouped by shared input, in execution order), and how to run
one block while capturing every linear layer's input. See docs/internals.md (the contract) and
docs/adapters.md (how to write one for your own linen or nnx model).

AWQ (``rounding="awq"``, :mod:`epmq_jax.calib.awq`) needs the optional extension
:class:`AwqAdapter`: which operation before each group of layers absorbs the group's scale and
which module's output judges it (:class:`AwqGroup`).

E-PMQ-full (``CalibConfig(full=...)``, :mod:`epmq_jax.calib.full`, this project's extension of
E-PMQ) needs the optional extension :class:`FullAdapter`: the norm layers of each block
(:class:`NormSpec`), a ``run_block_full`` that also captures their normalised inputs, which
tokens the task reads (``readout``), and optionally the model's non-block leaves as two pseudo
blocks (``leaf_kinds``: the stem before block 0, the head after the last block).

Adapters must be hashable (frozen dataclasses): the driver's compiled functions take the
adapter as a static argument, so equal adapters share compiled code across runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

PyTree = Any
Captures = dict[str, Any]


@runtime_checkable
class CalibAdapter(Protocol):
    """What the driver needs to know about a model family (all methods pure and jit-able)."""

    def embed(self, params: PyTree, inputs: PyTree) -> PyTree:
        """Model inputs (leading axis = samples) -> block 0's input carry (leaves: leading axis = samples)."""

    def block_paths(self, params: PyTree) -> Sequence[tuple]:
        """Key paths (tuples of dict keys / ints) of the block subtrees of ``params``, in forward order."""

    def block_kind(self, index: int) -> Hashable:
        """Blocks of equal kind share structure (and compiled code)."""

    def linear_groups(self, kind: Hashable) -> tuple[tuple[str, ...], ...]:
        """Kernel paths inside a block (``"a/b/kernel"``, layout ``(d_in, d_out)``), grouped by
        shared input, groups in execution order."""

    def run_block(self, kind: Hashable, block_params: PyTree, carry: PyTree) -> tuple[PyTree, Captures]:
        """One block: ``(carry_out, {kernel path: input (n, ..., d_in) or (input, row weight)})``."""


class AwqGroup(NamedTuple):
    """One AWQ scale: the kernels reading one input, where ``1/s`` is folded, what judges ``s``.

    Attributes:
      layers: kernel paths relative to the block (as in ``linear_groups``) that read the same
        input; each kernel's rows are multiplied by ``s``.
      prev: path (relative to the block) of the operation producing that input, whose parameters
        absorb ``1/s``: a norm (``"layer_norm1"``: its ``scale`` and ``bias`` if any) or a linear
        layer (``"self_attn/v_proj"``: its kernel's output columns and its ``bias`` if any; it
        must feed the layers directly or through a positively homogeneous map such as ReLU or
        the linear branch of a gated unit). None: no scale (clipping and RTN only), e.g. after
        a non-homogeneous activation or when the producer is shared by other blocks.
      prev_kind: ``"norm"``, ``"linear"`` or None (with ``prev=None``).
      module: the module whose output the scale search compares, passed to
        :meth:`AwqAdapter.awq_module` (llm-awq's ``module2inspect``: the whole attention for
        q/k/v, the whole MLP for its first layers); None: the layer's own output (one-layer
        groups).
      no_clip: kernels left out of the clipping search (llm-awq skips q and k: their error is
        amplified by the q·k product).
    """

    layers: tuple[str, ...]
    prev: str | None
    prev_kind: Literal["norm", "linear"] | None
    module: str | None = None
    no_clip: tuple[str, ...] = ()


@runtime_checkable
class AwqAdapter(CalibAdapter, Protocol):
    """The optional extension AWQ needs (all methods pure and jit-able)."""

    def awq_groups(self, kind: Hashable) -> tuple[AwqGroup, ...]:
        """The block's AWQ groups; together they hold exactly the kernels of ``linear_groups``."""

    def awq_module(self, kind: Hashable, module: str, block_params: PyTree, x: jax.Array,
                   carry: PyTree) -> jax.Array:
        """The output ``(n, ..., d)`` of ``module`` on its input ``x (n, ..., d_in)`` (the captured
        input of the group's layers; same leading axes as the output), with ``block_params`` and
        the block's input ``carry`` (for masks, position biases, encoder states)."""


class NormSpec(NamedTuple):
    """A norm layer E-PMQ-full calibrates (its per-channel ``scale`` and, if any, ``bias``).

    Attributes:
      path: the norm module's path relative to the block (its params are ``path/scale`` and
        ``path/bias``); also the key of its capture in ``run_block_full``.
      before: index of the linear group whose input it produces (the norm is calibrated just
        before that group); ``len(linear_groups(kind))`` for a norm after every group.
    """

    path: str
    before: int


#: The pseudo-block kinds of the non-block leaves (:meth:`FullAdapter.leaf_kinds`).
STEM, HEAD = "stem", "head"


@runtime_checkable
class FullAdapter(CalibAdapter, Protocol):
    """The optional extension E-PMQ-full needs (all methods pure and jit-able).

    Besides the blocks, an adapter may expose the model's non-block leaves as two pseudo
    blocks of kinds :data:`STEM` (model inputs -> block 0's input) and :data:`HEAD` (the last
    block's output -> what the task reads); their paths are relative to the params' root, their
    ``block_params`` are the whole param tree, and ``linear_groups`` / ``full_norms`` /
    ``run_block_full`` / ``readout`` answer for them as for a block. A stem or head kernel may
    have more than two dimensions when its captured input is the matching flattening, e.g. a
    patch-embedding convolution ``(p, p, C, d)`` viewed as ``(p·p·C, d)`` on flattened patches.
    """

    def full_norms(self, kind: Hashable) -> tuple[NormSpec, ...]:
        """The block's norm layers, in execution order."""

    def run_block_full(self, kind: Hashable, block_params: PyTree, carry: PyTree) -> tuple[PyTree, Captures]:
        """As ``run_block``, and also ``captures[norm path]`` = the norm's normalised input ẑ (its
        output with scale 1 and bias 0; shape ``(n, ..., d)``, or ``(ẑ, row weight)``) and
        ``captures["<norm path>:input"]`` its raw input (same form). For the
        :data:`HEAD` the first element is not used (may be None); for the :data:`STEM`,
        ``block_params`` is the whole tree and ``carry`` the model inputs, and the first element
        is block 0's input (``embed``'s)."""

    def readout(self, kind: Hashable, path: str, carry: PyTree) -> jax.Array | None:
        """Which rows of ``path``'s capture (a kernel or a norm) the task reads *through this
        block*: 1/0 weights broadcastable to the capture's ``x.shape[:-1]``, or None when every
        row's output is read (e.g. k/v, whose outputs reach every token). For a ViT's last
        block: the class token for the layers after attention."""

    def leaf_kinds(self) -> tuple[Hashable | None, Hashable | None]:
        """``(stem kind or None, head kind or None)``: the pseudo blocks the adapter supports."""

    def residuals(self, kind: Hashable) -> dict[str, str]:
        """``{kernel path: norm path}`` for the layers whose output is added to a residual stream:
        the stream they are added to is that norm's raw input (pre-norm blocks: ``out_proj`` ->
        ``layer_norm1``, ``fc2`` -> ``layer_norm2``), captured by ``run_block_full`` under
        ``"<norm path>:input"``."""


# ----------------------------------------------------------------------------- capture helpers


def capture_rows(cap: Any, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A capture (``x`` or ``(x, row weight)``) and the batch's sample mask ``(n,)`` ->
    ``(x, row weight over x.shape[:-1])``."""
    x, w = cap if isinstance(cap, tuple) else (cap, None)
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
    w = m if w is None else w * m
    return x, jnp.broadcast_to(w, x.shape[:-1])


def _record(captures: Captures, key: str, x: jax.Array) -> None:
    """Stores a layer's input (a layer applied twice in one block is not supported)."""
    if key in captures:
        raise ValueError(f"layer '{key}' is applied more than once in one block; calibration "
                         "needs one input per kernel (write run_block by hand for shared weights)")
    captures[key] = x


def capture_linen(module, params: PyTree, *args: Any, method: str | Callable | None = None,
                  **kwargs: Any) -> tuple[Any, Captures]:
    """Applies a linen module and records the input of every ``nn.Dense`` it calls.

    Args:
      module: the (unbound) linen module, e.g. one block.
      params: its ``params`` collection (a pure dict).
      *args, **kwargs: passed to ``module.apply``.
      method: the method to apply (default ``__call__``).

    Returns:
      ``(output, captures)`` with ``captures["<submodule path>/kernel"]`` the input of that
      Dense layer (paths relative to ``module``, e.g. ``"attn/query/kernel"``).
    """
    import flax.linen as nn

    captures: Captures = {}

    def interceptor(next_fun, a, kw, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            _record(captures, "/".join(context.module.path) + "/kernel", a[0])
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        out = module.apply({"params": params}, *args, method=method, **kwargs)
    return out, captures


def capture_nnx(graphdef, params: PyTree, fn: Callable[..., Any], *args: Any,
                norms: Sequence[str] = ()) -> tuple[Any, Captures]:
    """Rebuilds an nnx module and runs ``fn(module, *args)``, recording linear layers' inputs.

    Every sub-module with a ``kernel`` and a ``dot_general`` attribute (``nnx.Linear``,
    ``nnx.LinearGeneral``-style layers that call ``self.dot_general(inputs, kernel, ...)``) gets
    a recording ``dot_general`` on the rebuilt copy only; the original module is untouched.

    Args:
      graphdef: the module's graph definition (``nnx.split(module)[0]``).
      params: its state as a pure dict (``nnx.to_pure_dict(nnx.split(module)[1])``).
      fn: what to run, e.g. ``lambda m, x: m(x)``.
      *args: passed to ``fn``.
      norms: attribute paths of norm modules (``"layer_norm1"``; ``""`` for the root) whose
        normalised input ẑ is also recorded, keyed by the path: the module's own output with
        its ``scale`` set to 1 and its ``bias`` (if any) to 0, so that its output is
        ``scale * ẑ + bias`` (true of LayerNorm and RMSNorm); its raw input is recorded under
        ``"<path>:input"``. The copy's class is swapped for a recording subclass; the original
        module is untouched.

    Returns:
      ``(fn's output, {"<attribute path>/kernel": input, norm path: ẑ, "<norm path>:input": x})``.
    """
    from flax import nnx

    module = nnx.merge(graphdef, params)
    captures: Captures = {}
    for path, node in list(nnx.iter_graph(module)):
        if isinstance(node, nnx.Module) and hasattr(node, "kernel") and hasattr(node, "dot_general"):
            key = "/".join(str(p) for p in path) + "/kernel"
            original = node.dot_general

            def recording(x, *a, _key=key, _orig=original, **kw):
                _record(captures, _key, x)
                return _orig(x, *a, **kw)

            node.dot_general = recording
    for path in norms:
        node = module_at(module, path)
        node.__class__ = _norm_recorder(type(node), path, captures)
    return fn(module, *args), captures


def _norm_recorder(cls: type, key: str, captures: Captures) -> type:
    """A subclass of the norm class ``cls`` whose call also records its normalised input ẑ."""

    def __call__(self, x, *args, **kwargs):
        saved = {}
        for name, unit in (("scale", jnp.ones_like), ("bias", jnp.zeros_like)):
            var = getattr(self, name, None)
            if var is not None:
                saved[name] = var[...]
                var[...] = unit(saved[name])
        _record(captures, key, cls.__call__(self, x, *args, **kwargs))
        _record(captures, f"{key}:input", x)
        for name, value in saved.items():
            getattr(self, name)[...] = value
        return cls.__call__(self, x, *args, **kwargs)

    return type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})


# ----------------------------------------------------------------------------- nnx adapter


def get_path(tree: PyTree, path: Sequence) -> PyTree:
    """``tree[p0][p1]...`` for a key path."""
    for k in path:
        tree = tree[k]
    return tree


def key_path(rel: str) -> list:
    """``"layers/3/mlp/fc1/kernel"`` -> ``["layers", 3, "mlp", "fc1", "kernel"]`` (digits are list indices)."""
    return [int(p) if p.isdigit() else p for p in rel.split("/")]


def set_path(tree: PyTree, path: Sequence, value: Any) -> PyTree:
    """A copy of a nested dict with ``tree[p0][p1]... = value`` (only the dicts on the path are copied)."""
    if not path:
        return value
    if not isinstance(tree, Mapping):
        raise ValueError(f"cannot set key {path[0]!r}: expected a dict, got {type(tree).__name__}")
    out = dict(tree)
    out[path[0]] = set_path(tree[path[0]], path[1:], value)
    return out


def _split_attr(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split("/") if p]


def module_at(root: Any, path: str) -> Any:
    """The sub-module of ``root`` at an attribute path such as ``"encoder/layers/3"``."""
    for k in _split_attr(path):
        root = root[k] if isinstance(k, int) else getattr(root, k)
    return root


@dataclasses.dataclass(frozen=True)
class NnxAdapter:
    """A generic adapter for an nnx model whose blocks form a list attribute.

    The parameter tree it works on is ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (the model
    must hold no other state). Build it with :meth:`from_model`.

    Attributes:
      model_def: graph definition of the whole model (for ``embed``).
      block_def: graph definition of one block (all blocks must share it).
      blocks_at: key path of the block list, e.g. ``("encoder", "layers")``.
      n_blocks: number of blocks.
      groups: kernel paths of a block grouped by shared input, in execution order.
      embed_method: name of the model method mapping inputs to block 0's input.
      block_call: how a block is called: ``block_call(block, carry) -> carry``; default
        ``block(carry)``.
      awq: the block's :class:`AwqGroup` s (empty: the adapter does not support AWQ).
      awq_call: how an AWQ module is called: ``awq_call(module, x, carry) -> output``; default
        ``module(x)``.
    """

    model_def: Any
    block_def: Any
    blocks_at: tuple
    n_blocks: int
    groups: tuple[tuple[str, ...], ...]
    embed_method: str = "embed"
    block_call: Callable | None = None
    awq: tuple[AwqGroup, ...] = ()
    awq_call: Callable | None = None

    def __hash__(self) -> int:   # cached: jit hashes static arguments on every call
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", h)
        return h

    @classmethod
    def from_model(cls, model, blocks_at: str, groups: Sequence[Sequence[str]], *,
                   embed_method: str = "embed", block_call: Callable | None = None,
                   awq: Sequence[AwqGroup] = (), awq_call: Callable | None = None) -> NnxAdapter:
        """Builds the adapter from a model instance.

        Args:
          model: the nnx module (any of the models sharing its structure: merged, experts).
          blocks_at: ``"/"``-separated attribute path of the block list, e.g. ``"encoder/layers"``.
          groups: kernel paths relative to a block, grouped (see :class:`CalibAdapter`).
          embed_method: model method from inputs to block 0's input.
          block_call: ``(block, carry) -> carry`` if a block is not called as ``block(carry)``.
          awq: optional :class:`AwqGroup` s of a block (needed for ``rounding="awq"``).
          awq_call: ``(module, x, carry) -> output`` if an AWQ module is not called as ``module(x)``.

        Raises:
          ValueError: the model holds non-parameter state, the blocks differ in structure, a
            group names a kernel the block lacks, or the AWQ groups name missing parameters or
            do not hold exactly the grouped kernels.
        """
        from flax import nnx

        model_def, params, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree_util.tree_leaves(rest):
            raise ValueError("NnxAdapter needs a model whose state is all nnx.Param; found other "
                             f"state at {[k for k, _ in nnx.to_flat_state(rest)][:3]}")
        at = tuple(_split_attr(blocks_at))
        blocks = module_at(model, blocks_at)
        block_defs = {nnx.split(b)[0] for b in blocks}
        if len(block_defs) != 1:
            raise ValueError(f"blocks at '{blocks_at}' do not all share one structure; "
                             "write an adapter with block kinds instead")
        groups = tuple(tuple(g) for g in groups)
        from epmq_jax._tree import iter_paths
        known = set(iter_paths(nnx.to_pure_dict(nnx.state(blocks[0], nnx.Param))))
        for p in (p for g in groups for p in g):
            if p not in known:
                raise ValueError(f"kernel path '{p}' is not a parameter of the blocks at "
                                 f"'{blocks_at}' (they have e.g. {sorted(known)[:4]})")
        awq = tuple(AwqGroup(*g) for g in awq)
        if awq:
            check_awq_groups(awq, groups, known, where=f"blocks at '{blocks_at}'")
        return cls(model_def, block_defs.pop(), at, len(blocks), groups, embed_method, block_call,
                   awq, awq_call)

    def embed(self, params: PyTree, inputs: PyTree) -> PyTree:
        from flax import nnx

        return getattr(nnx.merge(self.model_def, params), self.embed_method)(inputs)

    def block_paths(self, params: PyTree) -> list[tuple]:
        n = len(get_path(params, self.blocks_at))
        if n != self.n_blocks:
            raise ValueError(f"params hold {n} blocks at {self.blocks_at}, the adapter expects {self.n_blocks}")
        return [(*self.blocks_at, i) for i in range(n)]

    def block_kind(self, index: int) -> Hashable:
        return 0

    def linear_groups(self, kind: Hashable) -> tuple[tuple[str, ...], ...]:
        return self.groups

    def run_block(self, kind: Hashable, block_params: PyTree, carry: PyTree) -> tuple[PyTree, Captures]:
        call = self.block_call or (lambda block, c: block(c))
        return capture_nnx(self.block_def, block_params, call, carry)

    def awq_groups(self, kind: Hashable) -> tuple[AwqGroup, ...]:
        if not self.awq:
            raise ValueError("this NnxAdapter has no AWQ groups: pass awq=[AwqGroup(...), ...] to "
                             "NnxAdapter.from_model (see docs/adapters.md)")
        return self.awq

    def awq_module(self, kind: Hashable, module: str, block_params: PyTree, x: jax.Array,
                   carry: PyTree) -> jax.Array:
        from flax import nnx

        m = module_at(nnx.merge(self.block_def, block_params), module)
        return m(x) if self.awq_call is None else self.awq_call(m, x, carry)


def check_awq_groups(awq: Sequence[AwqGroup], groups: Sequence[Sequence[str]], params: set[str],
                     where: str) -> None:
    """Raises ValueError unless the AWQ groups hold exactly the grouped kernels and name
    parameters that exist (``params``: the block's leaf paths)."""
    want = sorted(p for g in groups for p in g)
    have = sorted(p for g in awq for p in g.layers)
    if want != have:
        raise ValueError(f"{where}: the AWQ groups hold kernels {have}, expected exactly the linear "
                         f"groups' {want}")
    for g in awq:
        if g.prev_kind not in ("norm", "linear", None) or (g.prev is None) != (g.prev_kind is None):
            raise ValueError(f"{where}: AWQ group {g.layers}: prev={g.prev!r} with prev_kind="
                             f"{g.prev_kind!r}; expected a path with 'norm' or 'linear', or None with None")
        need = {"norm": "scale", "linear": "kernel"}.get(g.prev_kind)
        if need and f"{g.prev}/{need}" not in params:
            raise ValueError(f"{where}: AWQ group {g.layers}: no parameter '{g.prev}/{need}' for "
                             f"its {g.prev_kind} prev={g.prev!r}")
        if g.prev is not None and g.module is None and len(g.layers) != 1:
            raise ValueError(f"{where}: AWQ group {g.layers} has several layers, so it needs the "
                             "module whose output judges its scale (module=None means one layer's own output)")
        if not set(g.no_clip) <= set(g.layers):
            raise ValueError(f"{where}: AWQ group {g.layers}: no_clip {g.no_clip} names other kernels")


VIT_GROUPS = (("self_attn/q_proj/kernel", "self_attn/k_proj/kernel", "self_attn/v_proj/kernel"),
              ("self_attn/out_proj/kernel",), ("mlp/fc1/kernel",), ("mlp/fc2/kernel",))


def vit_awq_groups(hidden_act: str) -> tuple[AwqGroup, ...]:
    """AWQ groups of a CLIP encoder block, after llm-awq's recipes for pre-norm blocks.

    q/k/v share a scale folded into ``layer_norm1`` and judged on the attention output (q, k not
    clipped); ``out_proj``'s scale goes into ``v_proj``'s output channels; ``fc1``'s into
    ``layer_norm2``, judged on the MLP output (as llm-awq does for its GELU MLPs, GPT-NeoX and
    BigCode; its OPT recipe judges fc1 on its own output). ``fc2``'s scale could only be folded through the
    activation if it is positively homogeneous (ReLU: into ``fc1``'s output channels). CLIP's
    ``quick_gelu`` is not, and llm-awq's answer for such models (BLOOM, MPT, Falcon: a
    ``ScaledActivation`` dividing the activation's output by ``s``) is an extra per-channel
    operation and parameter that a CLIP checkpoint does not have, so ``fc2`` gets no scale
    (clipping and RTN only), as llm-awq does for the layers it cannot fold (BLOOM's and Falcon's
    attention output, GQA ``o_proj``).
    """
    q, k, v = VIT_GROUPS[0]
    fc2_prev = ("mlp/fc1", "linear") if hidden_act == "relu" else (None, None)
    return (AwqGroup(VIT_GROUPS[0], "layer_norm1", "norm", "self_attn", no_clip=(q, k)),
            AwqGroup(("self_attn/out_proj/kernel",), "self_attn/v_proj", "linear"),
            AwqGroup(("mlp/fc1/kernel",), "layer_norm2", "norm", "mlp"),
            AwqGroup(("mlp/fc2/kernel",), *fc2_prev))


_VIT_NORMS = (NormSpec("layer_norm1", 0), NormSpec("layer_norm2", 2))
_VIT_PATCH = "embeddings/patch_embedding/kernel"


def vit_patches(pixels: jax.Array, patch: int) -> jax.Array:
    """NHWC pixels ``(n, H, W, C)`` -> non-overlapping patches ``(n, (H/p)·(W/p), p·p·C)``, row-major
    over the patch grid and flattened in (h, w, c) order, so that ``patches @ K.reshape(-1, d)``
    is the patch-embedding convolution with HWIO kernel ``K (p, p, C, d)``."""
    n, h, w, c = pixels.shape
    x = pixels.astype(jnp.float32).reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), patch * patch * c)


@dataclasses.dataclass(frozen=True)
class ViTAdapter(NnxAdapter):
    """:func:`vit_adapter`'s adapter: :class:`NnxAdapter` plus E-PMQ-full's :class:`FullAdapter`.

    Norms per block: ``layer_norm1`` (before q/k/v) and ``layer_norm2`` (before fc1). The task
    reads the class token: in a block, the rows of ``out_proj``, ``layer_norm2``, ``fc1`` and
    ``fc2`` at token 0 (q/k/v and ``layer_norm1`` reach every token: all rows). Stem: the
    patch-embedding convolution as a linear layer on flattened patches (no bias; the class and
    position embeddings stay merged) and ``pre_layrnorm``; head: ``post_layernorm`` on the class
    token and ``visual_projection`` (when the model has one).

    Attributes:
      patch_size: the patch embedding's stride and size.
      has_projection: whether the model has a ``visual_projection``.
    """

    patch_size: int = 32
    has_projection: bool = True

    __hash__ = NnxAdapter.__hash__

    def full_norms(self, kind: Hashable) -> tuple[NormSpec, ...]:
        if kind == STEM:
            return (NormSpec("pre_layrnorm", 1),)
        if kind == HEAD:
            return (NormSpec("post_layernorm", 0),)
        return _VIT_NORMS

    def linear_groups(self, kind: Hashable) -> tuple[tuple[str, ...], ...]:
        if kind == STEM:
            return ((_VIT_PATCH,),)
        if kind == HEAD:
            return (("visual_projection/kernel",),) if self.has_projection else ()
        return self.groups

    def leaf_kinds(self) -> tuple[Hashable | None, Hashable | None]:
        return STEM, HEAD

    def residuals(self, kind: Hashable) -> dict[str, str]:
        if kind in (STEM, HEAD):
            return {}
        return {"self_attn/out_proj/kernel": "layer_norm1", "mlp/fc2/kernel": "layer_norm2"}

    def run_block_full(self, kind: Hashable, block_params: PyTree, carry: PyTree) -> tuple[PyTree, Captures]:
        if kind == STEM:
            out, caps = capture_nnx(self.model_def, block_params, lambda m, x: m.embed(x), carry,
                                    norms=("pre_layrnorm",))
            caps[_VIT_PATCH] = vit_patches(carry, self.patch_size)
            return out, caps
        if kind == HEAD:
            head = (lambda m, h: m.head(h)) if self.has_projection else (lambda m, h: m.pool(h))
            return None, capture_nnx(self.model_def, block_params, head, carry,
                                     norms=("post_layernorm",))[1]
        return capture_nnx(self.block_def, block_params, lambda block, c: block(c), carry,
                           norms=tuple(n.path for n in _VIT_NORMS))

    def readout(self, kind: Hashable, path: str, carry: PyTree) -> jax.Array | None:
        if kind in (STEM, HEAD) or path == "layer_norm1" or path in VIT_GROUPS[0]:
            return None
        cls = (jnp.arange(carry.shape[1]) == 0).astype(jnp.float32)
        return jnp.broadcast_to(cls, carry.shape[:2])


def vit_adapter(model) -> ViTAdapter:
    """The adapter for :class:`epmq_jax.models.clip.CLIPVisionModelWithProjection`.

    Params: ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (paths like
    ``encoder/layers/3/self_attn/q_proj/kernel``); inputs: NHWC pixels ``(n, H, W, C)``; carry:
    hidden states ``(n, tokens, width)``; per block the groups q/k/v (one shared H), out_proj,
    fc1, fc2, and the AWQ groups of :func:`vit_awq_groups`. The patch embedding and the visual
    projection are not calibrated (E-PMQ-full's ``leaves`` recalibrates them in float: see
    :class:`ViTAdapter`).
    """
    base = NnxAdapter.from_model(model, "encoder/layers", VIT_GROUPS, embed_method="embed",
                                 awq=vit_awq_groups(model.config.hidden_act))
    return ViTAdapter(**{f.name: getattr(base, f.name) for f in dataclasses.fields(NnxAdapter)},
                      patch_size=model.config.patch_size,
                      has_projection=model.visual_projection is not None)
