"""stage2/shards.py, the engine, on the path train_clip.py uses (shards.Loader; the trainer itself
at the end).

Proves: the loader's samples are webdataset's bytes through the transform, at the sample indices
the epoch plan names; every good sample comes exactly once per epoch over 2 gloo ranks x 2
workers, in the same global batches as one process without workers (the order depends on (seed,
epoch) only), the short last batch and the left-over sample indices dropped and counted; 0, 2 or
3 workers and any accumulation give bit-identical batches; JPEGs decoded on the device
(torchvision.io.decode_jpeg) give the same samples; a resumed epoch never opens a fully consumed
shard (they are overwritten with garbage before resuming); bad data is skipped and counted by
reason, exactly as the damage was made; mostly bad shards stop with an error naming them;
train_clip.py killed (at a known step: tests/hold_at_step.py) and resumed with 3 workers instead
of 2 ends bit-identical, and resumed on 2 ranks instead of 1 takes the same steps (losses and
weights equal to reduction-order tolerance); the loss of padded batches whose good rows differ
between ranks has the gradient of one large batch of the good rows alone.
"""
import collections
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from tests import hold_at_step  # noqa: E402  (tests/: holds a trainer at a step)
from stage2 import shards  # noqa: E402
from stage2 import formats  # noqa: E402
# one set of real-photo samples for both test files
from tests.stage2.test_formats import caption, photo_jpeg  # noqa: E402
from tests.stage2.test_formats import pairs as samples  # noqa: E402
from stage2.augment import TrainTransform  # noqa: E402
from world.make_data import write_shards  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
MOCO = TrainTransform(16, "moco")


def loader(spec, batch_size=8, streams=4, workers=0, transform=MOCO, **kwargs):
    return shards.Loader(formats.list_units(spec, progress=False), transform, batch_size, streams,
                         workers=workers, shuffle_buffer=5, **kwargs)


def epoch(loader_, e=0, start=0):
    return [{k: v for k, v in b.items()} for b in loader_.delivered_batches(e, start)]


def test_samples_are_webdatasets_bytes_through_the_transform(tmp_path):
    write_shards(tmp_path, samples(30), per_shard=7)
    spec = str(tmp_path / "{00000..00004}.tar")
    theirs = [wds_sample for wds_sample in wds.WebDataset(formats.expand_spec(spec),
                                                          shardshuffle=False, empty_check=False)]
    by_path = collections.defaultdict(list)
    for s in theirs:
        by_path[s["__url__"]].append(s)
    ours = loader(spec, transform=TrainTransform(24, "moco"), seed=3)
    plan = ours.plan(2)
    rows = 0
    for batch in ours.delivered_batches(2):
        for image, tokens, params, raw in zip(batch["images"], batch["tokens"], batch["params"],
                                              batch["indices"]):
            u, offset = plan.locate(int(raw))
            # webdataset's sample at the plan's sample index
            sample = by_path[plan.units[u].path][offset]
            expected = TrainTransform(24, "moco").host_half(
                sample["jpg"], shards._seed("sample", 3, 2, int(raw)))
            assert torch.equal(image, expected[0]) and torch.equal(params, expected[1])
            assert torch.equal(tokens, data.tokenize(sample["txt"].decode())[0])
            rows += 1
    assert rows == plan.steps * 8 == 24 and plan.dropped == 6


def test_workers_and_accumulation_do_not_change_the_batches(tmp_path):
    write_shards(tmp_path, samples(60), per_shard=9)
    spec = str(tmp_path / "{00000..00006}.tar")
    reference = epoch(loader(spec), 1)
    assert len(reference) == 60 // 4 // 2  # 15 per stream, 2 per stream a batch
    for workers, accum_steps in ((2, 1), (3, 4)):
        other = epoch(loader(spec, workers=workers, accum_steps=accum_steps), 1)
        assert len(other) == len(reference)
        for a, b in zip(reference, other):
            for key in ("images", "tokens", "params", "indices", "valid", "skipped"):
                assert torch.equal(a[key], b[key]), (workers, key)
    # deterministic
    assert epoch(loader(spec), 1)[0]["indices"].tolist() == reference[0]["indices"].tolist()
    # reshuffled
    assert epoch(loader(spec), 2)[0]["indices"].tolist() != reference[0]["indices"].tolist()
    assert epoch(loader(spec, seed=1), 1)[0]["indices"].tolist() != reference[0]["indices"].tolist()


