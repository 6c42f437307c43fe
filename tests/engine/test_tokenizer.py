import pytest
from transformers import AutoTokenizer

from services.common.errors import InvalidRequestError
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 🎉🎉 and\ttabs\nnewlines", "plain ascii words"]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return Tokenizer(tiny_llama)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_deltas_reassemble_the_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([t]) for t in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # never a broken character


def test_encoding_and_chat_template_match_transformers(tok, tiny_llama):
    hf = AutoTokenizer.from_pretrained(tiny_llama)
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"]
    messages = [{"role": "user", "content": "Hi there"}]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_model_without_chat_template_says_so(tmp_path, tiny_llama):
    (tmp_path / "tokenizer.json").write_bytes((tiny_llama / "tokenizer.json").read_bytes())
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer(tmp_path).encode_chat("hi")
