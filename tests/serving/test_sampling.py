"""Sampling semantics: top-k 1 is greedy, seeds reproduce, penalties as defined, stop strings cut."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alphalora.serving.engine import Engine, EngineConfig, SamplingParams
from alphalora.serving.engine.sampling import _filters, apply_penalties, filtered_probs, sample, sample_rows
from tests.serving.test_engine import _base


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    for params in (SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=0.7, top_p=1e-6)):
        for seed in range(5):
            assert sample(logits.clone(), params, [], [], torch.Generator().manual_seed(seed)).token == best


def test_seeded_sampling_reproduces_and_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    params = SamplingParams(temperature=1.0)
    draws = [sample(logits, params, [], [], torch.Generator().manual_seed(s)).token for s in range(4000)]
    again = [sample(logits, params, [], [], torch.Generator().manual_seed(s)).token for s in range(4000)]
    assert draws == again
    frequencies = torch.bincount(torch.tensor(draws), minlength=4).float() / 4000
    torch.testing.assert_close(frequencies, torch.softmax(logits, 0), atol=0.03, rtol=0)
    top = sample(logits, SamplingParams(temperature=1.0, top_k=2), [], [], torch.Generator().manual_seed(1)).token
    assert top in (2, 3)


def test_penalties_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0])
    out = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1])
    assert out.tolist() == [1.0, -2.0, 0.5, 1.0]  # positive logits divided, negative multiplied
    out = apply_penalties(logits.clone(), SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                          prompt_ids=[], output_ids=[3, 3, 2])
    assert out.tolist() == [2.0, -1.0, 0.5 - 0.25 - 0.5, 1.0 - 0.5 - 0.5]


def test_logprobs_are_the_models_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0])
    result = sample(logits, SamplingParams(temperature=0.0, logprobs=2), [], [], None)
    expected = torch.log_softmax(logits, 0)
    assert result.token == 2 and result.logprob == pytest.approx(float(expected[2]))
    assert list(result.top_logprobs) == [2, 1]


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=0),
                                 dict(repetition_penalty=0), dict(logprobs=21)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_token_ids_and_length_end_sequences():
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(block_size=4))
    prompt = [5, 9, 14]
    (greedy,) = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert greedy.finish_reason == "length" and len(greedy.output_ids) == 6
    stop_at = greedy.output_ids[2]
    first = greedy.output_ids.index(stop_at)
    (stopped,) = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                          stop_token_ids=[stop_at]))
    assert stopped.finish_reason == "stop" and stopped.output_ids == greedy.output_ids[: first + 1]


def test_bf16_engine_runs_and_stays_close_to_fp32():
    prompt = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(block_size=4, dtype=dtype))
        (seq,) = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0))
        results[dtype] = [entry.logprob for entry in seq.prompt_logprobs[1:]]
        assert engine.runner.k_cache.dtype == dtype
    torch.testing.assert_close(torch.tensor(results[torch.bfloat16]), torch.tensor(results[torch.float32]),
                               atol=0.15, rtol=0.05)


def test_sample_rows_equals_sampling_each_row_alone():
    """The batched path (greedy rows without penalties in one argmax) gives what `sample` gives row by row."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    logits[4, 7] = logits[4, 9] = logits[4].max() + 1  # a tie: the first index wins in both paths
    requests = [
        (SamplingParams(temperature=0.0), [1, 2], [3], None),
        (SamplingParams(temperature=0.0, logprobs=3), [], [], None),
        (SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=1), [5, 6], [7, 7], None),
        (SamplingParams(temperature=0.8, top_p=0.9, seed=4), [1], [], torch.Generator().manual_seed(4)),
        (SamplingParams(temperature=0.0, logprobs=0), [], [], None),
        (SamplingParams(temperature=0.0, logprobs=5), [2], [], None),
    ]
    batched = sample_rows(logits.clone(), requests)
    alone = [sample(logits[i].clone(), p, prompt, out, torch.Generator().manual_seed(4) if g else None)
             for i, (p, prompt, out, g) in enumerate(requests)]
    assert [r.token for r in batched] == [r.token for r in alone]
    assert batched[4].token == 7
    for got, want in zip(batched, alone, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-6)
        assert (got.top_logprobs is None) == (want.top_logprobs is None)
        if want.top_logprobs:
            assert list(got.top_logprobs) == list(want.top_logprobs)
            assert list(got.top_logprobs.values()) == pytest.approx(list(want.top_logprobs.values()), abs=1e-6)


