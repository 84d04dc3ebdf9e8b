"""split_static: the GraphDef wrapper jit keys on is reused while a module's structure is unchanged."""

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.nn.static_graph import StaticGraph, split_static


class _Net(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, width, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)


def test_wrapper_reused_until_the_structure_changes():
    net = _Net(3, nnx.Rngs(0))
    g1, s1 = split_static(net)
    g2, s2 = split_static(net)
    assert g1 is g2                                      # same structure: same wrapper, jit hits by identity
    assert hash(g1) == hash(g1.graphdef)
    net.lin = nnx.Linear(4, 5, rngs=nnx.Rngs(1))         # a new submodule of another shape
    g3, s3 = split_static(net)
    assert g3 is not g1 and g3 != g1
    assert g3.merge(s3)(jnp.ones((1, 4))).shape == (1, 5)


def test_equal_structures_compare_equal_and_values_follow_the_module():
    a, b = _Net(3, nnx.Rngs(0)), _Net(3, nnx.Rngs(1))
    ga, _ = split_static(a)
    gb, _ = split_static(b)
    assert ga == gb and hash(ga) == hash(gb)             # one compiled program serves both modules
    assert isinstance(ga, StaticGraph)

    calls = []

    @jax.jit
    def apply(state, x):
        calls.append(1)
        return ga.merge(state)(x)

    x = jnp.ones((2, 4))
    _, sa = split_static(a)
    y0 = apply(sa, x)
    a.lin.kernel.value = a.lin.kernel.value * 2.0        # new values, same structure: the fresh state carries them
    _, sa2 = split_static(a)
    y1 = apply(sa2, x)
    assert len(calls) == 1
    assert jnp.allclose(y1 - a.lin.bias.value, 2.0 * (y0 - a.lin.bias.value))
