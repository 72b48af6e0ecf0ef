"""The feature-space probes (analysis/probes.py, reached as `python evaluate.py --probe ...`)
against independent references, not against the demo's numbers.

What is proved:
- linear CKA equals a direct numpy implementation of Kornblith et al. (2019)'s HSIC formula (Gram
  matrices, centring matrix H), is 1 for a representation and itself, is invariant to orthogonal
  transforms and isotropic scaling, and is not invariant to an anisotropic scaling;
- Spearman's rho equals scipy.stats.spearmanr, ties included (the observer distance has many);
- the linear probe's logistic regression equals scikit-learn's LogisticRegression (same C, L2,
  lbfgs, multinomial) in probabilities and weights, and the probe's test accuracy equals sklearn's
  fit scored on the same test features;
- the per-layer features are the class token after each residual block (checked against running
  the blocks by hand) and the normalised encode_image output; for a ResNet tower, each stage's
  output averaged over its grid ("stage1" ... "stage4", checked the same way), and the CLI's CKA
  table names the stages, comparing a ResNet with a ViT at the embedding only;
- the CLI runs on kit checkpoints and CLIP_benchmark-format folders with a train split (written by
  world/make_data.py's writer, read by data.BenchmarkTask, CLIP_benchmark's layout <task>/train/), a
  folder of images with a reference distance, and writes the JSON and the figure.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from world import make_data
from analysis import probes
from world import scenes
from model import create_model

# Installed with scikit-learn (requirements-test.txt).
scipy_stats = pytest.importorskip("scipy.stats")


def kornblith_cka(x, y):
    """Linear CKA as written in Kornblith et al. 2019 (eq. 1-4), in numpy: K = X X^T, L = Y Y^T,
    HSIC(K, L) = tr(K H L H) / (n - 1)^2 with H = I - 11^T / n;
    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h) / (n - 1) ** 2
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_linear_cka_against_the_paper_formula_and_its_invariances():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 24, generator=generator)
    y = (x[:, :16] @ torch.randn(16, 40, generator=generator)
         + 0.5 * torch.randn(60, 40, generator=generator))
    assert probes.linear_cka(x, y) == pytest.approx(kornblith_cka(x, y), abs=1e-10)
    assert 0.1 < probes.linear_cka(x, y) < 0.99
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=generator, dtype=torch.float64))
    assert probes.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert probes.linear_cka(x, 7.5 * x.double() @ q) == pytest.approx(1.0, abs=1e-10)
    assert probes.linear_cka(x @ q.float(), y) == pytest.approx(probes.linear_cka(x, y), abs=1e-6)
    # Anisotropic scaling changes the representation's geometry.
    stretched = x * torch.linspace(0.1, 10, 24)
    assert probes.linear_cka(x, stretched) < 0.9
    assert probes.linear_cka(x, stretched) == pytest.approx(kornblith_cka(x, stretched), abs=1e-10)


def test_spearman_equals_scipy_with_ties():
    generator = torch.Generator().manual_seed(1)
    # Many ties, like the observer distance.
    a = torch.randint(0, 6, (300,), generator=generator).double()
    b = a + torch.randn(300, generator=generator, dtype=torch.float64) * 2
    b[::7] = 1.0
    assert (probes.spearman(a, b)
            == pytest.approx(scipy_stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12))
    assert probes.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_representational_similarity_uses_every_pair_once():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(30, 8, generator=generator)
    unit = F.normalize(features.double(), dim=-1)
    model_distance = (1 - unit @ unit.t()).numpy()
    reference = model_distance ** 3 + 0.1 * np.abs(np.random.default_rng(0).normal(size=(30, 30)))
    reference = (reference + reference.T) / 2
    rows, cols = np.triu_indices(30, k=1)
    expected = scipy_stats.spearmanr(model_distance[rows, cols], reference[rows, cols]).statistic
    assert (probes.representational_similarity(features, reference)
            == pytest.approx(expected, abs=1e-10))
    with pytest.raises(ValueError, match="29 images|30"):
        probes.representational_similarity(features[:29], reference)


