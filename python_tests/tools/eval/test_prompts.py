"""dpe_kernels/tools/eval/prompts.py: the raw and chat prompt formats around a tokenizer."""
import pytest

pytest.importorskip("transformers")

from dpe_kernels.tools import models  # noqa: E402
from dpe_kernels.tools.eval.prompts import format_pieces  # noqa: E402


def test_prompt_with_real_tokenizer_style_special_tokens():
    """raw format keeps the BOS the tokenizer adds by default; chat wraps the template."""
    t = models.ByteTokenizer()
    pre_raw, post_raw = format_pieces(t, "raw")
    assert pre_raw == [t.bos_token_id] and post_raw == []
    pre_chat, post_chat = format_pieces(t, "chat")
    assert t.decode(pre_chat) == "<user>\n" and t.decode(post_chat) == "\n<assistant>\n"
