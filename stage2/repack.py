"""Stage 2's shards rewritten once at the size training needs: every image with a shortest side
above S is resized to S and saved as a JPEG of a stated quality; same keys, captions and order.

  python -m stage2.repack SRC_SPEC OUT_DIR [--shortest-side 256] [--quality 90] [--workers N]
  python train_clip.py ... --train_data='OUT_DIR/{00000..NNNNN}.tar'   # the same loader reads it

Why: a 224-px crop of a web photo (YFCC15M's are 400-500 px) costs the loader's workers a decode
of the whole photo; of a 256-px one, half that (bench/bench_loader.py measures both). img2dataset
writes 256-px shards by default for this reason; FFCV and DataComp store pre-resized images too.

- Source: any spec the loader reads (tar shards, parquet files); one output tar per source file,
  numbered in the spec's order (OUT_DIR/00000.tar, ...), members `key.jpg` and `key.txt` (a caption
  given as CLIP token ids, as in Kaichengalex/YFCC15M's parquet files, goes to `key.ids`: the ids as
  decimal text, which formats.read_unit reads back). Other members (img2dataset's .json) are left.
- Images: decoded (libjpeg-turbo; PIL for other formats), resized by torch's uint8 antialiased
  bicubic (PIL's bicubic within 0.01 grey levels), saved by libjpeg-turbo at --quality with 4:2:0
  chroma. An image whose shortest side is already <= S keeps its bytes (no second JPEG loss).
- Bad samples (an image that does not decode, a missing or bad caption: what the loader would skip
  in training) are left out, counted by reason and named in the shard's NNNNN_stats.json.
- Resumable and parallel: each source file is one job for a pool of --workers processes; a job
  writes its tar and then its NNNNN_stats.json ({"successes": n, ...}, img2dataset's name, which
  formats.list_units reads), each atomically (a temporary name, then a rename), so a killed run
  restarted with the same command skips every finished shard and redoes the rest. sizes.json is
  written when all are done. OUT_DIR/repack.json records the source files and settings; a restart
  with others is refused.
"""
import argparse
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from cli import run_cli, user_input
from stage2 import formats
from stage2.augment import JPEG_START

SHORTEST_SIDE, QUALITY = 256, 90  # img2dataset's default size; the quality of bench_loader's photos


def resized_size(width, height, shortest_side):
    """(width, height) scaled so that the shorter side is `shortest_side` (rounded)."""
    scale = shortest_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_pixels(data):
    """Image bytes -> uint8 (H, W, C), C = 1 (grey) or 3 (RGB): libjpeg-turbo for YCbCr and grey
    JPEGs, PIL for the rest (CMYK JPEGs, PNG, WebP; its errors for corrupt data pass on)."""
    if bytes(data[:3]) == JPEG_START:
        try:
            colour = simplejpeg.decode_jpeg_header(data)[2]
            if colour in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, "GRAY" if colour == "Gray" else "RGB")
        except ValueError:
            pass  # PIL decides: it may read what libjpeg-turbo's strict mode rejects, or raise
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.array(image.convert("L" if image.mode in ("L", "1") else "RGB"))
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def repack_image(data, shortest_side, quality):
    """Image bytes -> (extension, bytes): kept as they are when the shortest side is already <=
    shortest_side (and the loader reads the format), else resized and saved as a JPEG. Raises for
    an image that does not decode."""
    pixels = decode_pixels(data)
    height, width, channels = pixels.shape
    if min(width, height) <= shortest_side:
        if bytes(data[:3]) == JPEG_START:
            return "jpg", bytes(data)
        with Image.open(io.BytesIO(data)) as image:
            extension = (image.format or "").lower()
        if extension in formats.IMAGE_EXTENSIONS:
            return extension, bytes(data)
    else:
        new_width, new_height = resized_size(width, height, shortest_side)
        # (1, C, H, W), a channels-last view of (H, W, C): torch resizes uint8 without a copy
        image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        image = F.interpolate(image, size=(new_height, new_width), mode="bicubic", antialias=True)
        pixels = np.ascontiguousarray(image[0].permute(1, 2, 0).numpy())
    grey = channels == 1
    return "jpg", simplejpeg.encode_jpeg(pixels, quality=quality,
                                         colorspace="GRAY" if grey else "RGB",
                                         colorsubsampling="Gray" if grey else "420")