def _filtered_by_definition(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One row's sampling distribution, written out: top-k keeps the logits at least the k-th largest,
    top-p the most probable tokens whose mass before them is under p."""
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        z = np.where(z < np.sort(z)[::-1][min(top_k, z.size) - 1], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        kept = np.zeros_like(p)
        kept[order[before < top_p]] = p[order[before < top_p]]
        p = kept / kept.sum()
    return p


ROW_FILTERS = [(1.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.8), (0.5, 10, 0.6), (2.0, 3, 0.95), (1.0, 100, 0.3)]


def test_filtered_probs_follow_the_definitions_row_by_row():
    logits = torch.randn(len(ROW_FILTERS), 40, generator=torch.Generator().manual_seed(11)) * 2
    temperature, top_k, top_p = (torch.tensor(column) for column in zip(*ROW_FILTERS, strict=True))
    got = filtered_probs(logits, temperature, top_k, top_p)
    for row, (t, k, p) in enumerate(ROW_FILTERS):
        np.testing.assert_allclose(got[row].numpy(), _filtered_by_definition(logits[row].numpy(), t, k, p),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature,min_p,top_k,top_p", [(1.0, 0.1, -1, 1.0), (0.6, 0.05, -1, 1.0),
                                                          (1.5, 0.2, 8, 0.9), (1.0, 0.0, -1, 1.0)])
def test_min_p_follows_transformers_min_p_warper(temperature, min_p, top_k, top_p):
    """vLLM's min_p against transformers' own warpers, applied in vLLM's order (temperature, min-p,
    top-k, top-p) to the same logits."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    want = torch.softmax(scores, dim=-1)
    rows = [SamplingParams(temperature=temperature, min_p=min_p, top_k=top_k, top_p=top_p)] * 3
    got = filtered_probs(logits, *_filters(rows, "cpu"))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert ((got > 0).sum(-1) < 50).all() == bool(min_p or top_k > 0 or top_p < 1)


def test_logit_bias_moves_the_greedy_choice_and_not_the_reported_logprob():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    banned = SamplingParams(temperature=0.0, logprobs=1, logit_bias={1: -100.0})
    forced = SamplingParams(temperature=0.0, logit_bias={0: 100.0})
    without_1, with_0 = (sample_rows(logits, [(params, [], [], None)])[0] for params in (banned, forced))
    assert without_1.token == 2 and with_0.token == 0
    assert with_0.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[0]))
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="min_p must be in"):
        SamplingParams(min_p=1.5)


def test_random_rows_sampled_together_follow_each_rows_distribution():
    torch.manual_seed(0)
    base = torch.randn(len(ROW_FILTERS), 8, generator=torch.Generator().manual_seed(5)) * 1.5
    draws = 3000
    logits = base.repeat(draws, 1)  # row r of every block of len(ROW_FILTERS) rows has filter r
    requests = [(SamplingParams(temperature=t, top_k=k, top_p=p, logprobs=0), [], [], None)
                for _ in range(draws) for t, k, p in ROW_FILTERS]
    tokens = torch.tensor([r.token for r in sample_rows(logits, requests)]).view(draws, len(ROW_FILTERS))
    for row, (t, k, p) in enumerate(ROW_FILTERS):
        expected = _filtered_by_definition(base[row].numpy(), t, k, p)
        frequencies = torch.bincount(tokens[:, row], minlength=8).double().numpy() / draws
        assert np.all(frequencies[expected == 0] == 0)  # nothing outside the kept tokens, ever
        np.testing.assert_allclose(frequencies, expected, atol=0.035, rtol=0)


def test_min_tokens_keeps_eos_and_stop_ids_out_until_reached():
    """vLLM's min_tokens (generate's min_new_tokens): EOS and the stop token ids cannot be sampled
    before that many output tokens; then they are ordinary candidates again."""
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0]] * 4)  # EOS (2) best, then stop id 3, then 4
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3], logprobs=1)
    requests = [(params, [], [7], None), (params, [], [7, 7], None), (params, [], [7, 7, 7], None),
                (SamplingParams(temperature=0.0), [], [], None)]
    results = sample_rows(logits, requests, eos_token_ids=[2])
    assert [r.token for r in results] == [4, 4, 2, 2]
    # the reported logprob stays the model's own distribution, as for penalties
    assert results[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], 0)[4]))
    random = SamplingParams(temperature=1.0, min_tokens=2)
    draws = {sample_rows(logits[:1], [(random, [], [], torch.Generator().manual_seed(s))], [2])[0].token
             for s in range(200)}
    assert 2 not in draws and draws <= {0, 1, 3, 4}


