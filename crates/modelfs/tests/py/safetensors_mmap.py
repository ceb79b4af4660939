"""Make safetensors shards with numpy, or load them lazily through a mount
(safe_open maps the file) in shuffled order and compare each tensor with the
source's."""
import os
import random
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file


def make(d):
    rng = np.random.default_rng(7)
    for k in range(3):
        t = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((512, 1024), dtype=np.float32)
             for i in range(k * 8, k * 8 + 8)}
        t[f"model.layers.{k}.input_layernorm.weight"] = rng.standard_normal(1024).astype(np.float16)
        t[f"extra.{k}.ids"] = rng.integers(0, 1 << 40, size=(4099,), dtype=np.int64)
        save_file(t, os.path.join(d, f"model-{k + 1:05d}-of-00003.safetensors"))


def check(src, mnt):
    total = 0
    names = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    assert names, "no shards"
    for f in names:
        with safe_open(os.path.join(mnt, f), framework="np") as a, \
                safe_open(os.path.join(src, f), framework="np") as b:
            keys = list(a.keys())
            assert sorted(keys) == sorted(b.keys()), f
            random.Random(f).shuffle(keys)
            for k in keys:
                x, y = a.get_tensor(k), b.get_tensor(k)
                assert x.dtype == y.dtype and x.shape == y.shape, k
                assert x.tobytes() == y.tobytes(), f"{f}:{k} differs"
                total += x.nbytes
    print(f"verified {total} bytes")


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](*sys.argv[2:])
