"""b-bit packing: exact round trips for bits 2..8 and the documented byte layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from epmq_jax.quant import QuantizedWeight, QuantSpec, pack_codes, unpack_codes


def np_bitstream_pack(codes, bits):
    """Independent packer: per column, code i at stream bits [i*bits, (i+1)*bits), LSB first."""
    d_in, d_out = codes.shape
    nbytes = -(-d_in // 8) * bits
    out = np.zeros((nbytes, d_out), np.uint8)
    for i in range(d_in):
        for b in range(bits):
            pos = i * bits + b
            out[pos // 8] |= (((codes[i] >> b) & 1) << (pos % 8)).astype(np.uint8)
    return out


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("d_in", [8, 37])
def test_round_trip_and_layout(bits, d_in):
    rng = np.random.default_rng(bits * 100 + d_in)
    codes = rng.integers(0, 2**bits, size=(d_in, 6), dtype=np.uint8)
    codes[0] = 2**bits - 1     # extremes
    codes[1] = 0
    packed = np.asarray(pack_codes(jnp.asarray(codes), bits))
    assert packed.dtype == np.uint8 and packed.shape == (-(-d_in // 8) * bits, 6)
    np.testing.assert_array_equal(packed, np_bitstream_pack(codes, bits))
    np.testing.assert_array_equal(np.asarray(unpack_codes(jnp.asarray(packed), bits, d_in)), codes)


def test_four_bit_is_two_codes_per_byte_low_nibble_first():
    codes = np.array([[1], [2], [15], [0], [3], [4], [5], [6]], np.uint8)
    packed = np.asarray(pack_codes(jnp.asarray(codes), 4))
    np.testing.assert_array_equal(packed[:, 0], [0x21, 0x0F, 0x43, 0x65])


def test_quantized_weight_is_a_pytree_with_static_metadata():
    import jax
    codes = jnp.asarray(np.arange(32).reshape(16, 2) % 16, jnp.uint8)
    qw = QuantizedWeight.from_codes(codes, jnp.ones((1, 2)), jnp.full((1, 2), 8.0),
                                    jnp.zeros(16, jnp.int32), QuantSpec(group_size=-1))
    leaves, treedef = jax.tree.flatten(qw)
    assert len(leaves) == 4   # packed, scales, zeros, g_idx (input_scale None)
    qw2 = jax.tree.unflatten(treedef, leaves)
    np.testing.assert_array_equal(qw2.dequantize(), np.asarray(codes, np.float32) - 8.0)
    assert qw2.spec == QuantSpec(group_size=-1) and qw2.shape == (16, 2)
    doubled = jax.jit(lambda q: q.dequantize() * 2)(qw)
    np.testing.assert_array_equal(doubled, 2 * (np.asarray(codes, np.float32) - 8.0))