def test_a_slow_consumer_never_sees_a_reused_tensor_rewritten(tmp_path):
    """Workers write crops into a ring of per_step + prefetch shared tensors, reused: a main process
    that lingers over every batch, while the workers run as far ahead as the DataLoader lets them,
    still gets the in-process loader's batches (the tightest ring: prefetch 1, and several parcels a
    step)."""
    write_shards(tmp_path, samples(60), per_shard=9)
    spec = str(tmp_path / "{00000..00006}.tar")
    reference = epoch(loader(spec, accum_steps=4), 1)
    for prefetch in (1, 2):
        slow = []
        for batch in loader(spec, workers=2, accum_steps=4, prefetch=prefetch).delivered_batches(1):
            time.sleep(0.05)  # the workers fill their ring meanwhile
            slow.append(batch)
        assert [torch.equal(a["images"], b["images"]) for a, b in zip(reference, slow)] == [
            True] * len(reference), prefetch


def corrupt_shards(folder):
    """4 shards of 6 samples with known damage; returns (spec, {sample number in file order:
    reason})."""
    folder.mkdir()
    paths = write_shards(folder, samples(24), per_shard=6)

    def rewrite(path, edit):
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(path, "w") as tar:
            for name, payload in edit(members):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    # shard 0: sample 1 garbage image bytes, 2 no caption, 3 no image, 4 a caption that is not UTF-8
    rewrite(paths[0], lambda ms: [(n, b"\xff\xd8 not a jpeg" if n == "000001.jpg"
                                   else b"\xff\xfe\xfa" if n == "000004.txt" else b)
                                  for n, b in ms if n not in ("000002.txt", "000003.jpg")])
    damage = {1: "bad_image", 2: "no_caption", 3: "no_image", 4: "bad_caption"}
    # shard 1: cut in the middle of sample 9's image: 6-8 survive, 9-11 are lost (sizes.json says 6)
    with tarfile.open(paths[1]) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000009.jpg").offset_data + 100
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:cut])
    damage.update({i: "truncated_shard" for i in (9, 10, 11)})
    Path(paths[3]).write_bytes(b"this is not a tar file" * 30)  # shard 3: not a tar at all
    damage.update({i: "unreadable_file" for i in range(18, 24)})
    return str(folder / "{00000..00003}.tar"), damage


def rank_epoch(out):
    """Run by torchrun (2 gloo ranks): this rank's loader, as train_clip.py builds it, over one
    epoch."""
    import training

    torch.set_num_threads(1)
    ranks = training.setup_distributed("cpu")
    spec = os.environ["SPEC"]
    ours = shards.Loader(formats.list_units(spec, progress=False), MOCO, 8, 4, ranks.rank,
                         ranks.world_size, workers=2, shuffle_buffer=5)
    batches = [{"indices": b["indices"].tolist(), "tokens": b["tokens"].tolist(),
                "skipped": b["skipped"].tolist()} for b in ours.delivered_batches(0)]
    Path(f"{out}.{ranks.rank}").write_text(json.dumps(batches))
    # The loss of padded batches whose good rows differ between ranks (3 and 1 of 4): gradients of
    # this rank's features, for the test to hold against one process's loss over the good rows
    # alone.
    from stage2 import contrastive  # the loss train_clip.py runs

    images, texts, valid = padded_features()
    mine = slice(4 * ranks.rank, 4 * ranks.rank + 4)
    image, text = images[mine].clone().requires_grad_(), texts[mine].clone().requires_grad_()
    loss = contrastive.contrastive_loss(image, text, torch.tensor(10.0), valid[mine])
    loss.backward()  # through the all-gather: the sum over ranks' losses, which DDP then averages
    torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad},
               f"{out}.grad{ranks.rank}")
    training.cleanup_distributed()


