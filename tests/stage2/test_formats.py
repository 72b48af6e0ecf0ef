"""stage2/formats.py: shard specs, units, sample counts and raw samples, proved against the real
producers.

Where each format comes from:
- tar shards: the webdataset library's reader is the reference for grouping members into samples,
  on a real webdataset shard (tests/fixtures, from the webdataset project) and on shards written
  here with the corner cases its rules cover (gzip, upper-case extensions, folders, __meta__
  members, repeats);
- specs: bash's own brace expansion;
- parquet: written with pyarrow in the two hub releases' exact schemas (Kaichengalex/YFCC15M's
  Image struct and float32 token blocks, dalle-mini/YFCC100M_OpenAI_subset's binary + string
  columns), with the `huggingface` schema metadata the datasets library writes;
- img2dataset output: img2dataset itself, run offline against a local HTTP server on 127.0.0.1;
- captions: open_clip.tokenize (the reference CLIP tokenizer), for strings and for token-id blocks.
"""
import csv
import functools
import gzip
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image
from skimage import data as skdata

from stage2 import formats
from world.make_data import write_shards

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "webdataset-mnist-sample.tgz"


def photo_jpeg(i, size=40, photo=None):
    """A real-photo crop (scikit-image's astronaut by default), different for each i, as JPEG
    bytes."""
    photo = skdata.astronaut() if photo is None else photo
    y, x = (37 * i) % (photo.shape[0] - size), (53 * i) % (photo.shape[1] - size)
    buffer = io.BytesIO()
    Image.fromarray(photo[y : y + size, x : x + size]).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def caption(i):
    return f"a photo, number {i}"


def pairs(n, start=0):
    for i in range(start, start + n):
        yield f"{i:06d}", {"jpg": photo_jpeg(i), "txt": caption(i)}


def webdataset_samples(paths):
    """The webdataset library's view of the shards: grouped samples, undecoded, in order."""
    return [dict(s) for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False,
                                            empty_check=False)]


def read_all(paths, **kwargs):
    return [s for unit in formats.list_units([str(p) for p in paths], progress=False, **kwargs)
            for s in formats.read_unit(unit)]


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["/d/{00008..00011}.tar", "/d/{a,b}/s{1..2}.tar", "/d/{8..11}.tar",
                                  "/d/{3..1}.tar", "/d/plain.tar",
                                  "/d/train-{00001..00003}-of-01507.parquet",
                                  "/d/{x,y}{07..09}.tar"])
def test_expand_spec_like_bash(spec):
    bash = subprocess.run(["bash", "-c", f"printf '%s\\n' {spec}"], capture_output=True, text=True,
                          check=True)
    assert formats.expand_spec(spec) == bash.stdout.split()


def test_wildcards_expand_like_bash(tmp_path):
    for name in ("train-00002-of-00003.parquet", "train-00001-of-00003.parquet",
                 "train-00003-of-00003.parquet", "other.tar"):
        (tmp_path / name).write_bytes(b"")
    for spec in (f"{tmp_path}/train-*.parquet", f"{tmp_path}/{{train,other}}*",
                 f"{tmp_path}/nothing-*.tar"):
        bash = subprocess.run(["bash", "-c", f"printf '%s\\n' {spec}"], capture_output=True,
                              text=True, check=True, env={**os.environ, "LC_ALL": "C"})
        assert formats.expand_spec(spec) == bash.stdout.split()


def test_specs_join_with_double_colon():
    assert (formats.expand_spec("/a/{0..1}.tar::/b/c.parquet")
            == ["/a/0.tar", "/a/1.tar", "/b/c.parquet"])
    assert formats.expand_spec(["/a/{0..1}.tar", "/b.tar"]) == ["/a/0.tar", "/a/1.tar", "/b.tar"]


def test_a_spec_that_matches_nothing_names_itself_and_the_missing_files(tmp_path):
    write_shards(tmp_path, pairs(2), per_shard=1)
    spec = str(tmp_path / "{00000..00003}.tar")
    with pytest.raises(FileNotFoundError) as error:
        formats.list_units(spec)
    assert (spec in str(error.value) and "2 of 4" in str(error.value)
            and "00002.tar" in str(error.value))
    with pytest.raises(FileNotFoundError, match="names no file"):
        formats.list_units("::")


# --------------------------------------------------------------------------------------------------
# Tar shards against the webdataset library
# --------------------------------------------------------------------------------------------------

