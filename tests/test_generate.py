"""``hymoe generate`` (hymoe.train.generate): greedy decoding equals Hugging Face transformers'
NemotronH ``generate`` on the exported model (the oracle: its own cached Mamba/attention decoding),
and the sampling filters equal transformers' temperature / top-k / top-p logits warpers. Sampling is
seeded, draws with the filtered probabilities, and stops at the end-of-document token or the
model's length."""

import pytest
import torch
from test_hf_interop import CFG, VOCAB, perturb

from hymoe.model import hf
from hymoe.train.generate import Sampling, candidates, generate, next_token

PROMPT = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def model():
    m = hf.build_single_process(CFG, VOCAB, seed=3)
    perturb(m, "expert_bias")
    return m.eval()


def test_greedy_equals_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.NemotronHForCausalLM.from_pretrained(hf.to_hf(model, tmp_path / "hf"),
                                                               dtype=torch.float32).eval()
    # 20 prompt + 30 new tokens cross the Mamba chunk (16) several times.
    want = theirs.generate(torch.tensor([PROMPT]), max_new_tokens=30, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert generate(model, PROMPT, 30) == want
    assert len(set(want)) > 3  # not one token repeated


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9), (0.8, 10, 0.5), (2.0, 1, 1.0),
    (1.0, 0, 0.01),
])
def test_filters_equal_transformers_warpers(temperature, top_k, top_p):
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 3
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    scores = logits[None].clone()
    for w in warpers:
        scores = w(None, scores)
    want = torch.softmax(scores[0], -1)
    got = candidates(logits, Sampling(temperature, top_k, top_p))
    assert torch.equal(got > 0, want > 0)  # the same kept set
    assert torch.allclose(got, want, atol=1e-6)


def test_draws_follow_the_filtered_probabilities():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    s = Sampling(temperature=1.0, top_p=0.95)
    p = candidates(logits, s)
    # Softmax: .462 .280 .170 .062 .023 .003; the first four reach 95% of the mass.
    assert (p > 0).tolist() == [True] * 4 + [False] * 2
    g = torch.Generator().manual_seed(0)
    n = 6000
    counts = torch.bincount(torch.tensor([next_token(logits, s, g) for _ in range(n)]), minlength=6)
    assert counts[p == 0].sum() == 0
    expected = n * p[p > 0]
    chi2 = float(((counts[p > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # 99.9% quantile of χ² with 3 degrees of freedom (4 kept tokens)


def test_sampling_is_seeded_and_limited(model):
    hot = Sampling(temperature=1.5)
    a = generate(model, PROMPT, 12, hot, seed=1)
    assert a == generate(model, PROMPT, 12, hot, seed=1)
    assert a != generate(model, PROMPT, 12, hot, seed=2)
    greedy = generate(model, PROMPT, 12)
    assert generate(model, PROMPT, 12, Sampling(temperature=1.5, top_k=1), seed=4) == greedy
    # The end-of-document token ends the continuation, and is not part of it.
    assert generate(model, PROMPT, 12, stop=greedy[5]) == greedy[:greedy.index(greedy[5])]
    # Never past the model's length: 20 prompt tokens, 24 at most in all.
    assert generate(model, PROMPT, 12, max_length=24) == greedy[:4]
    streamed = []
    generate(model, PROMPT, 3, on_token=lambda new: streamed.append(list(new)))
    assert streamed == [greedy[:1], greedy[:2], greedy[:3]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(max_length=20), "no room to generate"),
    (dict(sampling=Sampling(top_p=0.0)), "--top-p"),
    (dict(sampling=Sampling(temperature=-1.0)), "--temperature"),
    (dict(sampling=Sampling(top_k=-2)), "--top-k"),
])
def test_bad_arguments_are_refused(model, kwargs, message):
    args = dict(prompt=PROMPT, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, **args)


def test_a_hugging_face_folder_loads_in_place(model, tmp_path):
    """`hymoe generate HF_DIR` (and `hymoe eval`): the folder's config.json, weights read in place
    and its own tokenizer.json."""
    from hymoe.train.eval_model import load_model, tokenizer_path

    out = hf.to_hf(model, tmp_path / "hf")
    loaded, meta, path = load_model(out)
    assert path == out and meta["step"] is None and meta["vocab_size"] == VOCAB
    assert generate(loaded, PROMPT, 12) == generate(model, PROMPT, 12)
    (out / "tokenizer.json").write_text("{}")
    assert tokenizer_path(out) == out / "tokenizer.json"


def test_stop_ids_of_a_hugging_face_folder(model, tmp_path):
    """A released tokenizer has no hymoe end-of-document token: the folder's eos_token_id ends the
    continuation instead; a set of stop tokens ends it at the first drawn."""
    import json

    from tokenizers import Tokenizer, models

    from hymoe.train.eval_cli import _stop_ids

    out = hf.to_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config["eos_token_id"] = [2, 11]
    (out / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.WordLevel({"a": 0, "</s>": 2}, unk_token="a"))
    assert _stop_ids(tok, out, {"hf": True}) == {2, 11}
    greedy = generate(model, PROMPT, 12)
    stops = {greedy[4], greedy[7]}
    first = min(greedy.index(t) for t in stops)
    assert generate(model, PROMPT, 12, stop=stops) == greedy[:first]