def padded_features():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    return images, texts, torch.tensor([True, True, False, True, True, False, False, False])


@pytest.mark.slow
def test_each_good_sample_once_per_epoch_over_two_ranks_and_two_workers(tmp_path):
    spec, damage = corrupt_shards(tmp_path / "bad")
    write_shards(tmp_path / "good", samples(30, start=24), per_shard=6)
    spec += "::" + str(tmp_path / "good" / "{00000..00004}.tar")  # 54 raw samples, 21 of them bad
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", __file__, "rank_epoch", str(tmp_path / "out")],
                   check=True, env={**ENV, "SPEC": spec}, cwd=ROOT, timeout=180,
                   capture_output=True)
    ranks = [json.loads(Path(f"{tmp_path / 'out'}.{r}").read_text()) for r in range(2)]
    one = epoch(loader(spec))  # one process, no workers: the reference order
    plan = loader(spec).plan(0)
    assert len(ranks[0]) == len(ranks[1]) == len(one) == plan.steps == 54 // 4 // 2  # 6 steps
    by_tokens = {tuple(data.tokenize(caption(i))[0].tolist()): i for i in range(54)}
    seen, skipped = [], collections.Counter()
    for step, batch in enumerate(one):
        positions = set()
        for r in range(2):
            row = ranks[r][step]
            for raw, tokens in zip(row["indices"], row["tokens"]):
                if raw >= 0:
                    positions.add(raw)
                    seen.append(by_tokens[tuple(tokens)])
            skipped.update(dict(zip(formats.SKIP_REASONS, row["skipped"])))
        # the same global batch, in any split
        assert positions == set(batch["indices"][batch["valid"]].tolist())
    # Which samples an epoch reads: the first 12 sample indices of each of the 4 streams (6 steps x
    # 2), the rest (54 - 48) dropped and counted. Sample indices lie in the shuffled unit order.
    read = {plan.sample_index(s, j) for s in range(4) for j in range(plan.used)}
    assert len(read) == 48 and plan.dropped == 6
    index_of = {}  # sample index -> sample number in the files
    for u, unit in enumerate(plan.units):
        base = ({"bad": 0, "good": 24}["good" if "/good/" in unit.path else "bad"]
                + int(Path(unit.path).stem) * 6)
        for k in range(unit.samples):
            index_of[plan.starts[u] + k] = base + k
    expected_good = sorted(index_of[raw] for raw in read if index_of[raw] not in damage)
    assert sorted(seen) == expected_good  # each good sample read exactly once
    expected_skips = collections.Counter(damage[index_of[raw]] for raw in read
                                         if index_of[raw] in damage)
    assert +skipped == expected_skips and sum(expected_skips.values()) >= 10
    assert len(seen) + sum(skipped.values()) + plan.dropped == 54

    # The loss over padded batches: the gradient of the large batch of the 4 good rows alone.
    from stage2 import contrastive  # the loss train_clip.py runs

    images, texts, valid = padded_features()
    good_images, good_texts = (images[valid].clone().requires_grad_(),
                               texts[valid].clone().requires_grad_())
    # no padding at all
    reference = contrastive.contrastive_loss(good_images, good_texts, torch.tensor(10.0))
    reference.backward()
    grads = [torch.load(f"{tmp_path / 'out'}.grad{r}", weights_only=True) for r in range(2)]
    # the loop's all-reduced loss
    assert abs(sum(g["loss"] for g in grads) / 2 - reference.item()) < 1e-6
    for key, good in (("image", good_images.grad), ("text", good_texts.grad)):
        ours = torch.cat([grads[0][key], grads[1][key]])
        # DDP divides by the world size
        torch.testing.assert_close(ours[valid] / 2, good, atol=1e-6, rtol=1e-5)
        assert torch.equal(ours[~valid], torch.zeros_like(ours[~valid]))  # padding gets no gradient


