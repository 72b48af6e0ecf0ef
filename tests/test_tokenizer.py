"""The from-scratch CLIP BPE tokenizer in data.py gives the same ids as open_clip.tokenize.

What this proves:
  - the vocabulary is CLIP's: 49,408 ids, SOT 49406, EOT 49407 and EOT is the largest id (the text
    tower pools at argmax of the ids);
  - ids equal open_clip's, row for row, on tens of thousands of real strings (multilingual class
    names, prompt templates, CuPL and NLLB prompts from clip_benchmark, ImageNet class names and
    templates from open_clip) and on hand-picked edge cases (empty, whitespace, HTML entities,
    emoji, CJK, Arabic, digits, contractions, text longer than 77 tokens, mojibake, literal special
    tokens);
  - decode inverts encode on plain lowercase text, and the bounded word cache changes no ids.
open_clip and clip_benchmark are test-only references: tests that need them skip without them.
"""
import glob
import json
import os

import pytest
import torch

import data

# CuPL alone has 146k prompts: every 4th keeps the whole file under ~15 s on 2 cores.
CUPL_STRIDE = 4


def strings_in(value):
    """Every string in a parsed JSON value, dictionary keys included (they are class names)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [key, *strings_in(item)]]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []  # numbers (babel_imagenet's class indices)


@pytest.fixture(scope="module")
def real_strings():
    """Distinct real strings, in a fixed order, from clip_benchmark's JSON files and open_clip."""
    clip_benchmark = pytest.importorskip("clip_benchmark")
    zero_shot_metadata = pytest.importorskip("open_clip.zero_shot_metadata")
    folder = os.path.join(os.path.dirname(clip_benchmark.__file__), "datasets")
    strings = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as file:
            found = strings_in(json.load(file))
        strings += found[::CUPL_STRIDE] if path.endswith("cupl_prompts.json") else found
    classnames = zero_shot_metadata.IMAGENET_CLASSNAMES
    templates = zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES  # functions: classname -> prompt
    strings += classnames
    strings += [templates[i % len(templates)](name) for i, name in enumerate(classnames)]
    return list(dict.fromkeys(strings))  # dedupe, keep order


def assert_same_as_open_clip(texts, batch_size=4096, context_length=77):
    """Tokenize in batches on both sides; on a mismatch name the first differing string."""
    open_clip = pytest.importorskip("open_clip")
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        ours = data.tokenize(batch, context_length)
        theirs = open_clip.tokenize(batch, context_length)
        assert ours.shape == theirs.shape == (len(batch), context_length)
        assert ours.dtype == theirs.dtype == torch.long
        if not torch.equal(ours, theirs):
            row = int((ours != theirs).any(dim=1).nonzero()[0])
            pytest.fail(
                f"first mismatch: {batch[row]!r}\n  ours:   {ours[row].tolist()}\n"
                f"  theirs: {theirs[row].tolist()}"
            )


def test_vocabulary_is_clips():
    tokenizer = data.Tokenizer()
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)
    assert max(tokenizer.encoder.values()) == tokenizer.eot_token_id  # EOT pooling = argmax
    assert len(tokenizer.merge_rank) == 48894
    assert list(tokenizer.encoder)[:3] == ["!", '"', "#"]  # GPT-2 byte table order
    assert tokenizer.encoder["a</w>"] == 320 and tokenizer.encoder["cat</w>"] == 2368


@pytest.mark.slow
def test_same_ids_as_open_clip_on_real_strings(real_strings):
    assert len(real_strings) >= 10_000, len(real_strings)
    assert_same_as_open_clip(real_strings)


EDGE_CASES = {
    "empty": "",
    "whitespace only": " \t\n\r\x0b\x0c\x85\u3000\u2028 ",
    "inner whitespace": "a  photo\tof\n\na\u00a0cat",
    "double-escaped html": "fish &amp;amp; chips",
    "escaped tags": "&lt;b&gt;bold&lt;/b&gt; &quot;x&quot; &#39;y&#39;",
    "emoji": "a cat 🐱 on a rocket 🚀 👍🏽 👨‍👩‍👧",
    "chinese": "一张猫的照片",
    "japanese": "猫の写真、とてもかわいい。",
    "arabic": "صورة قطة على الطاولة",
    "digits": "12,345.67 and 1999 and ½ ² ①",
    "contractions": "it's they're we've i'm you'll he'd can't IT'S ''''s",
    "uppercase": "A PHOTO OF A CAT. İstanbul Straße ǅ ﬁ",
    "mojibake": "cafÃ© Ã©tÃ© â€œquotedâ€\x9d",
    "control characters": "\x00\x1b[31mred\x1b[0m zero\u200bwidth",
    "special token literals": "<start_of_text>a<END_OF_TEXT> b</w>c",
    "long words": "x" * 500,
    "longer than 77 tokens": "a photo of a cat, " * 40,
}


@pytest.mark.parametrize("text", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_same_ids_as_open_clip_on_edge_cases(text):
    assert_same_as_open_clip([text])


def test_other_context_lengths_match_open_clip():
    texts = list(EDGE_CASES.values())
    for context_length in (1, 2, 5, 16, 100):
        assert_same_as_open_clip(texts, context_length=context_length)


def test_too_long_text_is_cut_and_ends_with_eot():
    ids = data.tokenize("a photo of a cat, " * 40)[0]
    assert ids[0] == 49406 and ids[-1] == 49407
    assert (ids != 0).all()  # no padding: every one of the 77 positions is used


def test_empty_text_is_sot_eot_then_padding():
    ids = data.tokenize("")[0]
    assert ids[:2].tolist() == [49406, 49407] and (ids[2:] == 0).all()


def test_ftfy_repairs_mojibake_before_bpe():
    tokenizer = data.Tokenizer()
    assert tokenizer.encode("cafÃ© Ã©tÃ©") == tokenizer.encode("café été")


def test_tokenize_takes_a_string_or_a_list():
    assert data.tokenize("a cat").shape == (1, 77)
    assert torch.equal(data.tokenize(["a cat", "a dog"])[0], data.tokenize("a cat")[0])
    assert data.tokenize([]).shape == (0, 77)


@pytest.mark.parametrize(
    "text",
    ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "über café naïve",
     "猫の写真"],
)
def test_decode_inverts_encode_on_plain_text(text):
    tokenizer = data.Tokenizer()
    # Every word ends in '</w>', decoded as ' '.
    assert tokenizer.decode(tokenizer.encode(text)) == text + " "


def test_bounded_word_cache_changes_no_ids():
    reference, tiny = data.Tokenizer(), data.Tokenizer(word_cache_size=3)
    texts = list(EDGE_CASES.values()) * 2
    assert [tiny.encode(t) for t in texts] == [reference.encode(t) for t in texts]
    assert len(tiny.word_cache) <= 3
