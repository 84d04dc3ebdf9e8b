"""argmax_last: the CPU-friendly argmax the greedy decode paths use must agree with jnp.argmax exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax.decode.sampling import SamplingConfig, argmax_last, sample_tokens


@pytest.mark.parametrize("shape", [(5,), (3, 2048), (2, 7, 1000), (1, 151936)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_argmax_last_equals_jnp_argmax(shape, dtype):
    x = jax.random.normal(jax.random.key(sum(shape)), shape).astype(dtype)
    got = argmax_last(x)
    assert got.dtype == jnp.int32 and got.shape == shape[:-1]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))


def test_argmax_last_ties_and_infinities():
    x = jnp.asarray([[1.0, 3.0, 3.0, 0.0],            # tie: the first maximal index, like jnp.argmax
                     [-jnp.inf] * 4,                  # all -inf: index 0, like jnp.argmax
                     [-jnp.inf, 2.0, jnp.inf, jnp.inf],
                     [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(argmax_last(x)), np.asarray(jnp.argmax(x, axis=-1)))


def test_argmax_last_nan_row_stays_in_range():
    x = jnp.asarray([[0.0, jnp.nan, 1.0]])
    assert 0 <= int(argmax_last(x)[0]) < 3


def test_greedy_sample_tokens_uses_the_first_max():
    logits = jnp.asarray([[0.5, 2.0, 2.0], [9.0, -1.0, 9.0]])
    np.testing.assert_array_equal(np.asarray(sample_tokens(logits, jax.random.key(0), SamplingConfig())), [1, 0])