def test_real_webdataset_shard_reads_as_webdataset_does(tmp_path):
    # the counting pass saves beside the shard: not into the repository
    shutil.copy(FIXTURE, tmp_path)
    path = tmp_path / FIXTURE.name
    ours, theirs = read_all([path]), webdataset_samples([path])
    assert len(ours) == len(theirs) == 90
    assert [s["key"] for s in ours] == [s["__key__"] for s in theirs]
    assert [s["image"] for s in ours] == [s["png"] for s in theirs]  # same bytes, same order
    # png + cls: no caption
    assert all(s["text"] is None and s["source"] == str(path) for s in ours)
    assert formats.list_units(str(path), progress=False) == [formats.Unit(str(path), -1, 90)]


def write_tar(path, members, mode="w"):
    with tarfile.open(path, mode) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_written_shards_group_as_webdataset_does(tmp_path):
    paths = write_shards(tmp_path, pairs(25), per_shard=10)
    # The corner cases of webdataset's rules: a gzipped tar, upper-case extensions, folders in
    # names, a directory member and names without extension (skipped), a __meta__.json member (a
    # sample to webdataset too), png and webp images, a sample without caption.
    odd = [("sub/", None), ("sub/dir/0001.JPG", photo_jpeg(100)),
           ("sub/dir/0001.Txt", b"upper case"), ("__meta__.json", b"{}"),
           ("README", b"no extension"), ("__meta__", b"none"),
           ("sub/dir/0002.jpg", photo_jpeg(101)), ("sub/dir/0002.txt", b"second"),
           ("x.seg.png", photo_jpeg(102)), ("y.webp", photo_jpeg(103)),
           ("y.txt", "caf\u00e9 \u65e5\u672c".encode())]
    write_tar(tmp_path / "odd.tar.gz", odd, "w:gz")
    write_tar(tmp_path / "odd.tar", odd)
    all_paths = [*paths, tmp_path / "odd.tar.gz", tmp_path / "odd.tar"]
    ours, theirs = read_all(all_paths), webdataset_samples(all_paths)
    assert len(ours) == len(theirs) == 25 + 2 * 5
    assert [s["key"] for s in ours] == [s["__key__"] for s in theirs]
    for mine, reference in zip(ours, theirs):
        image_ext = next((e for e in formats.IMAGE_EXTENSIONS if e in reference), None)
        assert mine["image"] == (reference[image_ext] if image_ext else None)
        assert mine["text"] == (reference["txt"].decode() if "txt" in reference else None)
    assert ours[-1] == {"key": "y", "source": str(tmp_path / "odd.tar"), "image": photo_jpeg(103),
                        "text": "caf\u00e9 \u65e5\u672c", "tokens": None}


def test_a_repeated_extension_starts_a_new_sample(tmp_path):
    # webdataset 1.0.2 raises on this ("duplicate file name"); older webdataset releases and the
    # kit's earlier reader start a new sample, which keeps both pairs of a writer that reused a key.
    write_tar(tmp_path / "a.tar", [("k.jpg", photo_jpeg(0)), ("k.txt", b"one"),
                                   ("k.jpg", photo_jpeg(1)), ("k.txt", b"two")])
    assert [(s["key"], s["image"], s["text"]) for s in read_all([tmp_path / "a.tar"])] == [
        ("k", photo_jpeg(0), "one"), ("k", photo_jpeg(1), "two")]


def test_start_skips_earlier_samples_without_reading_their_data(tmp_path, monkeypatch):
    paths = write_shards(tmp_path, pairs(12), per_shard=12)
    gz = tmp_path / "00000.tar.gz"
    gz.write_bytes(gzip.compress(Path(paths[0]).read_bytes()))
    for path in (paths[0], gz):
        unit = formats.list_units([str(path)], progress=False)[0]
        everything = list(formats.read_unit(unit))
        read = []
        real_extractfile = tarfile.TarFile.extractfile
        monkeypatch.setattr(tarfile.TarFile, "extractfile",
                            lambda self, m: read.append(m.name) or real_extractfile(self, m))
        assert list(formats.read_unit(unit, start=7)) == everything[7:]
        assert read == [f"{i:06d}.{e}" for i in range(7, 12) for e in ("jpg", "txt")]
        assert list(formats.read_unit(unit, start=12)) == []
        monkeypatch.undo()


