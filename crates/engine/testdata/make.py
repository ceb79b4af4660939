#!/usr/bin/env python3
"""Writes the layout parser's fixtures with the real libraries: a safetensors
file (Python safetensors) and a GGUF file (the gguf package), each with
NAME.json listing every tensor's absolute data start and length as the
library itself reports them."""
import json
import os

import numpy as np
from safetensors.numpy import save_file
import gguf

here = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(7)

tensors = {
    "embed": rng.standard_normal((64, 48)).astype(np.float16),
    "norm": rng.standard_normal((48,)).astype(np.float32),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "ids": np.arange(5, dtype=np.int64),
    "proj": rng.standard_normal((48, 17)).astype(np.float16),
}
st = os.path.join(here, "tiny.safetensors")
save_file(tensors, st, metadata={"format": "np", "note": "a fixture"})
with open(st, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
spans = sorted([8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0]]
               for k, v in header.items() if k != "__metadata__")
json.dump(spans, open(st + ".json", "w"))

gg = os.path.join(here, "tiny.gguf")
w = gguf.GGUFWriter(gg, "llama")
w.add_custom_alignment(64)
w.add_string("general.name", "fixture")
w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
w.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
w.add_bool("some.flag", True)
w.add_tensor("tok_embd", rng.standard_normal((32, 16)).astype(np.float32))
w.add_tensor("norm", rng.standard_normal((16,)).astype(np.float16))
q = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
w.add_tensor("q8", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
w.add_tensor("last", rng.standard_normal((3, 5)).astype(np.float32))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
r = gguf.GGUFReader(gg)
json.dump(sorted([int(t.data_offset), int(t.n_bytes)] for t in r.tensors), open(gg + ".json", "w"))
