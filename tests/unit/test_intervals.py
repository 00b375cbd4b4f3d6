"""Issue #31: each gated metric's 95% interval (a block bootstrap over positions, or resampled sentences), whether
it clears its threshold, and how the report, `builder build`'s summary and `builder verify` show it."""

from __future__ import annotations

import numpy as np
import pytest

from builder.gates import interval_verdicts
from builder.steps.gate import format_report, format_summary
from builder.tasks import base, causal_lm, text_encoder
from builder.verification import VerificationReport


def _correlated(sequences: int, length: int = 512, seed: int = 1) -> list[np.ndarray]:
    """Per-position 0/1 agreements whose errors come in runs (an AR(1) latent), as a model's do on a passage."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(sequences):
        latent = np.zeros(length)
        for i in range(1, length):
            latent[i] = 0.95 * latent[i - 1] + rng.normal()
        rows.append((latent > -1.0).astype(float))
    return rows


def test_the_interval_holds_the_value_and_is_the_same_every_time():
    sequences = _correlated(4)
    low, high = base.block_interval(sequences)
    mean = np.concatenate(sequences).mean()
    assert low < mean < high
    assert base.block_interval(sequences) == [low, high]  # seeded: the report is reproducible


def test_the_interval_narrows_with_more_text():
    def width(sequences: int) -> float:
        low, high = base.block_interval(_correlated(sequences))
        return high - low

    assert width(16) < 0.7 * width(4)


def test_blocks_widen_the_interval_of_correlated_positions():
    """Resampling single positions would pretend correlated ones are independent, and be too narrow."""
    sequences = _correlated(4)
    blocks, positions = base.block_interval(sequences), base.block_interval(sequences, block=1)
    assert blocks[1] - blocks[0] > 1.5 * (positions[1] - positions[0])


def test_a_lowest_cosine_interval_starts_at_the_lowest_sentence():
    cosines = np.array([0.999, 0.998, 0.97, 0.999, 0.997, 0.996])
    low, high = base.resampled_interval(cosines, np.min)
    assert low == pytest.approx(0.97) and 0.97 < high <= 0.999


def _lm_outputs(noise: float, seed: int = 0, chunks: int = 3) -> tuple[dict, dict, dict]:
    import torch

    vocabulary, generator = 40, torch.Generator().manual_seed(seed)
    inputs = {"eval_chunks": [torch.randint(0, vocabulary, (1, 128), generator=generator) for _ in range(chunks)]}
    logits = [torch.randn(128, vocabulary, generator=generator) * 3 for _ in range(chunks)]
    prompts = [torch.randn(9, vocabulary, generator=generator) * 3]
    reference = {"eval_logits": logits, "prompt_logits": prompts, "continuations": [[1, 2]]}
    candidate = {
        "eval_logits": [t + noise * torch.randn(t.shape, generator=generator) for t in logits],
        "prompt_logits": [t + noise * torch.randn(t.shape, generator=generator) for t in prompts],
        "continuations": [[1, 2]],
    }
    return inputs, reference, candidate


def test_a_language_models_gated_metrics_lie_inside_their_intervals():
    metrics, intervals, _ = causal_lm.compare(*_lm_outputs(noise=2.0), "cpu")
    assert set(intervals) == {"top1_agreement", "kl_divergence_mean", "perplexity_ratio"}
    for metric, (low, high) in intervals.items():
        assert low < metrics[metric] < high, metric
    assert intervals["perplexity_ratio"][0] > 0  # the ratio is exp(mean gap): positive


def test_an_encoders_lowest_cosine_has_an_interval_and_its_largest_difference_none():
    import torch

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 5, 8, generator=generator)
    inputs = {"sentences": {"attention_mask": torch.ones(6, 5, dtype=torch.long)}}
    candidate = {"hidden": hidden + 0.3 * torch.randn(hidden.shape, generator=generator)}
    metrics, intervals, _ = text_encoder.compare(inputs, {"hidden": hidden}, candidate, "cpu")
    assert set(intervals) == {"cosine_min"}
    low, high = intervals["cosine_min"]
    assert low == pytest.approx(metrics["cosine_min"]) and high > low


@pytest.mark.parametrize(
    ("interval", "bound", "verdict"),
    [
        ([0.60, 0.70], 0.45, "clear"),  # passes at both ends
        ([0.40, 0.55], 0.45, "straddles"),
        ([0.20, 0.30], 0.45, "clear"),  # fails at both ends: the failure is not bad luck
    ],
)
def test_the_verdict_says_whether_the_bound_lies_inside_the_interval(interval, bound, verdict):
    assert interval_verdicts({"top1_agreement": interval}, {"top1_agreement": bound}) == {"top1_agreement": verdict}


def test_a_maximum_bound_straddled_is_flagged_and_a_metric_without_interval_has_no_verdict():
    intervals = {"kl_divergence_mean": [0.9, 1.7], "perplexity_ratio": [1.1, 1.3]}
    bounds = {"kl_divergence": 1.5, "perplexity_ratio": 2.5, "footprint_ratio": 0.5}
    assert interval_verdicts(intervals, bounds) == {"kl_divergence_mean": "straddles", "perplexity_ratio": "clear"}


def _report(**fields) -> VerificationReport:
    report = {
        "passed": True,
        "task": "text-generation",
        "device": "cpu",
        "metrics": {"top1_agreement": 0.5, "kl_divergence_mean": 0.3, "footprint_ratio": 0.4},
        "thresholds": {"top1_agreement": 0.45, "kl_divergence": 1.5, "footprint_ratio": 0.5},
        "failures": [],
        "performance": {},
    }
    return VerificationReport.model_validate(report | fields)


def test_the_build_summary_and_builder_verify_show_each_interval_and_its_verdict():
    report = _report(
        report_version=3,
        intervals={"top1_agreement": [0.41, 0.58], "kl_divergence_mean": [0.25, 0.36]},
        interval_verdicts={"top1_agreement": "straddles", "kl_divergence_mean": "clear"},
    )
    summary = format_summary(report).splitlines()
    assert summary[1].split() == ["top1_agreement", "0.500", ">=", "0.450", "95%", "[0.410,", "0.580]", "straddles"]
    assert summary[2].endswith("<= 1.500  95% [0.250, 0.360] clear")
    assert summary[3].endswith("<= 0.500")  # footprint_ratio: measured, no interval
    assert "top1_agreement               0.5  95% [0.410, 0.580] straddles  (threshold 0.45)" in format_report(report)


def test_a_version_2_report_without_intervals_reads_and_prints_as_before():
    report = _report(report_version=2)
    assert report.intervals is None and "intervals" not in report.to_json()
    assert format_summary(report).splitlines()[1].split() == ["top1_agreement", "0.500", ">=", "0.450"]


def test_an_interval_is_two_numbers():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="intervals.top1_agreement"):
        _report(intervals={"top1_agreement": [0.4, 0.5, 0.6]})