def test_a_tar_entered_at_a_known_sample_reads_as_a_whole_parse_does(tmp_path, monkeypatch):
    """formats keeps each plain tar's sample offsets it has seen (an LRU of TAR_INDEX_FILES): a
    later start seeks to the nearest known sample. Every start, in every order, cold and warm,
    on a tar of odd members (a directory, __meta__ and extensionless members, long names that need
    pax headers), gives the whole parse's samples; a rewritten file drops its offsets."""
    long = "d" * 120  # a member name over ustar's 100 characters: a pax header each
    members = [("sub/", None)]
    for i in range(9):
        members += [(f"{long}/{i:04d}.jpg", photo_jpeg(i)), (f"{long}/{i:04d}.txt", b"c %d" % i)]
        if i == 4:
            members += [("__meta__.json", b"{}"), ("README", b"x")]
    write_tar(tmp_path / "odd.tar", members, "w:")
    unit = formats.list_units([str(tmp_path / "odd.tar")], progress=False)[0]
    monkeypatch.setattr(formats, "_tar_index", formats.collections.OrderedDict())
    whole = list(formats.read_unit(unit))
    assert len(whole) == unit.samples == 10  # __meta__.json is a sample to webdataset too
    for starts in (range(11), reversed(range(11)), [5, 2, 9, 0, 7]):
        for start in starts:
            assert list(formats.read_unit(unit, start)) == whole[start:], start
        assert len(formats._tar_index[str(tmp_path / "odd.tar")][1]) == 10
    write_tar(tmp_path / "odd.tar", members[:-2], "w:")  # rewritten: one sample fewer
    unit = formats.list_units([str(tmp_path / "odd.tar")], progress=False)[0]
    assert list(formats.read_unit(unit, 8)) == whole[8:9]


# --------------------------------------------------------------------------------------------------
# Sample counts
# --------------------------------------------------------------------------------------------------

def test_counts_come_from_sizes_json_without_reading_shards(tmp_path, monkeypatch):
    write_shards(tmp_path, pairs(7), per_shard=3)  # writes sizes.json, as webdataset's tools do
    monkeypatch.setattr(formats, "count_tar_samples", lambda path: pytest.fail(f"counted {path}"))
    units = formats.list_units(str(tmp_path / "{00000..00002}.tar"), progress=False)
    assert [u.samples for u in units] == [3, 3, 1] and all(u.row_group == -1 for u in units)


def test_counting_pass_is_saved_and_reused(tmp_path, monkeypatch):
    write_shards(tmp_path, pairs(7), per_shard=3)
    os.remove(tmp_path / "sizes.json")
    spec = str(tmp_path / "{00000..00002}.tar")
    assert [u.samples for u in formats.list_units(spec, progress=False)] == [3, 3, 1]
    saved = json.loads((tmp_path / formats.COUNTS_FILE).read_text())["files"]
    assert ({name: entry["samples"] for name, entry in saved.items()}
            == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1})

    # A second start reads nothing; a shard that changed (size, mtime) is counted again, alone.
    counted = []
    real = formats.count_tar_samples
    monkeypatch.setattr(formats, "count_tar_samples",
                        lambda path: counted.append(path) or real(path))
    assert ([u.samples for u in formats.list_units(spec, progress=False)] == [3, 3, 1]
            and counted == [])
    write_shards(tmp_path / "new", pairs(2), per_shard=2)
    shutil.copy(tmp_path / "new" / "00000.tar", tmp_path / "00002.tar")
    assert [u.samples for u in formats.list_units(spec, progress=False)] == [3, 3, 2]
    assert counted == [str(tmp_path / "00002.tar")]