def repack_sample(sample, shortest_side, quality):
    """A raw sample (formats.read_unit) -> ({extension: bytes}, None), or (None, skip reason) for
    what the loader would skip."""
    if sample.get("image") is None:
        return None, "no_image"
    tokens = formats.caption_tokens(sample)  # checks the caption as the loader will
    if isinstance(tokens, str):
        return None, tokens
    try:
        extension, image = repack_image(sample["image"], shortest_side, quality)
    except Exception:  # PIL raises many types for corrupt data; the sample is counted and skipped
        return None, "bad_image"
    caption = (("txt", sample["text"].encode("utf-8")) if sample.get("text") is not None
               else ("ids", " ".join(str(int(i)) for i in sample["tokens"]).encode()))
    return {extension: image, caption[0]: caption[1]}, None


def repack_file(job):
    """One source file's units -> OUT_DIR/NNNNN.tar and NNNNN_stats.json, each written
    atomically; -> the stats."""
    units, out_path, settings = job["units"], job["out_path"], job["settings"]
    torch.set_num_threads(1)  # one process per core: the pool is the parallelism
    started, cpu_started = time.perf_counter(), time.process_time()
    stats = {"source": units[0].path, "successes": 0, "failed": 0, "bytes_in": 0,
             "skipped": {reason: 0 for reason in formats.SKIP_REASONS}, "bad": []}
    temporary = f"{out_path}.{os.getpid()}.tmp"
    with tarfile.open(temporary, "w") as tar:
        for unit in units:
            delivered = 0
            for sample in formats.read_unit(unit, 0, job["image_column"], job["text_column"]):
                if "problem" in sample:
                    reason = sample["problem"]
                    count = max(0, unit.samples - delivered)
                    stats["skipped"][reason] += count
                    stats["failed"] += count
                    stats["bad"].append({"source": sample["source"], "reason": reason,
                                         "samples": count, "error": sample["error"]})
                    break
                delivered += 1
                stats["bytes_in"] += len(sample.get("image") or b"")
                members, reason = repack_sample(sample, *settings)
                if reason is not None:
                    stats["skipped"][reason] += 1
                    stats["failed"] += 1
                    stats["bad"].append({"key": sample["key"], "source": sample["source"],
                                         "reason": reason})
                    continue
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{sample['key']}.{extension}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
                stats["successes"] += 1
    os.replace(temporary, out_path)
    stats.update(bytes_out=os.path.getsize(out_path),
                 seconds=round(time.perf_counter() - started, 3),
                 cpu_seconds=round(time.process_time() - cpu_started, 3))
    formats.write_json(stats_path(out_path), stats)
    return stats


def stats_path(out_path):
    return out_path[:-len(".tar")] + "_stats.json"


def plan_jobs(spec, out_dir, shortest_side, quality, image_column, text_column):
    """One job per source file, in the spec's order; checks OUT_DIR/repack.json (or writes it)."""
    units = formats.list_units(spec, image_column=image_column, text_column=text_column)
    files = list(dict.fromkeys(unit.path for unit in units))
    width = max(5, len(str(len(files) - 1)))
    record = {"sources": [os.path.abspath(path) for path in files], "shortest_side": shortest_side,
              "quality": quality, "image_column": image_column, "text_column": text_column}
    os.makedirs(out_dir, exist_ok=True)
    record_path = os.path.join(out_dir, "repack.json")
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            old = json.load(f)
        changed = [f"{key}: {old.get(key)!r} -> {value!r}" for key, value in record.items()
                   if key != "sources" and old.get(key) != value]
        if old.get("sources") != record["sources"]:
            changed.append("the source files")
        if changed:
            raise ValueError(f"{out_dir} holds a repack with other settings ({'; '.join(changed)})"
                             ": use another OUT_DIR, or the same settings to resume it")
    else:
        formats.write_json(record_path, record)
    return [{"units": [u for u in units if u.path == path],
             "out_path": os.path.join(out_dir, f"{i:0{width}d}.tar"),
             "settings": (shortest_side, quality), "image_column": image_column,
             "text_column": text_column} for i, path in enumerate(files)]


