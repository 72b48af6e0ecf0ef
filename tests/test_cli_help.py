"""`--help` and `-h` on the trainers answer with every key of their config, read from the config
class itself (so the two cannot drift): its type, default and the comment written beside it,
grouped as the class groups them, with the YAML and --key=value usage on top."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import train_clip
import train_triplet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, config", [("train_clip.py", train_clip.Config),
                                            ("train_triplet.py", train_triplet.Config)])
def test_help_lists_every_key_with_its_type_default_and_description(script, config):
    for flag in ("--help",) if script == "train_clip.py" else ("-h",):
        result = subprocess.run([sys.executable, script, flag], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        text = result.stdout
        assert text.startswith(f"usage: python {script} [CONFIG.yaml] [--key=value ...]")
        for field in dataclasses.fields(config):
            shown = repr(field.default) if isinstance(field.default, str) else field.default
            assert f"  --{field.name}  (" in text and f"default {shown})" in text, field.name
    # Grouped as the class groups them; a key's description is the comment beside it.
    headings = [line for line in text.splitlines() if line and not line.startswith(" ")]
    for group in ("data", "model", "optimiser and schedule", "loop", "logging", "evaluation"):
        assert any(h.startswith(group) and h.endswith(":") for h in headings), group
    assert "--lr_schedule  (str, default 'cosine')" in text


def test_every_key_has_a_description():
    for config in (train_clip.Config, train_triplet.Config):
        described = dict(kv for _, keys in cli._documented_fields(config) for kv in keys)
        names = [f.name for f in dataclasses.fields(config)]
        assert list(described) == names  # every field, in the class's order
        # Self-evident numbers (epochs, lr, betas) may go without; most keys say what they do.
        assert sum(bool(described[n]) for n in names) >= 0.8 * len(names)


def test_a_misspelt_key_names_the_closest_known_one():
    with pytest.raises(cli.UserError, match=r"unknown key --warmup_step; did you mean "
                                            r"--warmup_steps\?"):
        cli.load_config(train_clip.Config, ["--warmup_step=3"])
    with pytest.raises(cli.UserError, match=r"unknown key --zzz; --help lists every key"):
        cli.load_config(train_triplet.Config, ["--zzz=1"])
