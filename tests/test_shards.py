"""The tar-shard loader (shards.py) and writer (make_data.write_shards), against the webdataset library.

Proves: shard specs expand like bash; the reader groups members into the same samples, with the same
bytes, as webdataset - on a real webdataset shard (tests/fixtures, gzipped, png + cls) and on written
shards (plain and gzipped, upper-case extensions, folders in member names); decoded samples equal the
transform of webdataset's bytes; each sample is read once per epoch across 2 ranks x 2 workers, in a
seed- and epoch-determined order; corrupt data (truncated tar, garbage image, missing caption, missing
image, unopenable shard) is skipped with exact counts that reach the main process with the batches;
a stream where most samples fail stops with an error; a mid-epoch position resumes the exact batches.
"""
import io
import os
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from skimage import data as skdata

import data
import shards
from make_data import write_shards

FIXTURE = Path(__file__).parent / "fixtures" / "webdataset-mnist-sample.tgz"
EVAL = data.image_transform(32, "eval")


def photo_jpeg(i, size=40):
    """A real-photo crop (scikit-image's astronaut), different for each i, as JPEG bytes."""
    photo = skdata.astronaut()
    y, x = (37 * i) % (photo.shape[0] - size), (53 * i) % (photo.shape[1] - size)
    buffer = io.BytesIO()
    Image.fromarray(photo[y : y + size, x : x + size]).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def samples(n, start=0):
    for i in range(start, start + n):
        yield f"{i:06d}", {"jpg": photo_jpeg(i), "txt": caption(i)}


