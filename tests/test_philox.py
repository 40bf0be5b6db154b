"""The stream behind ``seed=`` (structdsl.philox): Philox4x32-10 as published, the numba
lanes' in-kernel draw bit for bit equal to it, and one seed giving one sample on every
backend."""
import numpy as np
import pytest

import structdsl
from structdsl import philox, specs
from structdsl.testing import ks_uniform_p

# Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32 with 10
# rounds): counter, key -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, want", KAT)
def test_philox_matches_the_published_known_answers(counter, key, want):
    assert tuple(int(w) for w in philox.philox4x32(*counter, *key)) == want


def test_the_uniforms_follow_the_documented_layout_and_are_uniform():
    seed = 2 ** 40 + 17
    u = philox.uniforms(seed, 5, 9)
    assert u.shape == (5, 9) and (u > 0).all() and (u < 1).all()
    # lane 3, atoms 6 and 7: counter (3, 3, 0, 0), words (0, 1) and (2, 3)
    w = philox.philox4x32(3, 3, 0, 0, seed & 0xFFFFFFFF, seed >> 32)
    bits = [(int(w[i]) >> 6) * 2 ** 26 + (int(w[i + 1]) >> 6) for i in (0, 2)]
    assert u[3, 6] == (bits[0] + 0.5) / 2 ** 52 and u[3, 7] == (bits[1] + 0.5) / 2 ** 52
    big = philox.uniforms(7, 200, 250).ravel()
    assert ks_uniform_p(big) > 1e-3
    assert abs(np.corrcoef(big[:-1], big[1:])[0, 1]) < 0.01          # neighbours independent
    assert not np.array_equal(philox.uniforms(8, 2, 4), philox.uniforms(7, 2, 4))


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2 ** 64, ValueError), (1.5, TypeError),
                                         (True, TypeError), (np.random.default_rng(0), TypeError)])
def test_a_seed_outside_the_stream_is_refused(seed, error):
    with pytest.raises(error, match="seed must"):
        structdsl.compile(specs.categorical, backend="numpy").sample(np.zeros(3), seed=seed)


def test_the_numba_lanes_draw_the_stream_bit_for_bit():
    pytest.importorskip("numba")
    from structdsl.backends.numba_kernels import philox_uniforms
    for seed, lane, atoms in ((0, 0, 7), (12345678901234, 2, 8), (2 ** 64 - 1, 1, 1), (7 + (9 << 32), 2 ** 40 + 5, 5)):
        out = np.empty(atoms)                          # odd and even sizes; a lane past 32 bits
        philox_uniforms(np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32), np.uint64(lane), out)
        assert np.array_equal(out, philox.uniforms(seed, 1, atoms, first_lane=lane)[0])


def test_every_backend_draws_the_seeded_uniforms_bit_for_bit():
    """``Program.seeded_uniforms`` (E | T's ``seed=``; the numba backend's is compiled) gives
    the stream's bits on every backend, odd and even widths, a seed past 32 bits; and
    ``conditional_noise(seed=)`` is ``conditional_noise(uniforms=)`` of those uniforms."""
    backends = ["numpy"] + [b for b in ("numba", "torch") if __import__("importlib").util.find_spec(b)]
    for backend in backends:
        prog = structdsl.compile(specs.spanning_tree, backend=backend)
        for seed, lanes, width in ((0, 3, 7), (2 ** 63 + 5, 5, 8), (2 ** 64 - 1, 1, 1), (12345678901234, 0, 4)):
            assert np.array_equal(prog.seeded_uniforms(seed, lanes, width), philox.uniforms(seed, lanes, width)), \
                (backend, seed)
    prog = structdsl.compile(specs.spanning_tree, backend=backends[-1] if "numba" not in backends else "numba")
    x = np.random.default_rng(1).normal(size=(4, 5, 5))
    trace = np.asarray(prog.sample(x, seed=3).trace)
    R = trace.shape[-1]
    u = philox.uniforms(11, 4, R + 25)
    np.testing.assert_array_equal(np.asarray(prog.conditional_noise(trace, x, seed=11)),
                                  np.asarray(prog.conditional_noise(trace, x, uniforms=u)))


@pytest.mark.parametrize("name, shape, statics", [("spanning_tree", (5, 5), {}), ("arborescence", (4, 4), {}),
                                                  ("top_k", (6,), {"k": 3}), ("binary_tree", (6,), {})])
def test_one_seed_gives_one_sample_on_every_backend(name, shape, statics):
    """seed= on numpy, numba (lanes drawing in the kernel) and torch: the traces and noise
    of the reference fed the stream's uniforms, sample dims and -inf logits included."""
    backends = ["numpy"] + [b for b, mod in (("numba", "numba"), ("torch", "torch"))
                            if __import__("importlib").util.find_spec(mod)]
    x = np.random.default_rng(0).normal(size=(3, 30) + shape)
    if len(shape) == 2:
        x[0, 0, 0, 1] = -np.inf
    ref = structdsl.compile(getattr(specs, name), backend="numpy", **statics)
    u = philox.uniforms(2 ** 63 + 5, 2 * 90, int(np.prod(shape))).reshape((2, 3, 30) + shape)
    want = ref.sample(x, uniforms=u)
    for backend in backends:
        prog = structdsl.compile(getattr(specs, name), backend=backend, **statics)
        arg = __import__("torch").as_tensor(x) if backend == "torch" else x
        got = prog.sample(arg, sample_shape=(2,), seed=2 ** 63 + 5)
        assert np.array_equal(np.asarray(got.trace), want.trace), backend
        np.testing.assert_allclose(np.asarray(got.noise), want.noise, rtol=1e-12)