def test_a_killed_counting_pass_keeps_what_it_counted(tmp_path, monkeypatch):
    write_shards(tmp_path, pairs(8), per_shard=2)
    os.remove(tmp_path / "sizes.json")
    monkeypatch.chdir(tmp_path)  # a spec relative to the current folder
    clock = iter(range(0, 10**6, 100))
    # 100 s per shard: a save after each
    monkeypatch.setattr(formats.time, "monotonic", lambda: next(clock))
    real, calls = formats.count_tar_samples, []

    def killed_at_the_third(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(formats, "count_tar_samples", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        formats.list_units("{00000..00003}.tar", progress=False)
    saved = json.loads((tmp_path / formats.COUNTS_FILE).read_text())["files"]
    assert ({name: entry["samples"] for name, entry in saved.items()}
            == {"00000.tar": 2, "00001.tar": 2})
    calls.clear()
    monkeypatch.setattr(formats, "count_tar_samples", lambda path: calls.append(path) or real(path))
    assert formats.list_units("{00000..00003}.tar", progress=False) == [
        formats.Unit(f"{i:05d}.tar", -1, 2) for i in range(4)]
    assert calls == ["00002.tar", "00003.tar"]  # the restart counts only what was left


def test_counting_pass_in_a_read_only_folder_goes_to_cache_dir(tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "shards", pairs(4), per_shard=2)
    os.remove(tmp_path / "shards" / "sizes.json")
    # The counts file cannot be written there (a directory stands in its place: read-only even for
    # root).
    (tmp_path / "shards" / formats.COUNTS_FILE).mkdir()
    spec, cache = str(tmp_path / "shards" / "{00000..00001}.tar"), tmp_path / "cache"
    assert [u.samples for u in formats.list_units(spec, cache_dir=cache, progress=True)] == [2, 2]
    assert "counting samples" in capsys.readouterr().err  # a progress bar while counting
    assert len(list(cache.glob("counts-*.json"))) == 1
    monkeypatch.setattr(formats, "count_tar_samples",
                        lambda path: pytest.fail(f"counted {path} again"))
    assert [u.samples for u in formats.list_units(spec, cache_dir=cache, progress=False)] == [2, 2]


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

def test_truncated_and_unreadable_tars_end_with_a_problem_marker(tmp_path):
    paths = write_shards(tmp_path, pairs(12), per_shard=6)
    os.remove(tmp_path / "sizes.json")
    with tarfile.open(paths[0]) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000003.jpg").offset_data + 100
    whole = Path(paths[0]).read_bytes()
    Path(paths[0]).write_bytes(whole[:cut])  # cut inside sample 3's image: samples 0-2 survive
    # cut just before sample 3
    (tmp_path / "cut_at_header.tar").write_bytes(whole[:cut - 100 - 512])
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(whole)[:len(gzip.compress(whole)) // 2])
    Path(paths[1]).write_bytes(b"this is not a tar file" * 30)
    # A file that is no tar at all, alone, is an error (nothing would train); among others, a
    # unit of 0 samples whose reading ends in the marker.
    with pytest.raises(ValueError, match=r"00001.tar: not a tar archive"):
        formats.list_units([str(paths[1])], progress=False)
    good = write_shards(tmp_path / "good", pairs(2), per_shard=2)[0]
    for path, survivors, problem in ((paths[0], 3, "truncated_shard"),
                                     (tmp_path / "cut_at_header.tar", 3, "truncated_shard"),
                                     (paths[1], 0, "unreadable_file")):
        unit = formats.list_units([str(path), good], progress=False)[0]
        assert unit.samples == survivors  # the counting pass counts what can be read
        *samples, last = formats.read_unit(unit)
        assert [s["text"] for s in samples] == [caption(i) for i in range(survivors)]
        assert last["problem"] == problem and last["source"] == str(path) and last["error"]
    *samples, last = formats.read_unit(formats.Unit(str(tmp_path / "cut.tar.gz"), -1, 6))
    assert last["problem"] == "truncated_shard" and len(samples) < 6
    assert set(formats.SKIP_REASONS) >= {"truncated_shard", "unreadable_file", "bad_caption",
                                         "no_caption"}


# --------------------------------------------------------------------------------------------------
# Captions against open_clip's tokenizer
# --------------------------------------------------------------------------------------------------

TEXTS = ["a photo of a cat", "Caf\u00e9 \u00fcber \u65e5\u672c\u8a9e  &amp;amp; <b>bold</b>!",
         "word " * 100, "it's 3.14 o'clock", "\u00a0tabs\tand\nnewlines  "]


def test_caption_tokens_of_strings_equal_open_clip():
    for text in TEXTS:
        assert torch.equal(formats.caption_tokens({"text": text}), open_clip.tokenize([text])[0])
    assert formats.caption_tokens({"text": "a cat"}, context_length=16).shape == (16,)
    assert formats.caption_tokens({"text": "  "}) == "no_caption"
    assert formats.caption_tokens({"text": None, "tokens": None}) == "no_caption"


def test_caption_tokens_of_token_blocks_take_the_first_block():
    # Kaichengalex/YFCC15M's `texts`: three 77-id blocks of CLIP ids as float32 (RWKV-CLIP's
    # data2rec.py concatenates the tokenised raw, synthetic and generated captions); the first is
    # the raw caption.
    blocks = open_clip.tokenize(TEXTS[:3]).numpy().reshape(-1).astype(np.float32)
    assert torch.equal(formats.caption_tokens({"tokens": list(blocks)}),
                       open_clip.tokenize([TEXTS[0]])[0])
    assert torch.equal(formats.caption_tokens({"tokens": blocks[:77]}),
                       open_clip.tokenize([TEXTS[0]])[0])
    short = [49406.0, 320.0, 49407.0]  # shorter than a block: padded with zeros
    assert formats.caption_tokens({"tokens": short}).tolist() == [49406, 320, 49407] + [0] * 74
    bad = [[49406.0, 320.0, 0.0], [49406.0, 49408.0, 49407.0], [49406.0, -1.0, 49407.0],
           [49406.0, 320.5, 49407.0], [49406.0, float("nan"), 49407.0], [49406.0, None, 49407.0]]
    assert [formats.caption_tokens({"tokens": b}) for b in bad] == ["bad_caption"] * len(bad)
    assert formats.caption_tokens({"tokens": []}) == "no_caption"


def test_undecodable_tar_caption_is_a_bad_caption(tmp_path):
    write_tar(tmp_path / "a.tar", [("0.jpg", photo_jpeg(0)), ("0.txt", b"\xff\xfe bad utf-8"),
                                   ("1.jpg", photo_jpeg(1)), ("1.txt", b"good")])
    first, second = read_all([tmp_path / "a.tar"])
    assert formats.caption_tokens(first) == "bad_caption"
    assert torch.equal(formats.caption_tokens(second), open_clip.tokenize(["good"])[0])


# --------------------------------------------------------------------------------------------------
# Parquet, in the two hub releases' exact schemas
# --------------------------------------------------------------------------------------------------
# Written with pyarrow as the Hugging Face `datasets` library writes them (its features/image.py,
# features/features.py, arrow_writer.py): an Image feature is struct<bytes: binary, path: string>,
# a Sequence(Value("float32")) is list<float32>, every field nullable, and the features are stored
# as JSON under the schema metadata key "huggingface" (datasets 2.x-3.x name a list feature
# "Sequence", 4.x "List"; readers ignore the key); image datasets get 100-row row groups
# (config.PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS; 10 here, to get several from few rows).

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PHOTOS = (skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket())


def hub_photo(i):
    return photo_jpeg(i, size=48, photo=PHOTOS[i % len(PHOTOS)])


def huggingface_metadata(features):
    return {"huggingface": json.dumps({"info": {"features": features}})}


def three_captions(i):
    return [caption(i), f"synthetic caption {i}", f"a generated caption of photo {i}"]


def write_yfcc15m_file(path, rows, row_group_size=10):
    """Kaichengalex/YFCC15M's layout: `images` (Image feature), `texts` (list<float32>: three 77-id
    CLIP blocks, raw / synthetic / generated caption, as RWKV-CLIP's data2rec.py concatenates them).
    rows: (jpeg bytes or None, token list or None)."""
    schema = pa.schema([pa.field("images", HF_IMAGE), pa.field("texts", pa.list_(pa.float32()))],
                       metadata=huggingface_metadata({
                           "images": {"_type": "Image"},
                           "texts": {"feature": {"dtype": "float32", "_type": "Value"},
                                     "_type": "Sequence"}}))
    images = [None if jpeg is None else {"bytes": jpeg, "path": f"{abs(hash(jpeg)) % 10**8}.jpg"}
              for jpeg, _ in rows]
    table = pa.table({"images": images, "texts": [t for _, t in rows]}, schema=schema)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def token_blocks(i):
    # 231 ids, float32 on disk
    return open_clip.tokenize(three_captions(i)).reshape(-1).float().tolist()


def test_kaichengalex_yfcc15m_layout(tmp_path, monkeypatch):
    # as `huggingface-cli download --local-dir YFCC15M` lays it out
    root = tmp_path / "YFCC15M" / "data"
    for f in range(3):
        rows = [(hub_photo(10 * f + i), token_blocks(10 * f + i))
                for i in range(23 if f < 2 else 5)]
        write_yfcc15m_file(str(root / f"train-{f + 1:05d}-of-00003.parquet"), rows)
    spec = str(root / "train-{00001..00003}-of-00003.parquet")

    # Counts come from the footer: no column chunk is read.
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda *a, **k: pytest.fail("read data to count"))
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda *a, **k: pytest.fail("read data to count"))
    units = formats.list_units(spec, image_column="images", text_column="texts", progress=False)
    monkeypatch.undo()
    assert [(os.path.basename(u.path), u.row_group, u.samples) for u in units] == [
        ("train-00001-of-00003.parquet", 0, 10), ("train-00001-of-00003.parquet", 1, 10),
        ("train-00001-of-00003.parquet", 2, 3),
        ("train-00002-of-00003.parquet", 0, 10), ("train-00002-of-00003.parquet", 1, 10),
        ("train-00002-of-00003.parquet", 2, 3),
        ("train-00003-of-00003.parquet", 0, 5)]

    # the defaults are this release's columns
    samples = [s for u in units for s in formats.read_unit(u)]
    expected = [10 * f + i for f in range(3) for i in range(23 if f < 2 else 5)]
    assert len(samples) == len(expected)
    for sample, i in zip(samples, expected):
        assert sample["image"] == hub_photo(i) and sample["text"] is None
        # the raw caption
        assert torch.equal(formats.caption_tokens(sample), open_clip.tokenize([caption(i)])[0])
    assert samples[12]["source"] == str(root / "train-00001-of-00003.parquet") + "#1"
    assert samples[12]["key"] == "train-00001-of-00003.parquet/12"  # no key column: file and row
    assert len({s["key"] for s in samples}) == len(samples)


def test_parquet_start_reads_only_its_row_group_and_columns(tmp_path, monkeypatch):
    path = str(tmp_path / "train-00001-of-00001.parquet")
    write_yfcc15m_file(path, [(hub_photo(i), token_blocks(i)) for i in range(30)])
    units = formats.list_units([path], progress=False)
    whole = [s for u in units for s in formats.read_unit(u)]
    calls = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, **k: calls.append(k) or real(self, **k))
    assert list(formats.read_unit(units[1], start=4)) == whole[14:20]
    assert calls[0]["row_groups"] == [1] and sorted(calls[0]["columns"]) == ["images", "texts"]
    assert list(formats.read_unit(units[1], start=10)) == []


