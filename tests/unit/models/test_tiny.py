"""The tiny models' byte-level tokenizer."""

from leaml_ray.models.tiny import SPECIAL_TOKENS, build_tokenizer


def test_tokenizer_is_small_and_keeps_special_tokens():
    tok = build_tokenizer()
    assert len(tok) <= 512
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok.tokenize(t)) == 1
    text = "a large purple circle on the left on a striped background."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(text)["input_ids"]) <= 14  # whole words are single tokens
    assert tok.decode(tok("naïve ☃ text")["input_ids"]) == "naïve ☃ text"  # byte-level: nothing is unknown


def test_world3_tokenizer_has_world3_words_whole():
    tok = build_tokenizer(world=3)
    assert len(tok) <= 512
    for text in ("a small ringed purple triangle in the middle on a dotted background.", "erosion; polyp; ulcer"):
        assert tok.decode(tok(text)["input_ids"]) == text
        assert len(tok(text)["input_ids"]) <= len(text.split()) + 3  # about a token a word (plus "; " and ".")
