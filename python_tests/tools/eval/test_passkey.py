"""dpe_kernels/tools/eval/passkey.py: the pass-key prompt (length, needle depth, both formats),
its scoring and reproducible keys (a byte tokenizer; no model)."""
import pytest

pytest.importorskip("transformers")

from dpe_kernels.tools import models  # noqa: E402
from dpe_kernels.tools.eval.data import PASSKEY_FILLER  # noqa: E402
from dpe_kernels.tools.eval.niah import niah_sample  # noqa: E402
from dpe_kernels.tools.eval.passkey import (  # noqa: E402
    NEEDLE as PK_NEEDLE, passkey_key, passkey_prompt, passkey_stop, score_passkey)
from dpe_kernels.tools.eval.prompts import format_pieces  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return models.ByteTokenizer()


@pytest.mark.parametrize("fmt", ["raw", "chat"])
@pytest.mark.parametrize("length", [400, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_length_and_depth(tok, fmt, length, depth):
    key = passkey_key(3)
    p = passkey_prompt(tok, length, depth, key, fmt)
    assert len(p) == length and len(p.input_ids) == length
    needle = tok.encode(" " + PK_NEEDLE.format(key=key), add_special_tokens=False)
    pos = p.needle_positions[0]
    assert p.input_ids[pos:pos + len(needle)] == needle
    # the needle sits at the requested fraction of the haystack, up to the sentence snap
    pre, _ = format_pieces(tok, fmt)
    intro_end = len(pre) + len(tok.encode(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.", add_special_tokens=False))
    hay = p.meta["haystack_tokens"]
    assert abs((pos - intro_end) - depth * hay) <= 48
    text = tok.decode(p.input_ids)
    assert text.count(str(key)) == 2 and PASSKEY_FILLER.strip()[:20] in text
    if fmt == "chat":
        assert text.startswith("<user>") and text.rstrip().endswith("The pass key is")
    else:
        assert text.endswith(". What is the pass key? The pass key is")  # haystack ends a sentence


def test_passkey_prompt_too_short(tok):
    with pytest.raises(ValueError, match="shorter than the prompt"):
        passkey_prompt(tok, 50, 0.5, 12345)


def test_score_passkey():
    assert score_passkey(" 40612.", 40612) == 1.0
    assert score_passkey("40612", "40612") == 1.0
    assert score_passkey(" 4061.", 40612) == 0.0
    assert score_passkey(" 406123", 40612) == 0.0
    assert score_passkey(" 1. The key is 40612", 40612) == 0.0  # the FIRST number counts
    assert score_passkey(" unknown", 40612) == 0.0
    assert passkey_stop(" 123.") and not passkey_stop(" 123") and not passkey_stop(" the")


def test_keys_reproducible():
    assert passkey_key(0) == passkey_key(0) and passkey_key(0) != passkey_key(1)
    assert 10000 <= passkey_key(5) <= 99999
    assert niah_sample(2) == niah_sample(2)
