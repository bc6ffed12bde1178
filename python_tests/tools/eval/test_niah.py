"""dpe_kernels/tools/eval/niah.py: the needle-in-a-haystack prompt (one needle per quarter,
essay haystack) and its scoring."""
import pytest

pytest.importorskip("transformers")

from dpe_kernels.tools import models  # noqa: E402
from dpe_kernels.tools.eval.data import load_essays  # noqa: E402
from dpe_kernels.tools.eval.niah import NEEDLE as NIAH_NEEDLE, niah_prompt, niah_sample, score_niah  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return models.ByteTokenizer()


def test_niah_prompt_one_needle_per_quarter(tok):
    key, values = niah_sample(1)
    assert len(values) == 4 and len(set(values)) == 4 and all(len(v) == 7 for v in values)
    for depth in (0.0, 0.5, 0.9):
        p = niah_prompt(tok, 3000, depth, key, values)
        assert len(p) == 3000
        for q, (pos, v) in enumerate(zip(p.needle_positions, values)):
            ids = tok.encode(" " + NIAH_NEEDLE.format(key=key, value=v), add_special_tokens=False)
            assert p.input_ids[pos:pos + len(ids)] == ids
            assert q / 4 - 0.05 <= pos / 3000 <= (q + 1) / 4 + 0.05, (q, pos)
        assert p.needle_positions == sorted(p.needle_positions)
        before = tok.decode(p.input_ids[p.needle_positions[1] - 80:p.needle_positions[1]])
        assert before in load_essays()  # the haystack is essay text
        # the haystack ends on a sentence end, right before the question
        assert tok.decode(p.input_ids).split(" What are all the special")[0].rstrip().endswith((".", "?", "!"))


def test_score_niah():
    vals = ["1234567", "2345678", "3456789", "4567890"]
    assert score_niah("1234567, 2345678, 3456789 and 4567890.", vals) == 1.0
    assert score_niah("1234567 and 2345678", vals) == 0.5
    assert score_niah("12345678 2345678", vals) == 0.25  # whole numbers only
    assert score_niah("", vals) == 0.0