def wds_raw(paths):
    """webdataset's own view of the shards: the grouped samples, undecoded."""
    out = []
    for sample in wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False):
        out.append({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    return out


def ours_raw(paths):
    return [{k: v for k, v in s.items() if k != "__shard__"} for p in paths for s in shards.iter_tar_samples(p)]


def test_expand_shards_like_bash():
    assert shards.expand_shards("/d/{00008..00011}.tar") == [f"/d/{i:05d}.tar" for i in range(8, 12)]
    assert shards.expand_shards("/d/{a,b}/s{1..2}.tar::x.tar") == ["/d/a/s1.tar", "/d/a/s2.tar", "/d/b/s1.tar", "/d/b/s2.tar", "x.tar"]
    assert shards.expand_shards("/d/{8..11}.tar") == ["/d/8.tar", "/d/9.tar", "/d/10.tar", "/d/11.tar"]
    assert shards.expand_shards("/d/plain.tar") == ["/d/plain.tar"]


def test_real_webdataset_shard_reads_as_webdataset_does():
    ours, theirs = ours_raw([FIXTURE]), wds_raw([FIXTURE])
    assert len(ours) == len(theirs) == 90
    assert ours == theirs  # same keys, same extensions, same bytes, same order
    assert set(ours[0]) == {"__key__", "png", "cls"}


def test_written_shards_match_webdataset(tmp_path):
    # Plain shards, plus a gzipped one with upper-case extensions and folders in member names.
    paths = write_shards(tmp_path, samples(25), per_shard=10)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    gz = tmp_path / "extra.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        for i in range(3):
            for ext, payload in (("JPG", photo_jpeg(100 + i)), ("Txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"sub/dir/{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ours, theirs = ours_raw([*paths, gz]), wds_raw([*paths, gz])
    assert ours == theirs and len(ours) == 28
    assert ours[-1]["__key__"] == "sub/dir/0002" and set(ours[-1]) == {"__key__", "jpg", "txt"}

    # Decoded: each (image, tokens) equals the transform / tokenizer applied to webdataset's bytes.
    dataset = shards.ShardDataset([*paths, str(gz)], EVAL, shuffle_buffer=1)
    decoded = {tuple(tokens.tolist()): image for image, tokens in dataset}
    assert len(decoded) == 28
    for sample in theirs:
        tokens = tuple(data.tokenize(sample["txt"].decode())[0].tolist())
        expected = EVAL(Image.open(io.BytesIO(sample["jpg"])))
        assert torch.equal(decoded[tokens], expected)


def caption(i):
    return f"a photo, number {i}"


_BY_TOKENS = {}


def captions_read(dataset, workers):
    """The captions of the samples a DataLoader gets from `dataset`, in order (found by their tokens)."""
    if not _BY_TOKENS:
        _BY_TOKENS.update({tuple(t.tolist()): caption(i) for i, t in enumerate(data.tokenize([caption(i) for i in range(200)]))})
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return [_BY_TOKENS[tuple(tokens.tolist())] for _, tokens in loader]


def test_each_sample_once_per_epoch_across_ranks_and_workers(tmp_path):
    write_shards(tmp_path, samples(40), per_shard=5)  # 8 shards: 2 ranks x 2 workers x 2 shards
    spec = str(tmp_path / "{00000..00007}.tar")
    everything = {caption(i) for i in range(40)}

    def epoch(e, seed=0):
        order = []
        for rank in range(2):
            ds = shards.ShardDataset(spec, EVAL, seed=seed, epoch=e, shuffle_buffer=8, rank=rank, world_size=2)
            order += captions_read(ds, workers=2)
        return order

    first = epoch(0)
    assert len(first) == 40 and set(first) == everything  # once each
    assert epoch(0) == first  # deterministic for (seed, epoch)
    second = epoch(1)
    assert set(second) == everything and second != first  # reshuffled per epoch
    assert epoch(0, seed=1) != first


def test_resampled_is_endless_and_deterministic(tmp_path):
    write_shards(tmp_path, samples(12), per_shard=3)
    ds = shards.ShardDataset(str(tmp_path / "{00000..00003}.tar"), EVAL, resampled=True, shuffle_buffer=4)
    first = [tokens for _, (_, tokens) in zip(range(40), ds)]  # 40 > 12 samples: shards drawn again, no end
    again = [tokens for _, (_, tokens) in zip(range(40), ds)]
    assert len(first) == 40 and all(torch.equal(a, b) for a, b in zip(first, again))


def corrupt_shards(folder):
    """4 shards of 6 samples with known damage; returns (spec, good captions, expected skip counts)."""
    folder.mkdir()
    paths = write_shards(folder, samples(24), per_shard=6)
    good = {caption(i) for i in range(24)}

    def rewrite(path, edit):
        members = []
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                members.append((m.name, tar.extractfile(m).read()))
        with tarfile.open(path, "w") as tar:
            for name, payload in edit(members):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    # shard 0: sample 1 has garbage image bytes, sample 2 no caption, sample 3 no image
    rewrite(paths[0], lambda ms: [(n, b"\xff\xd8 not a jpeg" if n == "000001.jpg" else b) for n, b in ms
                                  if n not in ("000002.txt", "000003.jpg")])
    good -= {caption(1), caption(2), caption(3)}
    # shard 1: cut in the middle of sample 9's image: samples 6-8 survive, 9-11 are lost with the tar
    with tarfile.open(paths[1]) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000009.jpg").offset_data + 100
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:cut])
    good -= {caption(i) for i in (9, 10, 11)}
    # shard 3: not a tar at all
    Path(paths[3]).write_bytes(b"this is not a tar file" * 30)
    good -= {caption(i) for i in range(18, 24)}
    expected = {"bad_image": 1, "no_caption": 1, "no_image": 1, "truncated_tar": 1, "unreadable_shard": 1, "bad_caption": 0}
    return str(folder / "{00000..00003}.tar"), good, expected


def test_corrupt_data_is_skipped_and_counted_exactly(tmp_path, capfd):
    spec, good, expected = corrupt_shards(tmp_path / "bad")
    ds = shards.ShardDataset(spec, EVAL, shuffle_buffer=1)
    assert set(captions_read(ds, workers=0)) == good
    assert ds.skipped == expected
    assert "00003.tar" in capfd.readouterr().err  # the unopenable shard is named

    # Through ShardLoader, with the 4 damaged shards among 4 good ones over 2 ranks x 2 workers: the
    # counts made in the worker processes reach the main process with the batches, equal to the same
    # streams read in this process. 6 batches of 2 per stream go past the end of every share (its
    # shards hold >= 3 usable samples), so every kind of damage is met at least once.
    write_shards(tmp_path / "bad", samples(24, start=100), per_shard=6, prefix="good-")
    spec += "::" + str(tmp_path / "bad" / "good-{00000..00003}.tar")
    totals = 0
    for rank in range(2):
        ds = shards.ShardDataset(spec, EVAL, shuffle_buffer=1, rank=rank, world_size=2)
        sent = sum(batch["skipped"] for batch in shards.ShardLoader(ds, 2, 12, workers=2).epoch_batches(0))
        reference = shards.ShardDataset(spec, EVAL, shuffle_buffer=1, rank=rank, world_size=2)
        for stream in range(2):
            for _ in zip(range(12), reference.samples(stream, 2, passes=None)):
                pass
        assert sent.tolist() == [reference.skipped[r] for r in shards.SKIP_REASONS]
        totals = totals + sent
    assert all(n >= 1 for reason, n in zip(shards.SKIP_REASONS, totals.tolist()) if reason != "bad_caption")


def test_most_samples_failing_stops_with_an_error(tmp_path):
    write_shards(tmp_path, ((f"{i:04d}", {"jpg": b"garbage", "txt": "x"}) for i in range(60)), per_shard=60)
    ds = shards.ShardDataset(str(tmp_path / "00000.tar"), EVAL)
    with pytest.raises(RuntimeError, match="most samples fail"):
        list(ds)


def test_mid_epoch_position_resumes_the_exact_batches(tmp_path):
    write_shards(tmp_path, samples(48), per_shard=6)
    ds = shards.ShardDataset(str(tmp_path / "{00000..00007}.tar"), data.image_transform(32, "moco"), shuffle_buffer=10)
    loader = shards.ShardLoader(ds, batch_size=4, batches_per_epoch=9, workers=2)
    full = list(loader.epoch_batches(3))
    assert len(full) == 9
    part = loader.epoch_batches(3)
    for _ in range(5):
        next(part)
    state = loader.state()
    assert state["batch"] == 5
    rest = list(shards.ShardLoader(ds, 4, 9, workers=2).epoch_batches(3, state))  # a fresh loader, as after a restart
    assert len(rest) == 4
    for a, b in zip(rest, full[5:]):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])  # same augmentation too
    other_epoch = list(loader.epoch_batches(4))
    assert not torch.equal(other_epoch[0]["tokens"], full[0]["tokens"])


def test_write_shards_records_sizes(tmp_path):
    write_shards(tmp_path, samples(7), per_shard=3, prefix="a-")
    write_shards(tmp_path, samples(2, start=7), per_shard=3, prefix="b-")
    import json
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"a-00000.tar": 3, "a-00001.tar": 3, "a-00002.tar": 1, "b-00000.tar": 2}
    # Deterministic bytes: equal input, equal shard.
    again = write_shards(tmp_path / "again", samples(7), per_shard=3, prefix="a-")
    assert Path(again[0]).read_bytes() == (tmp_path / "a-00000.tar").read_bytes()
