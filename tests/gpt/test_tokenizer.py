from __future__ import annotations

import subprocess
import sys

from gpt.tokenizer import END_OF_TEXT, SPECIAL_TOKENS, gpt2_tokenizer, load_tokenizer, train_tokenizer

UNICODE_SAMPLES = [
    "Hello, world",
    "naïve café — déjà vu",
    "日本語のテキスト、そして中文。",
    "emoji 🙂🚀👩‍👩‍👧 and \u200b zero-width",
    "tabs\tand\nnewlines\r\n  spaces   ",
    "numbers 1234567 3.14159 -42",
    "",
    "\x00\x01 control \uffff",
]


def test_gpt2_encoding_matches_the_published_ids():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.eot_id == 50256
    assert tok.n_vocab == 50257


def test_special_token_text_in_user_input_stays_plain_text():
    tok = gpt2_tokenizer()
    ids = tok.encode(f"a {END_OF_TEXT} b")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == f"a {END_OF_TEXT} b"


def test_trained_tokenizer_round_trips_any_text_and_compresses(trained_tokenizer, verdict_text):
    for text in UNICODE_SAMPLES + [verdict_text]:
        assert trained_tokenizer.decode(trained_tokenizer.encode(text)) == text
    assert len(trained_tokenizer.encode(verdict_text)) < len(verdict_text.encode("utf-8")) / 2
    assert trained_tokenizer.n_vocab == 512
    for token in SPECIAL_TOKENS:
        assert trained_tokenizer.has_special(token)


def test_trained_tokenizer_is_stored_beside_the_model(tmp_path, trained_tokenizer, verdict_text):
    trained_tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(verdict_text) == trained_tokenizer.encode(verdict_text)
    assert loaded.special_tokens == trained_tokenizer.special_tokens


def test_missing_gpt2_files_give_one_clear_sentence(tmp_path):
    # An empty cache and no network: tiktoken would raise a connection error deep inside requests.
    code = (
        "from gpt.tokenizer import gpt2_tokenizer\n"
        "from gpt.errors import KettleError\n"
        "try:\n    gpt2_tokenizer()\nexcept KettleError as e:\n    print(e)\n"
    )
    env = {
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "TIKTOKEN_CACHE_DIR" in out.stdout and "Traceback" not in out.stdout + out.stderr
    assert len(out.stdout.strip().splitlines()) == 1


def test_vocab_too_small_is_refused():
    import pytest

    from gpt.errors import KettleError

    with pytest.raises(KettleError, match="at least"):
        train_tokenizer(["abc"], vocab_size=100)
