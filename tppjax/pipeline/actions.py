"""What a stage computes in each action of a schedule (F, B, W), with no work done twice.

F runs the stage forward once, under `jax.vjp`, and returns its pullback's residuals as a flat
tuple of arrays; the executor keeps them in ring-buffer slots until B, which rebuilds the
pullback from them (`jax.tree.unflatten`: a `jax.vjp` pullback is a pytree of its residuals)
and runs it: no forward again. Residual leaves that are the stage's parameters themselves are
left out of the tuple and put back from the live parameters when B rebuilds the pullback: they
do not change within a step, and keeping them would copy the stage into every slot.

`remat` decides what the residuals are, so it is the memory/recompute knob: "none" every
intermediate (B recomputes nothing), "layer" each layer's input (`jax.checkpoint` per layer: B
recomputes inside one layer at a time), "stage" the stage input only (B re-runs the forward).

Split backward (zero-bubble schedules, `split=True`). Every weight product of a block goes
through `models.transformer.project`; F replaces it (`project_hook`) by the same product plus a
zero "perturbation", and returns the product's input alongside the residuals. The vjp is taken
with respect to (non-weight parameters, x, perturbations), the weights held fixed, so B's
pullback gives the input gradient, the gradients of the norm gains and biases (cheap:
elementwise, computed in B) and every product's output gradient δ, and no weight-gradient
matmul. W computes exactly those matmuls, each product's inputᵀ·δ, batched over the stage's
layers. So F + B + W do the work of F + one full backward (docs/design.md §5).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from tppjax.models.transformer import project_hook
from tppjax.pipeline.gpipe import apply_layer, stage_function, vary
from tppjax.pipeline.layout import ACTIVE_SCOPE


def _tapped_weight(v) -> bool:
    """Is this parameter a weight whose products the split backward taps: an `nnx.Variable`
    that declares `role="weight"` (as every projection in `models/` does)? A plain array (a
    stage given as a plain function) is not: its gradient is computed whole in B."""
    return isinstance(v, nnx.Variable) and v.get_metadata().get("role") == "weight"


def _is_weight(w) -> list[bool]:
    """Per array leaf of a block state: is it a tapped weight (`_tapped_weight`)?"""
    variables = jax.tree.leaves(w, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return [_tapped_weight(v) for v in variables]


def _weights_and_others(w) -> tuple[tuple, tuple]:
    """A block state's array leaves, split into (tapped weights, every other parameter)."""
    leaves, is_w = jax.tree.leaves(w), _is_weight(w)
    return (tuple(a for a, k in zip(leaves, is_w, strict=True) if k),
            tuple(a for a, k in zip(leaves, is_w, strict=True) if not k))


