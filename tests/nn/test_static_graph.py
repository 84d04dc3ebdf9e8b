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


class _Stack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_state_reused_while_unchanged_and_values_stay_current():
    """The previous State is handed back (no graph walk) and still carries values written since: its leaves are
    the module's own Variables."""
    net = _Stack(nnx.Rngs(0))
    g1, s1 = split_static(net)
    g2, s2 = split_static(net)
    assert g1 is g2 and s2 is s1
    apply = jax.jit(lambda state, x: g1.merge(state)(x))
    x = jnp.ones((2, 4))
    fresh = lambda: nnx.merge(*nnx.split(net))(x)  # noqa: E731
    assert jnp.allclose(apply(s1, x), fresh())
    net.layers[1].kernel[...] = net.layers[1].kernel[...] * -3.0        # in-place value update
    _, s3 = split_static(net)
    assert s3 is s1
    assert jnp.allclose(apply(s3, x), fresh())
    other = _Stack(nnx.Rngs(7))
    nnx.update(net, nnx.state(other))                                   # values from another model
    _, s4 = split_static(net)
    assert jnp.allclose(apply(s4, x), other(x))


def test_structural_changes_deep_in_the_graph_are_seen():
    net = _Stack(nnx.Rngs(0))
    g1, s1 = split_static(net)
    net.layers[2] = nnx.Linear(4, 6, rngs=nnx.Rngs(1))                  # a list item replaced
    g2, s2 = split_static(net)
    assert s2 is not s1 and g2 != g1
    assert g2.merge(s2)(jnp.ones((1, 4))).shape == (1, 6)
    net.layers[0].extra = nnx.Param(jnp.zeros(2))                       # a new attribute on a nested module
    g3, s3 = split_static(net)
    assert s3 is not s2 and g3 != g2
    assert "extra" in nnx.to_pure_dict(s3)["layers"][0]