def test_resume_never_opens_a_consumed_shard(tmp_path):
    write_shards(tmp_path, samples(80), per_shard=4)  # 20 shards
    spec = str(tmp_path / "{00000..00019}.tar")
    full = epoch(loader(spec, workers=2), 1)
    plan = loader(spec).plan(1)
    start = 6
    # Needed on resume: each stream's indices from the start of the buffer that holds step 6 on.
    needed = set()
    for s in range(4):
        first = s * plan.stream_length + (start * plan.per_stream // plan.buffer) * plan.buffer
        for raw in range(first, s * plan.stream_length + plan.used):
            needed.add(plan.locate(raw)[0])
    consumed = [unit.path for u, unit in enumerate(plan.units) if u not in needed]
    assert len(consumed) >= 8
    for path in consumed:
        Path(path).write_bytes(b"\0garbage" * 300)  # a shard opened now would count as unreadable
    rest = epoch(loader(spec, workers=2), 1, start)
    assert len(rest) == len(full) - start
    for a, b in zip(rest, full[start:]):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tokens"], b["tokens"])
        assert a["skipped"].sum() == 0


def test_decoding_on_the_device_gives_the_same_samples(tmp_path):
    """decode_on_device: JPEGs go to the main process encoded and torchvision.io.decode_jpeg decodes
    them (nvjpeg on CUDA; its CPU decoder here); a PNG among them is decoded in the worker as
    usual."""
    def pairs():
        for i in range(40):
            if i % 5:
                yield f"{i:05d}", {"jpg": photo_jpeg(i, size=120), "txt": caption(i)}
            else:
                buffer = io.BytesIO()
                Image.open(io.BytesIO(photo_jpeg(i, size=120))).save(buffer, "PNG")
                yield f"{i:05d}", {"png": buffer.getvalue(), "txt": caption(i)}

    write_shards(tmp_path, pairs(), per_shard=10)
    spec, transform = str(tmp_path / "{00000..00003}.tar"), TrainTransform(48, "moco", draft=False)
    plain = epoch(loader(spec, transform=transform))
    on_device = epoch(loader(spec, transform=transform, workers=2, decode_on_device=True))
    assert len(plain) == len(on_device) == 5
    for a, b in zip(plain, on_device):
        for key in ("indices", "params", "tokens", "valid"):
            assert torch.equal(a[key], b[key]), key
        # Grey levels: torch's bicubic antialiased resize vs PIL's, measured 0.12-0.19 per batch
        # (CPU decoder). A bilinear resize measures 0.6-1.4, no antialiasing 1.0-2.6, a box 1 px off
        # 3.8-7.4.
        assert (a["images"].float() - b["images"].float()).abs().mean() < 0.4


def test_mostly_bad_shards_stop_with_an_error_naming_them(tmp_path):
    write_shards(tmp_path, ((f"{i:04d}", {"jpg": b"garbage", "txt": "x"}) for i in range(80)),
                 per_shard=40)
    with pytest.raises(RuntimeError, match=r"most samples fail to load .*0000[01]\.tar"):
        epoch(loader(str(tmp_path / "{00000..00001}.tar")))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        loader(str(tmp_path / "nothing-here-{0..3}.tar"))


@pytest.mark.slow
def test_the_check_command_reads_batches_and_ends_in_json(tmp_path):
    spec, _ = corrupt_shards(tmp_path / "bad")
    result = subprocess.run([sys.executable, "-m", "stage2.shards", spec, "--batch_size=4",
                             "--image_size=32", "--workers=1", "--batches=3", "--device=cpu"],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # What the same loader reads in this process (the command's settings: streams gcd(64, 4),
    # shuffle buffer 1000).
    reference = shards.Loader(formats.list_units(spec, progress=False), TrainTransform(32, "moco"),
                              4, 4, workers=0)
    batches = epoch(reference)[:3]
    skipped = sum(b["skipped"] for b in batches)
    assert (report["batches"] == 3
            and report["samples"] == sum(int(b["valid"].sum()) for b in batches))
    assert (report["skipped"] == dict(zip(formats.SKIP_REASONS, skipped.tolist()))
            and int(skipped.sum()) > 0)
    # One worker: its delivery is the whole delivery, and the workers alone outrun workers + device
    # half (or tie, to the 0.1 the rates are rounded to: the CPU's masked device half at 32 px is
    # fast beside a start-up-bound delivery of 3 batches).
    assert (report["delivery_samples_per_s_per_worker"] == report["delivery_samples_per_s"]
            >= report["samples_per_s"])
    # the two halves timed apart, then in sequence
    assert report["device_samples_per_s"] > report["samples_per_s"]
    assert sum(report["skipped"].values()) == 12 - report["samples"]
    # The workers' delivery rate is samples / seconds (seconds printed to 0.01, rates to 0.1); the
    # whole rate is the two halves one after the other: 1 / (1 / delivery + 1 / device).
    samples, seconds = report["samples"], report["seconds"]
    delivery, device = report["delivery_samples_per_s"], report["device_samples_per_s"]
    assert samples / (seconds + 0.005) - 0.05 <= delivery <= samples / (seconds - 0.005) + 0.05
    assert report["samples_per_s"] == pytest.approx(1 / (1 / delivery + 1 / device), abs=0.1)
    last = reference.transform.device_half(batches[-1]["images"], batches[-1]["params"])
    assert report["image_mean"] == pytest.approx(float(last.float().mean()), abs=1e-4)
    # the same command in this process: a spec of missing files
    with pytest.raises(SystemExit, match="none-0.tar"):
        shards.check([str(tmp_path / "none-{0..2}.tar")])


# --------------------------------------------------------------------------------------------------
# Through train_clip.py: resume with other workers and other ranks
# --------------------------------------------------------------------------------------------------


def train_command(spec, out_dir, *extra):
    return [sys.executable, str(ROOT / "train_clip.py"), str(ROOT / "configs" / "clip_tiny.yaml"),
            f"--train_data={spec}", f"--out_dir={out_dir}", "--max_steps=8", "--batch_size=8",
            "--accum_steps=2", "--save_every=2", "--log_every=1", "--shuffle_buffer=6",
            "--streams=4", *extra]


def losses(out_dir):
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.mark.slow
def test_resume_with_other_workers_and_ranks(tmp_path):
    write_shards(tmp_path / "shards", samples(48), per_shard=8)
    # 48 samples: 6 steps an epoch, so 8 steps cross into a second epoch
    spec = str(tmp_path / "shards" / "{00000..00005}.tar")
    subprocess.run(train_command(spec, tmp_path / "straight", "--workers=2"), check=True, env=ENV,
                   capture_output=True, timeout=180)

    killed = tmp_path / "killed"
    # Held before step 4 (tests/hold_at_step.py): step 2's checkpoint is written, step 3 done and
    # unsaved.
    process, go = hold_at_step.start(
        "train_clip.py", train_command(spec, killed, "--workers=2")[2:], 4, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.killpg(process.pid, signal.SIGKILL)  # the trainer and its loader workers
    assert process.wait() == -signal.SIGKILL
    os.close(go)
    saved = torch.load(killed / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and saved["data_position"] == {"epoch": 0, "step": 2}
    shutil.copytree(killed, tmp_path / "two_ranks")

    subprocess.run(train_command(spec, killed, "--workers=3"), check=True, env=ENV,
                   capture_output=True, timeout=180)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(killed / "ckpt.pt", weights_only=True)
    assert (a["step"] == b["step"] == 8
            and a["data_position"] == b["data_position"] == {"epoch": 1, "step": 2})
    for name, value in a["state_dict"].items():
        # bit for bit, with 3 workers instead of 2
        assert torch.equal(value, b["state_dict"][name]), name

    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2",
                    *train_command(spec, tmp_path / "two_ranks", "--workers=1")[1:]],
                   check=True, env=ENV, capture_output=True, timeout=180)
    c = torch.load(tmp_path / "two_ranks" / "ckpt.pt", weights_only=True)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "two_ranks")
    for step in range(saved["step"] + 1, 9):
        # the same global batches, split over 2 ranks
        assert abs(straight[step] - resumed[step]) < 1e-5, step
    for name, value in a["state_dict"].items():
        assert torch.allclose(value, c["state_dict"][name], atol=1e-4), name


if __name__ == "__main__":
    rank_epoch(sys.argv[2])
