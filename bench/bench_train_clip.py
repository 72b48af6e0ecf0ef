"""Training throughput on the CPU: train_clip.py vs open_clip, same shards, model size (the kit's
`small` preset, registered with open_clip as a model config), batch, workers, fp32 and augmentation
('train' = open_clip's RandomResizedCrop 0.9-1). open_clip's own loop (open_clip_train 3.3.0) is
installed but fails with webdataset 1.0.2 (KeyError 'fname' in its tarfile_to_samples_nothrow), so
the reference is open_clip's model + ClipLoss + AdamW in a plain loop fed by a webdataset pipeline
with the same workers. Both measure samples/s over the last third of the steps (start-up excluded);
their ratio is printed (goal >= 1.0). Then peak memory of one training step of train_clip's step
with and without gradient checkpointing (same batch, fresh processes), and their ratio.

  python bench/bench_train_clip.py [--steps 30] [--batch 32]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPEN_CLIP_SMALL = {  # model.py's "small" preset in open_clip's config language
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 256, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
}

# The scripts below run with python -c; a backslash at the end of one of their lines joins it to the
# next inside the string, so each runs as the one line it was written as.
RUN_OPEN_CLIP = """
import sys, time, torch, open_clip, webdataset as wds
from open_clip.loss import ClipLoss
open_clip.add_model_config(sys.argv[1])
spec, batch, steps, workers = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model, preprocess, _ = open_clip.create_model_and_transforms("kit-small")
tokenizer = open_clip.get_tokenizer("kit-small")
pipeline = (wds.WebDataset(spec, shardshuffle=False, empty_check=False).shuffle(1000).decode("pil")
            .to_tuple("jpg", "txt").map_tuple(preprocess, lambda t: tokenizer([t])[0])\
.batched(batch))
loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers, \
persistent_workers=True)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, \
weight_decay=0.1)
loss_fn, done, start = ClipLoss(), 0, None
model.train()
while done < steps:
    for images, texts in loader:
        if done == steps - steps // 3:
            start = time.perf_counter()
        image_features, text_features, logit_scale = model(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += 1
        if done == steps:
            break
print((steps // 3) * batch / (time.perf_counter() - start))
"""

PEAK_MEMORY = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import training
from model import create_model
from stage2.contrastive import accumulate_gradients
torch.manual_seed(0)
model = create_model("small")
model.set_grad_checkpointing(sys.argv[2] == "1")
n = int(sys.argv[3])
images, tokens = torch.randn(n, 3, 64, 64), torch.randint(1, 49000, (n, 77))
tokens[:, -1] = 49407
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
before = rss()
accumulate_gradients(model, images, tokens, 1, training.autocast("cpu", "fp32"), \
training.grad_scaler("cpu", "fp32"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--memory-batch", type=int, default=128)
    args = parser.parse_args()
    from bench_loader import photos
    from world.make_data import write_shards

    samples = args.steps * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = write_shards(tmp / "shards", photos(samples, size=96), per_shard=samples // 4)
        spec = f"{tmp}/shards/{{00000..{len(shards) - 1:05d}}}.tar"
        log_every = args.steps // 3  # the last log interval is the last third

        subprocess.run([sys.executable, str(ROOT / "train_clip.py"),
                        str(ROOT / "configs/clip_tiny.yaml"), f"--train_data={spec}",
                        f"--out_dir={tmp}/kit", "--model=small", f"--max_steps={args.steps}",
                        f"--batch_size={args.batch}", f"--workers={args.workers}",
                        f"--log_every={log_every}", "--augment=train", "--lr=5e-4",
                        "--warmup_steps=10", "--shuffle_buffer=1000", "--save_every=100000"],
                       check=True, capture_output=True)
        kit = json.loads((tmp / "kit" / "metrics.jsonl")
                         .read_text().splitlines()[-1])["samples_per_s"]

        (tmp / "kit-small.json").write_text(json.dumps(OPEN_CLIP_SMALL))
        out = subprocess.run([sys.executable, "-c", RUN_OPEN_CLIP, str(tmp / "kit-small.json"),
                              spec, str(args.batch), str(args.steps), str(args.workers)],
                             check=True, capture_output=True, text=True).stdout
        reference = float(out.strip().splitlines()[-1])

        peaks = {}
        for checkpointing in ("0", "1"):
            out = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(ROOT), checkpointing,
                                  str(args.memory_batch)],
                                 check=True, capture_output=True, text=True).stdout
            peaks[checkpointing] = float(out.strip().splitlines()[-1])

    print(f"model 'small' (64 px, 6+6 layers, width 256), batch {args.batch}, {args.steps} steps, "
          f"{args.workers} worker(s), fp32, CPU")
    print(f"train_clip.py:                            {kit:7.1f} samples/s "
          "(last third of the steps)")
    print(f"open_clip 3.3 model + ClipLoss, plain loop: {reference:7.1f} samples/s "
          "(last third of the steps)")
    print(f"ratio kit / open_clip: {kit / reference:.2f} (goal >= 1.0)")
    print(f"peak memory of one step at batch {args.memory_batch}: {peaks['0']:.0f} MiB without, "
          f"{peaks['1']:.0f} MiB with gradient checkpointing: "
          f"ratio with/without {peaks['1'] / peaks['0']:.2f}")


if __name__ == "__main__":
    main()
