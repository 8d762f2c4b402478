"""What a stage computes in each action of a schedule (F, B, W), with no work done twice.

F runs the stage forward once, under `jax.vjp`, and returns its pullback's residuals as a flat
tuple of arrays (the stash); the executor keeps them in ring-buffer slots until B, which
rebuilds the pullback from them (`jax.tree.unflatten`: a `jax.vjp` pullback is a pytree of its
residuals) and runs it: no forward again. Residual leaves that are the stage's parameters
themselves are left out of the stash and put back from the live parameters when B rebuilds the
pullback: they do not change within a step, and keeping them would copy the stage into every
slot.

`remat` decides what the residuals are, so it is the memory/recompute knob: "none" every
intermediate (B recomputes nothing), "layer" each layer's input (`jax.checkpoint` per layer: B
recomputes inside one layer at a time), "stage" the stage input only (B re-runs the forward).

Split backward (zero-bubble schedules, `split=True`). A layer's weight products go through
`tppjax.models.project(spec, x, weight)`, which hands the product to the weight's `product`
metadata when it has one: that is the whole door. F gives every parameter that goes through
`project` (once per layer) a `tapped_product` with a tap, zeros shaped like the product's input
and output, and takes the vjp with respect to (the other parameters, x, the taps), the tapped
weights held fixed. `tapped_product` is a `jax.custom_vjp` whose backward returns, as the tap's
gradient, the pair (its input, its output gradient δ): so B's pullback gives the input gradient,
the gradients of the other parameters (norm gains, biases: elementwise, cheap) and every
product's (input, δ), and no weight-gradient matmul. W computes exactly those matmuls, each
product's inputᵀ·δ, batched over the stage's layers. So F + B + W do the work of F + one full
backward (docs/design.md §5). Parameters that do not go through `project` (all of a plain
function's) get their whole gradient in B, which is still correct.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tppjax.errors import ConfigError
from tppjax.pipeline.gpipe import apply_layer, stage_function, vary
from tppjax.pipeline.layout import ACTIVE_SCOPE


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tapped_product(spec: str, x: jax.Array, w: jax.Array, tap) -> jax.Array:
    """einsum(spec, x, w) in x's dtype, whose gradient is the input gradient for x, zero for w,
    and (x, the output gradient) for `tap`, a pair of zeros shaped like x and the output: what
    the weight gradient needs, kept for W instead of computed now."""
    del tap
    return jnp.einsum(spec, x, w.astype(x.dtype))


def _tapped_fwd(spec, x, w, tap):
    return tapped_product(spec, x, w, tap), (x, w)


def _tapped_bwd(spec, saved, g):
    x, w = saved
    _, pull = jax.vjp(lambda x: jnp.einsum(spec, x, w.astype(x.dtype)), x)
    return pull(g)[0], jnp.zeros_like(w), (x, g)


tapped_product.defvjp(_tapped_fwd, _tapped_bwd)


def _variables(state) -> list:
    return jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _with_products(state, products: dict):
    """`state` (a layer's nnx.State) with products[i] as the `product` of its i-th leaf."""
    leaves, treedef = jax.tree.flatten(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return jax.tree.unflatten(treedef, [v.replace(product=products[i]) if i in products else v
                                        for i, v in enumerate(leaves)])


class StageActions:
    """F, B and W of one stage's layers (`block_def`, stacked params `w` [L/p, ...])."""

    def __init__(self, block_def, remat: str, split: bool):
        self.block_def, self.remat, self.split = block_def, remat, split
        self.run_stage = stage_function(block_def, remat)
        # Filled by the first trace of `forward` (the executor traces it once before its loop,
        # to size the buffers): the pullback's treedef and where each residual leaf comes from
        # (None: kept in the stash; i: the stage's i-th parameter leaf); split, each tapped
        # parameter leaf's einsum spec (`_learn_products`).
        self.treedef, self.sources, self.specs = None, None, {}

    # ---- which parameters are tapped ----------------------------------------------------
    def _learn_products(self, w, x):
        """Trace one layer once with a recording `product` on every parameter: each one that
        goes through `project` gives its leaf index, einsum spec and the shapes of its input
        and output (the tap's). A parameter used by two products cannot have one tap."""
        seen = {}

        def recorder(i):
            def product(spec, a, value):
                y = jnp.einsum(spec, a, value.astype(a.dtype))
                if i in seen:
                    raise ConfigError(f"parameter {i} of the layer goes through `project` twice; "
                                      "a zero-bubble schedule needs one product per weight: use "
                                      "another schedule or a weight per product")
                seen[i] = (spec, jax.ShapeDtypeStruct(a.shape, a.dtype),
                           jax.ShapeDtypeStruct(y.shape, y.dtype))
                return y
            return product

        def one_layer(w, x):
            state = jax.tree.map(lambda a: a[0], w)
            n = len(_variables(state))
            return apply_layer(self.block_def, _with_products(state, {
                i: recorder(i) for i in range(n)}), x)

        if isinstance(self.block_def, nnx.GraphDef):
            jax.eval_shape(one_layer, w, x)
        self.specs = {i: spec for i, (spec, _, _) in seen.items()}
        return {i: shapes for i, (_, *shapes) in seen.items()}

    def _tapped_layer(self, treedef):
        """One layer's forward, (x, tapped params, other params, taps) → y, with each tapped
        parameter's product through `tapped_product` and its tap."""
        order = sorted(self.specs)

        def layer(x, tapped, others, taps):
            by_leaf, it = dict(zip(order, tapped, strict=True)), iter(others)
            arrays = [by_leaf[i] if i in by_leaf else next(it) for i in range(treedef.num_leaves)]
            state = jax.tree.unflatten(treedef, arrays)
            products = {i: functools.partial(_tap, tap) for i, tap in zip(order, taps,
                                                                           strict=True)}
            return apply_layer(self.block_def, _with_products(state, products), x)

        return jax.checkpoint(layer) if self.remat == "layer" else layer

    def _split_params(self, w) -> tuple[tuple, tuple]:
        """The stage's parameter leaves as (tapped, every other), tapped in leaf order."""
        leaves = jax.tree.leaves(w)
        return (tuple(leaves[i] for i in sorted(self.specs)),
                tuple(a for i, a in enumerate(leaves) if i not in self.specs))

    # ---- F -----------------------------------------------------------------------------
    def forward(self, w, x, active=None):
        """(y, stash): the stage output and what B needs, a tuple of arrays. `active` ([layers]
        bools or None): layers to skip where False (padding slots, `pipeline.layout`)."""
        if active is not None and self.remat != "stage":
            return self._forward_slots(w, x, active)
        if not self.split:
            y, pull = jax.vjp(lambda w, x: self.run_stage(w, x, active), w, x)
            return y, self._pack(pull, w)
        shapes = self._learn_products(w, x)
        tapped, others = self._split_params(w)
        n = jax.tree.leaves(w)[0].shape[0]
        taps = vary(tuple(tuple(jnp.zeros((n, *s.shape), s.dtype) for s in shapes[i])
                          for i in sorted(self.specs)))
        y, pull = jax.vjp(lambda o, x, t: self._tapped_stage(w, tapped, o, x, t, active),
                          others, x, taps)
        return y, self._pack(pull, w)

    def _tapped_stage(self, w, tapped, others, x, taps, active=None):
        """The stage forward over its layers (a scan), each product through its tap."""
        layer = self._tapped_layer(jax.tree.structure(w))
        if active is not None:
            run = layer

            def layer(x, wl, ol, tl, on):
                return jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(run),
                                    lambda x, *_: x, x, wl, ol, tl)

        def stage(tapped, others, x, taps):
            layers = (tapped, others, taps) + (() if active is None else (active,))
            return jax.lax.scan(lambda x, a: (layer(x, *a), None), x, layers)[0]

        if self.remat == "stage":
            stage = jax.checkpoint(stage)
        return stage(tapped, others, x, taps)

    def _forward_slots(self, w, x, active):
        """F over a stage with padding slots (`active` False: skipped, `pipeline.layout`):
        each real slot runs its own vjp under a `lax.cond`, and its residuals, less its
        parameters, are stacked over the slots. Why not one vjp of a scan with a `lax.cond`
        per slot: the cond keeps its operands, the slot's weights, as residuals, so every
        stash slot would hold a copy of the stage's weights."""
        shapes = self._learn_products(w, x) if self.split else {}

        def real(wi, x):
            if not self.split:
                y, pull = jax.vjp(self._one_layer, wi, x)
                return y, self._pack(pull, wi)
            layer = self._tapped_layer(jax.tree.structure(wi))
            tapped, others = self._split_params(wi)
            taps = vary(tuple(tuple(jnp.zeros(s.shape, s.dtype) for s in shapes[i])
                              for i in sorted(self.specs)))
            y, pull = jax.vjp(lambda o, x, t: layer(x, tapped, o, t), others, x, taps)
            return y, self._pack(pull, wi)

        stash_shape = jax.eval_shape(real, jax.tree.map(lambda a: a[0], w), x)[1]

        def skip(wi, x):
            return x, vary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stash_shape))

        def slot(x, a):
            wi, on = a
            return jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(real), skip, wi, x)

        return jax.lax.scan(slot, x, (w, active))

    def _one_layer(self, wi, x):
        """One layer's forward (remat layer: recomputed inside the layer in its backward)."""
        run = functools.partial(apply_layer, self.block_def)
        return (jax.checkpoint(run) if self.remat == "layer" else run)(wi, x)

    # ---- B -----------------------------------------------------------------------------
    def backward(self, w, stash, g, active=None):
        """(dw, dx, kept) from F's stash and the output gradient g. Unsplit: dw is the whole
        weight gradient and kept is (). Split: dw holds only the untapped parameters' part, and
        kept (each tapped product's input and output gradient) is what W needs from B.
        `active` as given to `forward`."""
        if active is not None and self.remat != "stage":
            return self._backward_slots(w, stash, g, active)
        return self._pullback(w, stash, g)

    def _backward_slots(self, w, stash, g, active):
        """B of `_forward_slots`: each real slot's pullback, last slot first."""
        out = jax.eval_shape(self._pullback, jax.tree.map(lambda a: a[0], w),
                             jax.tree.map(lambda a: a[0], stash), g)

        def skip(wi, res, g):
            dwi, _, kept = vary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out))
            return dwi, g, kept

        def slot(g, a):
            wi, res, on = a
            dwi, dx, kept = jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(self._pullback),
                                         skip, wi, res, g)
            return dx, (dwi, kept)

        dx, (dw, kept) = jax.lax.scan(slot, g, (w, stash, active), reverse=True)
        return dw, dx, kept

    def _pullback(self, w, stash, g):
        """(dw, dx, kept): the pullback that `_pack` kept, rebuilt with the parameters."""
        it, params = iter(stash), jax.tree.leaves(w)
        pull = jax.tree.unflatten(self.treedef, [next(it) if i is None else params[i]
                                                  for i in self.sources])
        if not self.split:
            dw, dx = pull(g)
            return dw, dx, ()
        d_others, dx, taps = pull(g)
        it = iter(d_others)
        dw = jax.tree.unflatten(jax.tree.structure(w), [
            jnp.zeros_like(a) if i in self.specs else next(it) for i, a in enumerate(params)])
        return dw, dx, tuple(a for pair in taps for a in pair)

    # ---- W -----------------------------------------------------------------------------
    def weight_grads(self, w, kept, active=None):
        """The tapped weights' gradient: for each product, its inputᵀ·δ (`kept` holds the
        pairs), batched over the layers (with `active`, one layer at a time, skipping the
        padding slots)."""
        params = jax.tree.leaves(w)
        grads = [jnp.zeros_like(a) for a in params]
        for n, i in enumerate(sorted(self.specs)):
            def one(a, d, wi, spec=self.specs[i]):
                return jax.linear_transpose(
                    lambda wi: jnp.einsum(spec, a, wi.astype(a.dtype)), wi)(d)[0]

            a, d = kept[2 * n], kept[2 * n + 1]
            if active is None:
                grads[i] = jax.vmap(one)(a, d, params[i])
            else:
                def maybe(args, one=one):
                    *args, on = args
                    return jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(one),
                                        lambda a, d, wi: vary(jnp.zeros_like(wi)), *args)
                grads[i] = jax.lax.map(maybe, (a, d, params[i], active))
        return jax.tree.unflatten(jax.tree.structure(w), grads)

    # ---- residuals ---------------------------------------------------------------------
    def _pack(self, pull, w):
        """The pullback's residual leaves, less those that are the parameters themselves."""
        leaves, treedef = jax.tree.flatten(pull)
        params = jax.tree.leaves(w)
        sources = [next((i for i, a in enumerate(params) if a is leaf), None) for leaf in leaves]
        assert self.sources in (None, sources), "the residuals changed between traces"
        if self.treedef is None:  # the same layout every trace (checked by `sources` above)
            self.treedef, self.sources = treedef, sources
        return tuple(leaf for leaf, i in zip(leaves, sources, strict=True) if i is None)


def _tap(tap, spec, x, w):
    """A tapped parameter's `product`: `tapped_product` with this layer's tap."""
    return tapped_product(spec, x, w, tap)