def test_a_temperature_below_vllms_epsilon_is_greedy():
    """vLLM samples greedily under a temperature of 1e-5; dividing by 1e-40 would overflow the logits to inf."""
    logits = torch.tensor([0.5, 3.0, 1.0])
    for temperature in (1e-40, 9e-6):
        params = SamplingParams(temperature=temperature)
        assert params.temperature == 0.0
        assert sample(logits.clone(), params, [], [], None).token == 1
    assert SamplingParams(temperature=1e-5).temperature == 1e-5


def test_rows_with_infinite_or_nan_logits_neither_fail_nor_change_the_other_rows():
    """Oracle: each healthy row's distribution alone. A repetition penalty near 0 divides positive logits to +inf
    (drawn among themselves); NaN logits (a broken model) are never drawn, and a row of nothing but NaN gives its
    first token instead of an error that would fail every sequence of the batch."""
    healthy = torch.tensor([[0.1, 2.0, -1.0, 0.7]])
    logits = torch.cat([healthy, torch.tensor([[1.0, math.inf, -2.0, math.inf], [math.nan, 1.0, math.nan, 0.0],
                                               [math.nan] * 4])])
    rows = logits.shape[0]
    ones = torch.ones(rows)
    probs = filtered_probs(logits, ones, torch.full((rows,), -1), ones)
    torch.testing.assert_close(probs[0], filtered_probs(healthy, ones[:1], torch.full((1,), -1), ones[:1])[0])
    torch.testing.assert_close(probs[1:], torch.tensor([[0.0, 0.5, 0.0, 0.5],
                                                        [0.0, math.e / (math.e + 1), 0.0, 1 / (math.e + 1)],
                                                        [1.0, 0.0, 0.0, 0.0]]))
    penalised = SamplingParams(temperature=1.0, repetition_penalty=1e-40)
    requests = [(SamplingParams(temperature=0.0), [], [], None), (penalised, [0, 1], [], None),
                (SamplingParams(temperature=0.8), [], [], None)]
    results = sample_rows(torch.tensor([[0.1, 2.0, -1.0, 0.7], [1.0, 0.5, -2.0, 3.0], [0.0, 0.0, 9.0, 0.0]]),
                          requests)
    assert results[0].token == 1 and results[1].token in (0, 1)  # the penalised row draws among its +inf logits
    assert all(math.isfinite(r.logprob) for r in results)


@pytest.mark.parametrize("bad, fragment", [
    (dict(top_k=2.5), "top_k must be an integer"), (dict(logprobs=2.5), "logprobs must be an integer"),
    (dict(max_tokens=None), "max_tokens must be an integer"), (dict(temperature=math.nan), "temperature must"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"), (dict(frequency_penalty=math.inf), "frequency_penalty"),
    (dict(presence_penalty=math.nan), "presence_penalty"), (dict(logit_bias={3: math.nan}), "logit_bias values"),
    (dict(stop=[1]), "stop must be a string or a list of strings"), (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos must be true or false"),
])
def test_sampling_params_of_the_wrong_type_or_not_finite_are_refused(bad, fragment):
    """Each passed the range checks (NaN fails every comparison) and then sampled garbage without a word, or failed
    the engine's step for every request of the batch (a float top_k as a gather index)."""
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**bad)


def test_sampling_params_read_numpy_scalars_and_one_stop_string():
    params = SamplingParams(max_tokens=np.int64(4), top_k=np.int32(3), seed=np.int64(3), temperature=np.float32(0.5),
                            logit_bias={np.int64(5): np.float32(1.5)}, stop="the end", stop_token_ids=[np.int64(2)])
    assert (params.max_tokens, params.top_k, params.seed, params.temperature) == (4, 3, 3, 0.5)
    assert all(type(v) is int for v in (params.max_tokens, params.top_k, params.seed))
    assert params.logit_bias == {5: 1.5} and params.stop == ["the end"] and params.stop_token_ids == [2]