def _classes(n, generator, weight=None):
    """n points in 12-d whose class (of 4) is a noisy linear function of them: weight (12, 4),
    random by default."""
    x = torch.randn(n, 12, generator=generator)
    weight = torch.randn(12, 4, generator=generator) if weight is None else weight
    return x, (x @ weight + torch.randn(n, 4, generator=generator)).argmax(1)


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_logistic_regression_equals_scikit_learn(C):
    from sklearn.linear_model import LogisticRegression

    x, y = _classes(240, torch.Generator().manual_seed(3))
    weight, bias = probes.fit_logistic_regression(x, y, 4, C, max_iter=1000, tolerance=1e-10)
    # sklearn's defaults: lbfgs, multinomial, L2.
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x.double().numpy(),
                                                                        y.numpy())
    ours = torch.softmax(x.double() @ weight + bias, 1).numpy()
    assert np.abs(ours - reference.predict_proba(x.double().numpy())).max() < 1e-5
    assert (np.abs(weight.numpy().T - reference.coef_).max()
            < 1e-3 * max(1, np.abs(reference.coef_).max()))


def test_linear_probe_scores_the_test_split_like_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(12, 4, generator=generator)  # one problem, two splits
    (train_x, train_y), (test_x, test_y) = (_classes(300, generator, weight),
                                            _classes(200, generator, weight))
    result = probes.linear_probe(train_x, train_y, test_x, test_y, grid=(2.0,))
    reference = LogisticRegression(C=2.0, tol=1e-10, max_iter=10_000).fit(
        train_x.double().numpy(), train_y.numpy())
    predicted = reference.predict(test_x.double().numpy())
    assert result["lp_acc1"] == pytest.approx((predicted == test_y.numpy()).mean())
    assert (result["lp_mean_per_class_recall"]
            == pytest.approx(balanced_accuracy_score(test_y.numpy(), predicted)))
    # 4 classes: no acc5, as CLIP_benchmark.
    assert np.isnan(result["lp_acc5"]) and result["C"] == 2.0
    swept = probes.linear_probe(train_x, train_y, test_x, test_y)
    assert swept["C"] in probes.PROBE_C_GRID and swept["lp_acc1"] > 0.6


def test_tower_features_are_the_class_token_after_each_block():
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    images = torch.randn(5, 3, 32, 32)
    features = probes.tower_features(model, images, batch_size=2)
    assert list(features) == ["block1", "block2", "embedding"]
    visual = model.visual
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(5, 1, -1), x], 1) + visual.positional_embedding
        x = visual.ln_pre(x)
        for k, block in enumerate(visual.transformer.resblocks):
            x = block(x, False)
            assert torch.allclose(features[f"block{k + 1}"], x[:, 0], atol=1e-5)
        assert torch.allclose(features["embedding"],
                              F.normalize(model.encode_image(images), dim=-1), atol=1e-6)
    assert not model.visual.transformer.resblocks[0]._forward_hooks  # hooks removed


def test_tower_features_of_a_resnet_are_each_stage_pooled_over_its_grid():
    torch.manual_seed(0)
    model = create_model("tiny-rn").eval()
    images = torch.randn(3, 3, 64, 64)
    features = probes.tower_features(model, images, batch_size=2)
    assert list(features) == ["stage1", "stage2", "stage3", "stage4", "embedding"]
    v = model.visual
    with torch.no_grad():
        x = F.relu(v.bn1(v.conv1(images)))
        x = F.relu(v.bn2(v.conv2(x)))
        x = v.avgpool(F.relu(v.bn3(v.conv3(x))))
        for k, stage in enumerate([v.layer1, v.layer2, v.layer3, v.layer4]):
            x = stage(x)
            assert features[f"stage{k + 1}"].shape == (3, 64 * 2**k)
            assert torch.allclose(features[f"stage{k + 1}"], x.mean(dim=(2, 3)), atol=1e-5)
        assert torch.allclose(features["embedding"],
                              F.normalize(model.encode_image(images), dim=-1), atol=1e-6)
    assert not v.layer1._forward_hooks  # hooks removed


def test_cli_names_resnet_stages_in_the_cka_table(tmp_path, capsys):
    make_data.write_probe_set(tmp_path / "probe", scenes.demo_probe_scenes(8, seed=0), 32)
    torch.manual_seed(0)
    first = _save(create_model("tiny-rn"), tmp_path / "rn_a" / "ckpt.pt")
    torch.manual_seed(1)
    second = _save(create_model("tiny-rn"), tmp_path / "rn_b" / "ckpt.pt")
    vit = _save(create_model("tiny"), tmp_path / "vit" / "ckpt.pt")
    out = tmp_path / "probes.json"
    evaluate.main(["--probe", first, second, vit, "--images", str(tmp_path / "probe"),
                   "--out", str(out), "--device", "cpu"])
    cka = json.loads(out.read_text())["cka"]
    assert list(cka["rn_a~rn_b"]) == ["stage1", "stage2", "stage3", "stage4", "embedding"]
    assert list(cka["rn_a~vit"]) == ["embedding"]  # no layers in common but the embedding
    assert "CKA rn_a~rn_b: stage1 " in capsys.readouterr().out


