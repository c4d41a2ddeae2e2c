"""Tokenizer, chat template, stream detokenisation, sampling and the generate loop (in-process, real files)."""

from __future__ import annotations

import pytest
import torch

from moestream.engine.generate import (ContextOverflowError, GenerationStats, TextGeneration, _StopMatcher,
                                       generate_ids)
from moestream.engine.hf_loading import load_hf_model
from moestream.engine.sampling import (InvalidRequestError, Sampler, SamplingParams, filter_top_k, filter_top_p)
from moestream.engine.tokenizer import ChatTemplateError, Tokenizer, render_chat_template

from runtime_model import CHATML, build_runtime_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return build_runtime_model(tmp_path_factory.mktemp("gen_model"))


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_folder(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_hf_model(model_dir)[0]


# ----------------------------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip_and_specials(tok: Tokenizer) -> None:
    text = "Hello, how are you? Caf\u00e9 \u65e5\u672c\u8a9e \U0001f600"
    assert tok.decode(tok.encode(text)) == text
    im_end = tok.backend.token_to_id("<|im_end|>")
    assert tok.eos_token_ids == {im_end}
    assert tok.special_tokens["eos_token"] == "<|im_end|>"
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.backend.token_to_id("<|im_start|>") and ids[-1] == im_end
    assert tok.decode(ids) == "user\nhi"  # special tokens skipped
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_chat_template_hf_semantics(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")
    # bos/eos strings, raise_exception and tojson are available as in transformers
    tpl = "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}{{ eos_token }}"
    out = render_chat_template(tpl, [{"role": "user", "content": "\u00e9"}], special_tokens={"bos_token": "<s>",
                                                                                             "eos_token": "</s>"})
    assert out == '<s>{"role": "user", "content": "\u00e9"}</s>'
    with pytest.raises(ChatTemplateError, match="only users"):
        render_chat_template("{{ raise_exception('only users') }}", [{"role": "x", "content": ""}])
    with pytest.raises(ChatTemplateError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])


def test_tokenizer_from_str_without_template(model_dir) -> None:
    t = Tokenizer.from_str((model_dir / "tokenizer.json").read_text(), eos_token_ids=[5])
    assert 5 in t.eos_token_ids
    with pytest.raises(ChatTemplateError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_stream_decoder_never_splits_multibyte_characters(tok: Tokenizer) -> None:
    text = "\u65e5\u672c\u8a9e \U0001f600 Caf\u00e9 na\u00efve"
    ids = tok.encode(text)
    assert len(ids) > len(text) // 2  # byte-level BPE: several ids per CJK/emoji char
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + dec.flush() == text
    # arbitrary ids (invalid byte sequences included): the stream still reproduces the full decode
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(0, tok.vocab_size, (200,), generator=gen).tolist()
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in rand) + dec.flush() == tok.decode(rand)


# ----------------------------------------------------------------------------------- sampling
def test_sampling_rules() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    assert Sampler(SamplingParams())(logits) == 1  # greedy
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3))(logits) == 1
    assert Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=3))(logits) == 1
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [True, False, False, True]
    probs = torch.softmax(logits, -1)  # [0.09, 0.66, 0.24, 0.05]
    kept = ~torch.isinf(filter_top_p(logits, 0.8))
    assert kept.tolist() == [False, True, True, False] and probs[kept].sum() >= 0.8
    # a repetition penalty moves greedy away from a seen token
    assert Sampler(SamplingParams(repetition_penalty=2.0))(logits, context_ids=[1]) == 2
    flat = torch.zeros(1000)
    a = [Sampler(SamplingParams(temperature=1.0, seed=7))(flat) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    s1, s2 = Sampler(SamplingParams(temperature=1.0, seed=1)), Sampler(SamplingParams(temperature=1.0, seed=2))
    assert [s1(flat) for _ in range(20)] != [s2(flat) for _ in range(20)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(repetition_penalty=0.0), dict(seed=-1)])
def test_sampling_params_rejected(bad: dict) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


def test_stop_matcher_holds_back_partial_matches() -> None:
    m = _StopMatcher(["END"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed("yyEND tail") == ("yy", True)
    assert _StopMatcher([]).feed("abc") == ("abc", False)


# ----------------------------------------------------------------------------------- generate loop
def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with full re-computation (no KV cache)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), None)[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_loop_matches_full_recompute(model, tok) -> None:
    prompt = tok.encode("The quick brown fox")
    cache = model.make_cache(1, 64)
    stats = GenerationStats()
    out = list(generate_ids(model, cache, prompt, Sampler(SamplingParams()), max_tokens=12, eos_ids=set(),
                            stats=stats))
    assert out == _greedy_reference(model, prompt, 12)
    assert stats.prompt_tokens == len(prompt) and stats.generated_tokens == 12
    assert stats.finish_reason == "length"
    assert stats.prefill_tok_s > 0 and stats.decode_tok_s > 0 and stats.ttft_s > 0 and stats.peak_rss_bytes > 0
    # the same cache is reused (reset) for the next request with the same answer
    again = list(generate_ids(model, cache, prompt, Sampler(SamplingParams()), max_tokens=12, eos_ids=set(),
                              stats=GenerationStats()))
    assert again == out


def test_eos_stops_and_context_full(model, tok) -> None:
    prompt = tok.encode("Memory budgets")
    ref = _greedy_reference(model, prompt, 6)
    eos = ref[3]
    first = ref.index(eos)
    stats = GenerationStats()
    out = list(generate_ids(model, model.make_cache(1, 64), prompt, Sampler(SamplingParams()), max_tokens=20,
                            eos_ids={eos}, stats=stats))
    assert out == ref[:first] and stats.finish_reason == "stop"
    stats = GenerationStats()
    cache = model.make_cache(1, len(prompt) + 3)
    out = list(generate_ids(model, cache, prompt, Sampler(SamplingParams()), max_tokens=50, eos_ids=set(),
                            stats=stats))
    assert len(out) == 4 and stats.finish_reason == "length"  # 3 fed back + 1 from the last position
    with pytest.raises(ContextOverflowError, match="context window"):
        next(generate_ids(model, model.make_cache(1, 4), prompt, Sampler(SamplingParams()), max_tokens=5,
                          eos_ids=set(), stats=GenerationStats()))


def _text_generation(model, tok, prompt: str, stops: list[str], n: int = 24) -> TextGeneration:
    stats = GenerationStats()
    ids = generate_ids(model, model.make_cache(1, 128), tok.encode(prompt), Sampler(SamplingParams()),
                       max_tokens=n, eos_ids=set(), stats=stats)
    return TextGeneration(ids, tok.stream_decoder(), stops, stats)


def test_stop_sequences_cut_text(model, tok) -> None:
    full = _text_generation(model, tok, "Hello, how", []).result()
    assert full.text == tok.decode(full.token_ids)
    clean = [i for i, ch in enumerate(full.text) if ch != "\ufffd"]
    k = clean[len(clean) // 2]
    stop = full.text[k:k + 2]
    expected = full.text[:full.text.find(stop)]
    res = _text_generation(model, tok, "Hello, how", [stop, "never-appears"]).result()
    assert res.text == expected and res.finish_reason == "stop" and stop not in res.text
    chunks = list(_text_generation(model, tok, "Hello, how", [stop]))
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == "stop" and chunks[-1].stats is not None
    assert all(c.finish_reason is None for c in chunks[:-1])