def test_bad_rows_are_kept_for_the_engine_to_count(tmp_path):
    good = token_blocks(0)
    no_eot = [t if t != 49407 else 0.0 for t in good]
    out_of_vocab = [good[0], 60000.0, *good[2:]]
    rows = [(hub_photo(0), good), (None, good), (hub_photo(2), None), (hub_photo(3), no_eot),
            (hub_photo(4), out_of_vocab), (hub_photo(5), [])]
    path = str(tmp_path / "bad.parquet")
    write_yfcc15m_file(path, rows)
    samples = list(formats.read_unit(formats.list_units([path], progress=False)[0]))
    assert [s["image"] is None for s in samples] == [False, True, False, False, False, False]
    reasons = [formats.caption_tokens(s) if isinstance(formats.caption_tokens(s), str) else "ok"
               for s in samples]
    assert reasons == ["ok", "ok", "no_caption", "bad_caption", "bad_caption", "no_caption"]


def write_dalle_mini_file(path, rows, row_group_size=10):
    """dalle-mini/YFCC100M_OpenAI_subset's fields (its dataset card): `img` (image bytes),
    `title_clean` and `description_clean` (strings), beside the YFCC100M metadata columns (a few of
    them here), as the hub's parquet conversion types them (Value("binary"), Value("string"),
    Value("int64"))."""
    columns = [("photoid", pa.int64(), "int64"), ("key", pa.string(), "string"),
               ("title", pa.string(), "string"), ("description", pa.string(), "string"),
               ("downloadurl", pa.string(), "string"), ("img", pa.binary(), "binary"),
               ("title_clean", pa.string(), "string"),
               ("description_clean", pa.string(), "string")]
    schema = pa.schema([pa.field(n, t) for n, t, _ in columns], metadata=huggingface_metadata(
        {n: {"dtype": d, "_type": "Value"} for n, _, d in columns}))
    table = pa.table({
        "photoid": [1000 + i for i, _ in enumerate(rows)],
        "key": [f"{i:04x}" * 8 for i, _ in enumerate(rows)],  # YFCC100M's md5-like key
        "title": [t for _, t, _ in rows], "description": [d for _, _, d in rows],
        "downloadurl": [f"http://farm1.staticflickr.com/{i}.jpg" for i, _ in enumerate(rows)],
        "img": [jpeg for jpeg, _, _ in rows], "title_clean": [t for _, t, _ in rows],
        "description_clean": [d for _, _, d in rows]}, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)


