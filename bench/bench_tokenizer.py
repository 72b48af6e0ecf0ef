"""Strings per second: data.tokenize (ours) vs open_clip.tokenize, on the same 10,000 real strings.

    python bench/bench_tokenizer.py

The strings are spread evenly over every JSON file shipped in clip_benchmark (multilingual class
names, templates, CuPL and NLLB prompts). Each side gets a fresh tokenizer, so the first pass
includes filling the per-word BPE cache ("cold"); the second pass reuses it ("warm"), as a data
loader does after its first batches. The ids are checked equal before anything is timed.
"""
import glob
import json
import os
import sys
import time

import clip_benchmark
import open_clip
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402  (the kit's root is not a package)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
# the same walk over the JSON files as the tests
from test_tokenizer import strings_in  # noqa: E402

NUM_STRINGS = 10_000


def real_strings():
    folder = os.path.join(os.path.dirname(clip_benchmark.__file__), "datasets")
    strings = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as file:
            strings += strings_in(json.load(file))
    strings = list(dict.fromkeys(strings))
    return strings[:: len(strings) // NUM_STRINGS][:NUM_STRINGS]


def strings_per_second(tokenize, texts):
    start = time.perf_counter()
    tokenize(texts)
    return len(texts) / (time.perf_counter() - start)


def main():
    texts = real_strings()
    assert torch.equal(data.tokenize(texts), open_clip.tokenize(texts)), "ids differ from open_clip"
    data._tokenizer = data.Tokenizer()  # fresh, empty word caches on both sides
    open_clip.tokenizer._tokenizer = open_clip.tokenizer.SimpleTokenizer()
    print(f"{len(texts)} strings, torch {torch.__version__}, open_clip {open_clip.__version__}")
    for name in ("cold", "warm"):
        ours = strings_per_second(data.tokenize, texts)
        theirs = strings_per_second(open_clip.tokenize, texts)
        print(f"{name}: ours {ours:,.0f} strings/s | open_clip {theirs:,.0f} strings/s | "
              f"ours/theirs {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
