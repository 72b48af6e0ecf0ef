"""evaluate.py's --prompt-padding: prompts as the PI authors' evaluation tokenizes them, as an
option (analysis/zero_shot.py's prompt_tokens pads them).

What these tests prove:
- "zeros" (the default) gives open_clip's token ids (CLIP_benchmark's protocol for open_clip
  models); "eot" gives the same ids with every position after the end-of-text token set to 49407,
  as Hugging Face's CLIPTokenizer pads (padding="max_length", pad token <|endoftext|>), which
  their evaluation uses.
- With the authors' mean-pooled model, "eot" makes each class vector the mean over all 77
  positions of a bidirectional tower: computed by hand from open_clip's text tower (no causal mask,
  unpooled) on the same weights; with an OpenAI (EOT-pooled, causal) model the two paddings give
  the same classifier.
- The command line passes the option through: `evaluate.py --ckpt THEIR.ckpt --prompt-padding eot`
  (a Lightning checkpoint of theirs) reports the metrics of that classifier, and the default those
  of the zero-padded one.
"""
import json

import pytest
import torch
import torch.nn.functional as F

import evaluate
from analysis import zero_shot
import model as M
from world.make_data import write_benchmark_task
from tests.test_evaluate import _photo
from checkpoints import load_checkpoint
from tests.test_model_authors import (TheirCLIP, open_clip_text_tower_without_causal_mask,
                                      save_lightning_checkpoint)

open_clip = pytest.importorskip("open_clip")

CLASSES, TEMPLATES = ["person", "cat", "cup of coffee"], ["a photo of a {c}.", "art of a {c}!"]


def test_prompt_tokens_pad_with_zeros_or_end_of_text():
    texts = [t.format(c=c) for c in CLASSES for t in TEMPLATES]
    reference = open_clip.tokenize(texts)
    torch.testing.assert_close(zero_shot.prompt_tokens(texts, 77), reference, atol=0, rtol=0)
    padded = zero_shot.prompt_tokens(texts, 77, "eot")
    for ids, ref in zip(padded, reference):
        end = ref.tolist().index(49407)
        assert ids[:end + 1].tolist() == ref[:end + 1].tolist() and (ids[end + 1:] == 49407).all()
    with pytest.raises(ValueError, match="prompt padding 'hf'"):
        zero_shot.prompt_tokens(texts, 77, "hf")


def test_authors_model_averages_all_positions_with_eot_padding():
    torch.manual_seed(0)
    model = M.create_model("tiny-authors").eval()
    model.prompt_padding = "eot"
    classifier = zero_shot.zero_shot_classifier(model, CLASSES, TEMPLATES, "cpu")  # (E, C)
    reference = open_clip_text_tower_without_causal_mask(model)
    texts = [t.format(c=c) for c in CLASSES for t in TEMPLATES]
    ids = open_clip.tokenize(texts)
    for row in ids:  # Hugging Face's padding, written out here
        row[row.tolist().index(49407) + 1:] = 49407
    with torch.no_grad():
        # The mean over every one of the 77 positions.
        per_prompt = F.normalize(reference.encode_text(ids).mean(1), dim=-1)
    expected = F.normalize(per_prompt.view(len(CLASSES), len(TEMPLATES), -1).mean(1), dim=-1).t()
    torch.testing.assert_close(classifier, expected, atol=1e-5, rtol=0)
    model.prompt_padding = "zeros"
    assert (zero_shot.zero_shot_classifier(model, CLASSES, TEMPLATES, "cpu")
            - classifier).abs().max() > 1e-3


def test_openai_model_is_unaffected():
    torch.manual_seed(0)
    model = M.create_model("tiny").eval()
    zeros = zero_shot.zero_shot_classifier(model, CLASSES, TEMPLATES, "cpu")
    model.prompt_padding = "eot"
    torch.testing.assert_close(zero_shot.zero_shot_classifier(model, CLASSES, TEMPLATES, "cpu"),
                               zeros, atol=1e-6, rtol=0)


def test_cli_option_reaches_the_classifier(tmp_path, monkeypatch):
    """Their checkpoint, evaluated their way: a Lightning checkpoint of theirs (test_model_authors'
    layout)."""
    photos = [(_photo(name, crop), label)
              for label, name in enumerate(["astronaut", "chelsea", "coffee"]) for crop in range(4)]
    write_benchmark_task(tmp_path / "wds_photos", photos, CLASSES, TEMPLATES, image_format="jpg")
    torch.manual_seed(0)
    save_lightning_checkpoint(TheirCLIP(M.model_config("tiny")).eval(), tmp_path / "authors.pt",
                              monkeypatch)
    model = load_checkpoint(tmp_path / "authors.pt")
    seen, prompt_tokens = [], zero_shot.prompt_tokens
    # Records each call's padding, then pads as before.
    monkeypatch.setattr(zero_shot, "prompt_tokens",
                        lambda texts, length, padding: (seen.append(padding)
                                                        or prompt_tokens(texts, length, padding)))
    for padding in ("zeros", "eot"):
        out = tmp_path / f"{padding}.json"
        extra = ["--prompt-padding", padding] if padding == "eot" else []  # zeros: the default
        evaluate.main(["--ckpt", str(tmp_path / "authors.pt"), "--suite", "photos",
                       "--data-root", str(tmp_path), "--workers", "0", "--device", "cpu",
                       "--out", str(out), *extra])
        assert set(seen) == {padding}
        seen.clear()
        model.prompt_padding = padding
        expected = zero_shot.evaluate_task(model, tmp_path / "wds_photos", "cpu", progress=False)
        reported = json.loads(out.read_text())[0]["metrics"]
        assert {k: reported[k] for k in ("acc1", "mean_per_class_recall")} == \
            {k: expected[k] for k in ("acc1", "mean_per_class_recall")}
        seen.clear()
