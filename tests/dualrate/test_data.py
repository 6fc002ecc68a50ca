import os
import pickle

import numpy as np
import pytest

from dualrate.data import UnsafePickleError, load_mnist, restricted_load, to_uint8


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/dualrate_pwned",))


def test_restricted_unpickler_refuses_code():
    payload = pickle.dumps(Evil())
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        restricted_load(payload)
    assert not os.path.exists("/tmp/dualrate_pwned")


def test_restricted_unpickler_refuses_builtins_inside_array_tuple():
    payload = pickle.dumps((np.zeros(3), eval))
    with pytest.raises(UnsafePickleError):
        restricted_load(payload)


def test_restricted_unpickler_loads_numpy_arrays():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    for protocol in (2, 4):
        out = restricted_load(pickle.dumps(arrays, protocol=protocol))
        assert all(np.array_equal(a, b) for a, b in zip(out, arrays, strict=True))


def test_mnist_splits_padded_and_scaled():
    x, y = load_mnist("test")
    assert x.shape == (10_000, 1, 32, 32) and y.shape == (10_000,)
    assert x.min() == -1.0 and x.max() <= 1.0
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # the padding
    assert set(y.unique().tolist()) == set(range(10))
    u8 = to_uint8(x[:4], 28)
    assert u8.shape == (4, 28, 28) and u8.dtype == np.uint8