def test_dalle_mini_layout_with_either_text_column(tmp_path):
    rows = [(hub_photo(i), f"Title {i}", "" if i % 3 == 0 else f"A longer description of photo {i}")
            for i in range(12)]
    path = str(tmp_path / "00000.parquet")
    write_dalle_mini_file(path, rows)
    units = formats.list_units([path], image_column="img", text_column="title_clean",
                               progress=False)
    assert [u.samples for u in units] == [10, 2]
    for column, index in (("title_clean", 1), ("description_clean", 2)):
        samples = [s for u in units
                   for s in formats.read_unit(u, image_column="img", text_column=column)]
        assert [s["image"] for s in samples] == [r[0] for r in rows]
        # its `key` column
        assert [s["key"] for s in samples] == [f"{i:04x}" * 8 for i in range(12)]
        for sample, row in zip(samples, rows):
            tokens = formats.caption_tokens(sample)
            if row[index]:
                assert torch.equal(tokens, open_clip.tokenize([row[index]])[0])
            else:
                assert tokens == "no_caption"  # YFCC descriptions are often empty


def test_a_missing_or_mistyped_column_names_the_file_and_its_columns(tmp_path):
    path = str(tmp_path / "00000.parquet")
    write_dalle_mini_file(path, [(hub_photo(0), "t", "d")])
    with pytest.raises(ValueError) as error:
        formats.list_units([path], progress=False, image_column="images", text_column="texts")
    assert (path in str(error.value) and "'images'" in str(error.value)
            and "'img'" in str(error.value))
    unit = formats.list_units([path], progress=False)[0]
    with pytest.raises(ValueError, match="'texts'.*title_clean"):
        list(formats.read_unit(unit, image_column="img", text_column="texts"))
    with pytest.raises(ValueError, match="'photoid'.*int64"):
        list(formats.read_unit(unit, image_column="img", text_column="photoid"))