def repack(spec, out_dir, shortest_side=SHORTEST_SIDE, quality=QUALITY, workers=1,
           image_column="images", text_column="texts", progress=True):
    """Repack every source file not yet done (workers processes), then write sizes.json; -> a
    summary {"shards", "samples", "bad", "skipped", "bytes_in", "bytes_out", ...}."""
    jobs = plan_jobs(spec, out_dir, shortest_side, quality, image_column, text_column)
    todo = [job for job in jobs if not os.path.exists(stats_path(job["out_path"]))]
    bar = tqdm(total=sum(u.samples for job in todo for u in job["units"]), unit="sample",
               desc=f"repacking {len(todo)} of {len(jobs)} shards", disable=not progress,
               file=sys.stderr, smoothing=0.05)
    if workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            for stats in pool.imap_unordered(repack_file, todo):
                bar.update(stats["successes"] + stats["failed"])
    else:
        for job in todo:
            stats = repack_file(job)
            bar.update(stats["successes"] + stats["failed"])
    bar.close()
    return _summarise(jobs, out_dir)


def _summarise(jobs, out_dir):
    """sizes.json from every shard's stats, and the totals."""
    every = []
    for job in jobs:
        with open(stats_path(job["out_path"]), encoding="utf-8") as f:
            every.append(json.load(f))
    formats.write_json(os.path.join(out_dir, "sizes.json"),
                {os.path.basename(job["out_path"]): stats["successes"]
                 for job, stats in zip(jobs, every)})
    skipped = {reason: sum(s["skipped"][reason] for s in every) for reason in formats.SKIP_REASONS}
    return {"shards": len(jobs), "samples": sum(s["successes"] for s in every),
            "bad": sum(s["failed"] for s in every),
            "skipped": {reason: n for reason, n in skipped.items() if n},
            "bad_named": [b for s in every for b in s["bad"]][:5],
            "bytes_in": sum(s["bytes_in"] for s in every),
            "bytes_out": sum(s["bytes_out"] for s in every),
            "cpu_seconds": round(sum(s["cpu_seconds"] for s in every), 2),
            "spec": os.path.join(out_dir, f"{{{_stem(jobs[0])}..{_stem(jobs[-1])}}}.tar")}


def _stem(job):
    return os.path.basename(job["out_path"])[:-len(".tar")]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m stage2.repack",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="tar or parquet files: braces, several specs joined by '::'")
    parser.add_argument("out_dir")
    parser.add_argument("--shortest-side", type=int, default=SHORTEST_SIDE)
    parser.add_argument("--quality", type=int, default=QUALITY, help="JPEG quality, 1-100")
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                        help="processes, one source file each at a time (default: every core)")
    parser.add_argument("--image_column", default="images")
    parser.add_argument("--text_column", default="texts")
    args = parser.parse_args(argv)
    with user_input():  # a spec naming no file, or an OUT_DIR of other settings
        summary = repack(args.spec, args.out_dir, args.shortest_side, args.quality, args.workers,
                         args.image_column, args.text_column)
    print(f"{summary['samples']} samples in {summary['shards']} shards ({summary['spec']}); "
          f"{summary['bad']} bad samples left out {summary['skipped'] or ''}; "
          f"{summary['bytes_out'] / 2**20:.1f} MiB of images and captions from "
          f"{summary['bytes_in'] / 2**20:.1f} MiB of images", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