class StageActions:
    """F, B and W of one stage's layers (`block_def`, stacked params `w` [L/p, ...])."""

    def __init__(self, block_def, remat: str, split: bool):
        self.block_def, self.remat, self.split = block_def, remat, split
        self.run_stage = stage_function(block_def, remat)
        # Filled by the first trace of `forward` (the executor traces it once before its loop,
        # to size the buffers): the pullback's treedef, where each residual leaf comes from
        # (None: kept in the stash; i: the stage's i-th parameter leaf), and, when split, each
        # weight product's (einsum spec, parameter leaf index) in call order.
        self.treedef, self.sources, self.products = None, None, None

    # ---- F -----------------------------------------------------------------------------
    def forward(self, w, x, active=None):
        """(y, stash, inputs): the stage output, what B needs and, split, what W needs from F
        (each weight product's input; () unsplit), as tuples of arrays. `active` ([layers]
        bools or None): layers to skip where False (padding slots, `pipeline.layout`)."""
        if active is not None and self.remat != "stage":
            return self._forward_slots(w, x, active)
        if not self.split:
            y, pull = jax.vjp(lambda w, x: self.run_stage(w, x, active), w, x)
            return y, self._pack(pull, w), ()
        weights, others = _weights_and_others(w)
        perts = vary(tuple(jnp.zeros((jax.tree.leaves(w)[0].shape[0], *s.shape), s.dtype)
                           for s in self._product_shapes(w, x)))
        y, pull, inputs = jax.vjp(lambda o, x, p: self._tapped(w, weights, o, x, p, active),
                                  others, x, perts, has_aux=True)
        return y, self._pack(pull, w), inputs

    def _forward_slots(self, w, x, active):
        """F over a stage with padding slots (`active` False: skipped, `pipeline.layout`):
        each real slot runs its own vjp under a `lax.cond`, and its residuals, less its
        parameters, are stacked over the slots. Why not one vjp of a scan with a `lax.cond`
        per slot: the cond keeps its operands, the slot's weights, as residuals, so every
        stash slot held a copy of the stage's weights (measured on the test model with remat
        layer: 30,915 stashed elements per micro-batch against 3,072)."""
        layer = self._tapped_layer(jax.tree.structure(w), _is_weight(w)) if self.split else None
        shapes = self._product_shapes(w, x) if self.split else ()

        def real(wi, x):
            if not self.split:
                y, pull = jax.vjp(self._one_layer, wi, x)
                return y, self._pack(pull, wi), ()
            wl, ol = _weights_and_others(wi)
            pl = vary(tuple(jnp.zeros(s.shape, s.dtype) for s in shapes))
            y, pull, inputs = jax.vjp(lambda o, x, p: layer(x, wl, o, p), ol, x, pl,
                                      has_aux=True)
            return y, self._pack(pull, wi), inputs

        out = jax.eval_shape(real, jax.tree.map(lambda a: a[0], w), x)

        def skip(wi, x):
            return (x, *vary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out[1:])))

        def slot(x, a):
            wi, on = a
            y, stash, inputs = jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(real), skip, wi, x)
            return y, (stash, inputs)

        y, (stash, inputs) = jax.lax.scan(slot, x, (w, active))
        return y, stash, inputs

    def _one_layer(self, wi, x):
        """One layer's forward (remat layer: recomputed inside the layer in its backward)."""
        run = functools.partial(apply_layer, self.block_def)
        return (jax.checkpoint(run) if self.remat == "layer" else run)(wi, x)

    def _tapped(self, w, weights, others, x, perts, active=None):
        """The stage forward with perts[i] added to the i-th weight product's output; returns
        (y, each product's input), both stacked over layers by the scan (zeros for a skipped
        layer)."""
        layer = self._tapped_layer(jax.tree.structure(w), _is_weight(w))
        if active is not None:
            run = layer

            def layer(x, wl, ol, pl, on):
                def skip(x, *_):
                    shapes = jax.eval_shape(run, x, wl, ol, pl)[1]
                    return x, vary(tuple(jnp.zeros(a.shape, a.dtype) for a in shapes))

                return jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(run), skip, x, wl, ol, pl)

        def stage(weights, others, x, perts):
            layers = (weights, others, perts) + (() if active is None else (active,))
            return jax.lax.scan(lambda x, a: layer(x, *a), x, layers)

        if self.remat == "stage":
            stage = jax.checkpoint(stage)
        return stage(weights, others, x, perts)

    def _tapped_layer(self, treedef, is_w):
        """One layer's forward with perts[i] added to its i-th weight product's output:
        (x, weights, other params, perts) → (y, each product's input)."""

        def layer(x, wl, ol, pl):
            it_w, it_o = iter(wl), iter(ol)
            state = jax.tree.unflatten(treedef, [next(it_w) if k else next(it_o) for k in is_w])
            inputs, taps, products = [], iter(pl), []

            def hook(spec, a, var):
                if not _tapped_weight(var):
                    return jnp.einsum(spec, a, var[...].astype(a.dtype))
                inputs.append(a)
                products.append((spec, next(i for i, b in enumerate(wl) if b is var[...])))
                return jnp.einsum(spec, a, var[...].astype(a.dtype)) + next(taps)

            with project_hook(hook):
                y = apply_layer(self.block_def, state, x)
            self._record_products(products, is_w)
            return y, tuple(inputs)

        return jax.checkpoint(layer) if self.remat == "layer" else layer

    def _record_products(self, products, is_w):
        # Leaf index among the weights → among all of the stage's parameter leaves.
        where = [i for i, k in enumerate(is_w) if k]
        products = [(spec, where[j]) for spec, j in products]
        assert self.products in (None, products), "the block's weight products changed"
        self.products = products

    def _product_shapes(self, w, x):
        """Shape and dtype of every weight product's output in one layer."""
        shapes = []

        def hook(spec, a, var):
            y = jnp.einsum(spec, a, var[...].astype(a.dtype))
            if _tapped_weight(var):
                shapes.append(jax.ShapeDtypeStruct(y.shape, y.dtype))
            return y

        def one_layer(w, x):
            with project_hook(hook):
                return apply_layer(self.block_def, jax.tree.map(lambda a: a[0], w), x)

        jax.eval_shape(one_layer, w, x)
        return shapes

    # ---- B -----------------------------------------------------------------------------
    def backward(self, w, stash, g, active=None):
        """(dw, dx, deltas) from F's stash and the output gradient g. Unsplit: dw is the whole
        weight gradient and deltas is (). Split: dw holds only the non-weight parameters' part,
        and deltas (each product's output gradient) is what W needs from B. `active` as given
        to `forward`."""
        if active is not None and self.remat != "stage":
            return self._backward_slots(w, stash, g, active)
        return self._pullback(w, stash, g)

    def _backward_slots(self, w, stash, g, active):
        """B of `_forward_slots`: each real slot's pullback, last slot first."""
        out = jax.eval_shape(self._pullback, jax.tree.map(lambda a: a[0], w),
                             jax.tree.map(lambda a: a[0], stash), g)

        def skip(wi, res, g):
            dwi, _, deltas = vary(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out))
            return dwi, g, deltas

        def slot(g, a):
            wi, res, on = a
            dwi, dx, deltas = jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(self._pullback),
                                           skip, wi, res, g)
            return dx, (dwi, deltas)

        dx, (dw, deltas) = jax.lax.scan(slot, g, (w, stash, active), reverse=True)
        return dw, dx, deltas

    def _pullback(self, w, stash, g):
        """(dw, dx, deltas): the pullback that `_pack` kept, rebuilt with the parameters."""
        it, params = iter(stash), jax.tree.leaves(w)
        pull = jax.tree.unflatten(self.treedef, [next(it) if i is None else params[i]
                                                  for i in self.sources])
        if not self.split:
            dw, dx = pull(g)
            return dw, dx, ()
        d_others, dx, deltas = pull(g)
        it = iter(d_others)
        dw = jax.tree.unflatten(jax.tree.structure(w), [
            jnp.zeros_like(a) if k else next(it) for a, k in zip(params, _is_weight(w))])
        return dw, dx, tuple(deltas)

    # ---- W -----------------------------------------------------------------------------
    def weight_grads(self, w, inputs, deltas, active=None):
        """The weights' gradient: for each product, its inputᵀ·δ, batched over the layers
        (with `active`, one layer at a time, skipping the padding slots)."""
        params = jax.tree.leaves(w)
        grads = [jnp.zeros_like(a) for a in params]
        for (spec, i), a, d in zip(self.products, inputs, deltas, strict=True):
            def one(a, d, wi, spec=spec):
                def product(wi):
                    return jnp.einsum(spec, a, wi.astype(a.dtype))
                return jax.linear_transpose(product, wi)(d)[0]

            if active is None:
                grads[i] = grads[i] + jax.vmap(one)(a, d, params[i])
            else:
                def maybe(args, one=one):
                    *args, on = args
                    return jax.lax.cond(on, jax.named_scope(ACTIVE_SCOPE)(one),
                                        lambda a, d, wi: vary(jnp.zeros_like(wi)), *args)
                grads[i] = grads[i] + jax.lax.map(maybe, (a, d, params[i], active))
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
