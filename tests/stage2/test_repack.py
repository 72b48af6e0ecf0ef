"""stage2/repack.py: stage 2's shards rewritten once at a training size.

Proves, on tar shards in the webdataset layout and a parquet file in Kaichengalex/YFCC15M's layout
(captions as CLIP token-id blocks):
- every good sample of the source is in the output, in the same order, with the same key and the
  same caption (the text, or token ids that caption_tokens reads as the source's), its image with a
  shortest side of 256 and the aspect kept to a pixel, as far from PIL's bicubic resize of the
  source as that resize saved by PIL at the same quality (+0.1 grey levels on average; measured
  +0.03); an image already that small keeps its bytes;
- bad samples (a corrupt JPEG, an empty caption, a caption that is not UTF-8) are left out, counted
  by reason and named;
- the loader reads the output as it is: sizes.json holds the counts, and one epoch of
  shards.Loader over it delivers every good sample once;
- resume: a shard whose job was killed (its temporary file left, no stats) is redone, the finished
  ones are not touched, and the output is byte for byte an uninterrupted run's; a restart with
  another setting is refused by name;
- the command, with 2 worker processes: the summary line and the same shards.
"""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stage2 import formats, repack, shards
from stage2.augment import TrainTransform
from tests.stage2.test_formats import PHOTOS, token_blocks, write_yfcc15m_file
from world.make_data import write_shards

ROOT = Path(__file__).resolve().parents[2]


def photo(i, long_side, mode="RGB", format="JPEG"):
    image = Image.fromarray(PHOTOS[i % len(PHOTOS)]).convert("RGB")
    image = image.resize((long_side, long_side * 3 // 4), Image.BICUBIC).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format, **({"quality": 90} if format == "JPEG" else {}))
    return buffer.getvalue()


def source_samples():
    """(key, members) with the bad ones named by their keys."""
    samples = []
    for i in range(10):
        members = {"jpg": photo(i, 400 + 11 * i), "txt": f"a photo number {i}"}
        if i == 3:
            members = {"png": photo(i, 60, format="PNG"), "txt": "a small png"}
        if i == 5:
            members["jpg"] = members["jpg"][:300]  # cut: does not decode
        if i == 6:
            members["txt"] = "   "
        if i == 8:
            members = {"jpg": photo(i, 320, mode="L"), "txt": b"\xff\xfe not utf-8"}
        samples.append((f"{i:06d}", members))
    samples.append(("000010", {"jpg": photo(10, 480, mode="CMYK"), "txt": "a cmyk photo"}))
    return samples


BAD = {"000005": "bad_image", "000006": "no_caption", "000008": "bad_caption"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    write_shards(folder / "tar", source_samples(), per_shard=4)
    rows = [(photo(i, 300 + 30 * i), token_blocks(i)) for i in range(5)]
    rows[2] = (rows[2][0], [1.0, 2.0])  # no end-of-text id: a bad caption
    write_yfcc15m_file(str(folder / "parquet" / "train-00001-of-00001.parquet"), rows, 2)
    return folder


def read_all(spec):
    return [s for u in formats.list_units(spec, progress=False) for s in formats.read_unit(u)]


def mean_difference(a, b):
    return np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean()


def assert_repacked(source_spec, out_spec, bad):
    """Every good source sample in the output, in order, same key and caption, image resized."""
    source, output = read_all(source_spec), read_all(out_spec)
    good = [s for s in source if s["key"] not in bad]
    assert [s["key"] for s in output] == [s["key"] for s in good]
    for ours, theirs in zip(output, good):
        assert ours["text"] == theirs["text"]
        assert torch.equal(formats.caption_tokens(ours), formats.caption_tokens(theirs))
        original = Image.open(io.BytesIO(theirs["image"]))
        if min(original.size) <= 256:
            assert ours["image"] == theirs["image"]
            continue
        image = Image.open(io.BytesIO(ours["image"]))
        assert image.format == "JPEG" and min(image.size) == 256
        assert abs(image.width / image.height - original.width / original.height) < 1 / 256
        expected = original.convert(image.mode).resize(image.size, Image.BICUBIC)
        saved = io.BytesIO()
        expected.save(saved, "JPEG", quality=90)  # JPEG's own loss, as PIL saves it
        assert mean_difference(image, expected) < mean_difference(Image.open(saved), expected) + 0.1
    return output


def test_repack_keeps_every_good_sample_and_names_the_bad(sources, tmp_path):
    spec = str(sources / "tar" / "{00000..00002}.tar")
    summary = repack.repack(spec, str(tmp_path / "out"), progress=False)
    output = assert_repacked(spec, summary["spec"], BAD)
    assert summary["samples"] == len(output) == 8 and summary["bad"] == 3
    assert summary["skipped"] == {"bad_image": 1, "no_caption": 1, "bad_caption": 1}
    named = {b["key"]: b["reason"] for s in range(3)
             for b in json.loads((tmp_path / "out" / f"{s:05d}_stats.json").read_text())["bad"]}
    assert named == BAD
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 4, "00001.tar": 2, "00002.tar": 2}
    # the loader: one epoch holds every good sample once
    units = formats.list_units(summary["spec"], progress=False)
    loader = shards.Loader(units, TrainTransform(32, "moco"), batch_size=4, streams=2,
                           shuffle_buffer=4)
    indices = [i for b in loader.delivered_batches(0) for i in b["indices"][b["valid"]].tolist()]
    assert sorted(indices) == list(range(8))
    assert loader.bad == 0


def test_token_id_captions_come_back_as_the_same_tokens(sources, tmp_path):
    spec = str(sources / "parquet" / "train-00001-of-00001.parquet")
    summary = repack.repack(spec, str(tmp_path / "out"), progress=False)
    assert summary["shards"] == 1 and summary["samples"] == 4
    assert summary["spec"] == str(tmp_path / "out" / "{00000..00000}.tar")
    output = assert_repacked(spec, summary["spec"], {"train-00001-of-00001.parquet/2"})
    assert all(s["text"] is None and len(s["tokens"]) == 231 for s in output)


@pytest.mark.slow
def test_a_killed_repack_resumes_to_the_same_bytes_and_other_settings_are_refused(sources,
                                                                                tmp_path):
    spec = str(sources / "tar" / "{00000..00002}.tar")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    repack.repack(spec, str(whole), progress=False)
    repack.repack(spec, str(cut), progress=False)
    # as a kill inside shard 1's job leaves it: a temporary file, no tar, no stats
    os.replace(cut / "00001.tar", cut / "00001.tar.1234.tmp")
    os.remove(cut / "00001_stats.json")
    os.remove(cut / "sizes.json")
    kept = {name: os.stat(cut / name).st_mtime_ns for name in ("00000.tar", "00002.tar")}
    run = subprocess.run([sys.executable, "-m", "stage2.repack", spec, str(cut), "--workers=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["samples"] == 8
    assert "repacking 1 of 3 shards" in run.stderr and "3 bad samples left out" in run.stderr
    assert {name: os.stat(cut / name).st_mtime_ns for name in kept} == kept
    for name in ("00000.tar", "00001.tar", "00002.tar", "sizes.json"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    refused = subprocess.run([sys.executable, "-m", "stage2.repack", spec, str(cut),
                              "--quality=80"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "quality: 90 -> 80" in refused.stderr, refused.stderr