def _save(model, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "model_config": model.config.__dict__}, path)
    return str(path)


def test_cli_probes_checkpoints_on_a_task_and_an_image_folder(tmp_path, capsys, monkeypatch):
    import random

    rng = random.Random(0)
    shapes = scenes.SHAPES[:3]
    for split in ("train", "test"):
        samples = [(scenes.render_scene(scenes.sample_scene(rng, n_objects=1, shape=s), 32), label)
                   for label, s in enumerate(shapes) for _ in range(8)]
        make_data.write_benchmark_task(tmp_path / "tasks" / "wds_shapes", samples,
                                       classnames=list(shapes), templates=["a {c}."], split=split)
    make_data.write_probe_set(tmp_path / "probe", scenes.demo_probe_scenes(12, seed=0), 32)
    torch.manual_seed(0)
    first = _save(create_model("tiny"), tmp_path / "a" / "ckpt.pt")
    torch.manual_seed(1)
    second = _save(create_model("tiny"), tmp_path / "b" / "ckpt.pt")
    out = tmp_path / "probes.json"
    evaluate.main(["--probe", first, second, "--images", str(tmp_path / "probe"),
                   "--linear-probe", "shapes", "--data-root", str(tmp_path / "tasks"),
                   "--out", str(out), "--device", "cpu"])
    results = json.loads(out.read_text())
    assert results["n_images"] == 12 and set(results["rsa"]) == {"a", "b"}
    assert (set(results["cka"]) == {"a~b"}
            and list(results["cka"]["a~b"]) == ["block1", "block2", "embedding"])
    assert all(0 <= v <= 1 for v in results["cka"]["a~b"].values())
    assert (set(results["linear_probe"]["a"]["shapes"])
            >= {"lp_acc1", "lp_mean_per_class_recall", "C"})
    assert out.with_suffix(".png").stat().st_size > 5_000
    assert "RSA a:" in capsys.readouterr().out
    # Image sets too large to decode once are streamed for each checkpoint instead: the same
    # numbers.
    monkeypatch.setattr(probes, "DECODE_ONCE_BYTES", 0)
    streamed = probes.run_probes([first, second], tmp_path / "probe",
                                 np.load(tmp_path / "probe" / "reference_distance.npy"),
                                 ["shapes"], tmp_path / "tasks", progress=False)
    flat = lambda tree, key="": {f"{key}/{k}": v for name, sub in tree.items()
                                 for k, v in (flat(sub, name).items() if isinstance(sub, dict)
                                              else [(name, sub)])}
    for probe in ("cka", "rsa", "linear_probe"):
        assert flat(streamed[probe]) == pytest.approx(flat(results[probe]), abs=1e-6,
                                                      nan_ok=True), probe
    monkeypatch.undo()
    # The reference the demo writes is the observers' distance between the probe scenes, in file
    # order.
    drawn = [json.loads(line)
             for line in (tmp_path / "probe" / "scenes.jsonl").read_text().splitlines()]
    reference = np.load(tmp_path / "probe" / "reference_distance.npy")
    assert (reference.shape == (12, 12) and np.allclose(reference, reference.T)
            and not reference.diagonal().any())
    assert reference[2, 7] == pytest.approx(scenes.perceptual_distance(drawn[2], drawn[7]))
    assert sorted(p.name for p in (tmp_path / "probe").glob("*.png"))[0] == "00000.png"
    # The same tower twice: CKA 1 at every layer; a task folder as --images (its test split) works
    # too.
    evaluate.main(["--probe", first, first, "--images", str(tmp_path / "tasks" / "wds_shapes"),
                   "--out", str(out), "--device", "cpu"])
    results = json.loads(out.read_text())
    assert results["n_images"] == 24 and "rsa" not in results
    assert (list(results["cka"].values())[0]
            == pytest.approx({"block1": 1.0, "block2": 1.0, "embedding": 1.0}))


def test_cli_names_a_missing_train_split(tmp_path):
    make_data.write_benchmark_task(tmp_path / "wds_x", [(Image.new("RGB", (32, 32)), 0)] * 2,
                                   classnames=["a"], templates=["{c}"])
    torch.manual_seed(0)
    ckpt = _save(create_model("tiny"), tmp_path / "a" / "ckpt.pt")
    with pytest.raises(SystemExit):
        evaluate.main(["--probe", ckpt, "--images", str(tmp_path / "wds_x"), "--linear-probe", "x",
                       "--data-root", str(tmp_path)])