def test_truncated_parquet_is_an_unreadable_file(tmp_path, capsys):
    path = tmp_path / "train-00001-of-00001.parquet"
    write_yfcc15m_file(str(path), [(hub_photo(i), token_blocks(i)) for i in range(12)])
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # the footer (schema, row groups) is gone
    units = formats.list_units([str(path)], progress=False)
    assert units == [formats.Unit(str(path), -1, 0)] and str(path) in capsys.readouterr().err
    (marker,) = formats.read_unit(units[0])
    assert marker["problem"] == "unreadable_file" and marker["source"].startswith(str(path))
    # Damaged data pages behind an intact footer: the row group ends with a marker.
    path.write_bytes(whole[:4] + bytes(len(whole) // 2 - 4) + whole[len(whole) // 2 :])
    units = formats.list_units([str(path)], progress=False)
    assert [u.samples for u in units] == [10, 2]
    *samples, last = formats.read_unit(units[0])
    assert last["problem"] in ("truncated_shard", "unreadable_file") and len(samples) < 10


# --------------------------------------------------------------------------------------------------
# Real img2dataset output
# --------------------------------------------------------------------------------------------------
# img2dataset itself (a test-only reference, installed --no-deps by the README's test command: it
# pins webdataset<0.3) downloads from a local HTTP server on 127.0.0.1 and writes webdataset shards:
# NNNNN.tar + NNNNN_stats.json + NNNNN.parquet, no sizes.json. It imports wandb at module level and
# calls it only with enable_wandb=True: a stand-in module that fails if touched takes its place.

WANDB_STAND_IN = '''def __getattr__(name):
    raise RuntimeError(f"wandb.{name} used, but the test runs img2dataset with enable_wandb=False")
'''


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def run_img2dataset(tmp_path, urls, **settings):
    """img2dataset's download() in a fresh Python (its worker pool is spawned), offline; -> output
    folder."""
    (tmp_path / "stand_in" / "wandb").mkdir(parents=True)
    (tmp_path / "stand_in" / "wandb" / "__init__.py").write_text(WANDB_STAND_IN)
    with open(tmp_path / "urls.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(urls)
    arguments = dict(url_list=str(tmp_path / "urls.csv"), input_format="csv", url_col="url",
                     caption_col="caption", output_format="webdataset",
                     output_folder=str(tmp_path / "out"), processes_count=1, thread_count=1,
                     enable_wandb=False, distributor="multiprocessing", timeout=10, retries=0,
                     **settings)
    # 127.0.0.1 directly, never through a proxy
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(tmp_path / "stand_in"), NO_ALBUMENTATIONS_UPDATE="1", no_proxy="*")
    program = ("import json, sys; from img2dataset import download; "
               "download(**json.loads(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", program, json.dumps(arguments)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return tmp_path / "out"


def test_real_img2dataset_output_reads_exactly_its_successes(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    for i, photo in enumerate(PHOTOS):
        Image.fromarray(photo).convert("RGB").save(site / f"{i}.jpg", quality=90)
    (site / "broken.jpg").write_bytes(b"this is not an image")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [(f"{base}/{i}.jpg", f"photo number {i}") for i in range(len(PHOTOS))]
    urls[2:2] = [(f"{base}/missing.jpg", "a 404"), (f"{base}/broken.jpg", "not an image")]
    try:
        out = run_img2dataset(tmp_path, urls, number_sample_per_shard=3, image_size=32,
                              resize_mode="border")
    finally:
        server.shutdown()

    # What img2dataset says it wrote: its per-row status in NNNNN.parquet, its counts in
    # NNNNN_stats.json.
    tars = sorted(str(p) for p in out.glob("*.tar"))
    assert ([os.path.basename(p) for p in tars] == ["00000.tar", "00001.tar"]
            and not (out / "sizes.json").exists())
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    successes = [(r["key"], r["caption"]) for r in rows if r["status"] == "success"]
    assert len(successes) == len(PHOTOS) and len(rows) == len(urls)
    stats = [json.loads((out / f"{os.path.basename(p)[:5]}_stats.json").read_text())["successes"]
             for p in tars]

    monkeypatch.setattr(formats, "count_tar_samples",
                        lambda path: pytest.fail(f"counted {path}: the stats have it"))
    units = formats.list_units(str(out / "{00000..00001}.tar"), progress=False)
    assert [u.samples for u in units] == stats and sum(stats) == len(PHOTOS)
    assert not (out / formats.COUNTS_FILE).exists()
    samples = [s for u in units for s in formats.read_unit(u)]
    assert sorted((s["key"], s["text"]) for s in samples) == sorted(successes)
    assert [s["image"] for s in samples] == [s["jpg"] for s in webdataset_samples(tars)]
    # resized by img2dataset
    assert all(Image.open(io.BytesIO(s["image"])).size == (32, 32) for s in samples)


# --------------------------------------------------------------------------------------------------
# Through the engine the trainer uses: the same pairs as tar and as parquet give the same epoch
# --------------------------------------------------------------------------------------------------

def test_same_pairs_as_tar_and_as_parquet_give_the_same_epoch(tmp_path):
    from stage2 import shards
    from stage2.augment import TrainTransform

    # 25 real-photo pairs as world/make_data.py's tar shards (txt captions) and as
    # Kaichengalex/YFCC15M's parquet (Image struct, float32 token blocks from open_clip):
    # 10 + 10 + 5 samples either way.
    n = 25
    write_shards(tmp_path / "tar", ((f"{i:06d}", {"jpg": hub_photo(i), "txt": caption(i)})
                                    for i in range(n)), per_shard=10)
    parquet = str(tmp_path / "parquet" / "train-00001-of-00001.parquet")
    write_yfcc15m_file(parquet, [(hub_photo(i), token_blocks(i)) for i in range(n)],
                       row_group_size=10)
    as_tar = formats.list_units(str(tmp_path / "tar" / "{00000..00002}.tar"), progress=False)
    as_parquet = formats.list_units(parquet, progress=False)
    assert [u.samples for u in as_tar] == [u.samples for u in as_parquet] == [10, 10, 5]

    def epoch(units, epoch_index):
        loader = shards.Loader(units, TrainTransform(24, "moco"), batch_size=4, streams=2, seed=3,
                               shuffle_buffer=5)
        batches = list(loader.delivered_batches(epoch_index))
        plan = loader.plan(epoch_index)
        # which of the 25 pairs each position holds: the unit's first pair + the sample's number
        # inside the unit
        pair_ids = []
        for raw in torch.cat([b["indices"] for b in batches]).tolist():
            u, inside = plan.locate(raw)
            unit = plan.units[u]
            first = 10 * (unit.row_group if unit.row_group >= 0
                          else int(os.path.basename(unit.path)[:5]))
            pair_ids.append(first + inside)
        return batches, pair_ids

    for epoch_index in (0, 1):
        tar_batches, tar_pairs = epoch(as_tar, epoch_index)
        parquet_batches, parquet_pairs = epoch(as_parquet, epoch_index)
        # 2 streams x 12 positions, 2 per stream and step
        assert len(tar_batches) == len(parquet_batches) == 6
        # the same pairs in the same order
        assert tar_pairs == parquet_pairs and len(set(tar_pairs)) == 24
        for a, b in zip(tar_batches, parquet_batches):
            assert torch.equal(a["indices"], b["indices"]) and bool(a["valid"].all())
            assert torch.equal(a["images"], b["images"])  # the same decoded, cropped pixels
            # the txt caption tokenised == the stored first token block
            assert torch.equal(a["tokens"], b["tokens"])
            assert torch.equal(a["params"], b["params"])  # the same augmentation
        expected = open_clip.tokenize([caption(i) for i in tar_pairs])
        assert torch.equal(torch.cat([b["tokens"] for b in tar_batches]), expected)
    assert tar_pairs != epoch(as_tar, 0)[1]  # epochs differ
