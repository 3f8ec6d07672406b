"""The compiled spectral kernels against their pure-PyTorch references, opcheck and compile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from alphalora import ops
from alphalora.ops import reference
from tests.conftest import requires_cuda


def _spectra(seed: int, batch: int = 6, tail_power: float = 3.0, dtype=torch.float64):
    """Ascending positive spectra of different lengths, from random heavy-tailed-ish matrices."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        m = 30 + 37 * b
        w = torch.randn(m + 20, m, generator=g, dtype=torch.float64)
        w = w @ torch.diag(torch.rand(m, generator=g, dtype=torch.float64) ** tail_power + 1e-3)
        rows.append(torch.linalg.eigvalsh(w.T @ w).clamp(min=1e-9))
    width = max(r.numel() for r in rows)
    padded = torch.ones(batch, width, dtype=dtype)
    for b, r in enumerate(rows):
        padded[b, : r.numel()] = r.to(dtype)
    lengths = torch.tensor([r.numel() for r in rows])
    return padded, lengths


def _windows(lengths: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    lo = (torch.rand(lengths.shape, generator=g) * lengths * 0.4).long()
    hi = lo + 1 + (torch.rand(lengths.shape, generator=g) * (lengths - lo)).long()
    return lo, hi


CASES = [
    # (min_tail, bias_corrected, full candidate range)
    (1, False, True),
    (1, False, False),
    (8, True, True),
    (40, False, False),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_tail,bias_corrected,full", CASES)
def test_powerlaw_fit_matches_reference(seed, min_tail, bias_corrected, full):
    evals, lengths = _spectra(seed, tail_power=1.0 + seed)
    lo, hi = (torch.zeros_like(lengths), lengths - 1) if full else _windows(lengths, seed)
    got = ops.powerlaw_fit(evals, lengths, lo, hi, min_tail, bias_corrected)
    want = reference.powerlaw_fit(evals, lengths, lo, hi, min_tail, bias_corrected)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12, equal_nan=True)


def test_powerlaw_fit_reports_no_candidate():
    evals, lengths = _spectra(0, batch=2)
    lo = torch.tensor([5, 0])
    hi = torch.tensor([5, 1])  # empty window; a single candidate whose tail is too short
    alpha, distance, index = ops.powerlaw_fit(evals, lengths, lo, hi, 10_000, False)
    assert index.tolist() == [-1, -1]
    assert torch.isnan(alpha).all() and torch.isnan(distance).all()


def test_powerlaw_fit_known_exponent():
    # Pareto quantiles with density exponent 3: the full-range fit recovers alpha ~= 3.
    n = 2000
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    x = (1 - q) ** (-1 / 2.0)
    alpha, _, index = ops.powerlaw_fit(x[None], torch.tensor([n]), torch.tensor([0]), torch.tensor([n - 1]))
    assert abs(float(alpha) - 3.0) < 0.02
    assert int(index) < n // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log_lower_bound", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_xmin_peak_window_matches_reference(seed, dtype, log_lower_bound):
    evals, lengths = _spectra(seed, tail_power=0.5 + seed, dtype=dtype)
    # Scale some rows so the peak lands above 1, where the log10 lower bound bites.
    evals = evals * torch.tensor([1.0, 50.0, 0.01, 1.0, 1e3, 3.0], dtype=dtype)[:, None]
    got = ops.xmin_peak_window(evals, lengths, 100, log_lower_bound)
    want = reference.xmin_peak_window(evals, lengths, 100, log_lower_bound)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_powerlaw_fit(device):
    evals, lengths = (t.to(device) for t in _spectra(1, batch=3))
    lo, hi = torch.zeros_like(lengths), lengths - 1
    torch.library.opcheck(torch.ops.alphalora.powerlaw_fit.default, (evals, lengths, lo, hi, 1, False))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_xmin_peak_window(device):
    evals, lengths = (t.to(device) for t in _spectra(2, batch=3))
    torch.library.opcheck(torch.ops.alphalora.xmin_peak_window.default, (evals, lengths, 100, True))


def test_compiles_fullgraph():
    evals, lengths = _spectra(3, batch=3)

    def fit(evals, lengths):
        lo, hi = ops.xmin_peak_window(evals, lengths, 100, True)
        return ops.powerlaw_fit(evals, lengths, lo, hi, 1, False)

    compiled = torch.compile(fit, fullgraph=True, backend="eager")
    for got, want in zip(compiled(evals, lengths), fit(evals, lengths), strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)


@requires_cuda
@pytest.mark.parametrize("min_tail,bias_corrected,full", CASES)
def test_powerlaw_fit_cuda_matches_cpu(min_tail, bias_corrected, full):
    evals, lengths = _spectra(5, batch=8, tail_power=2.0)
    lo, hi = (torch.zeros_like(lengths), lengths - 1) if full else _windows(lengths, 5)
    cpu = ops.powerlaw_fit(evals, lengths, lo, hi, min_tail, bias_corrected)
    gpu = ops.powerlaw_fit(evals.cuda(), lengths.cuda(), lo.cuda(), hi.cuda(), min_tail, bias_corrected)
    assert torch.equal(gpu[2].cpu(), cpu[2])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-12, atol=1e-12, equal_nan=True)


@requires_cuda
def test_powerlaw_fit_cuda_edge_shapes_match_cpu():
    """No eigenvalues at all, and more spectra than a CUDA grid's y dimension holds (65535)."""
    empty = torch.empty(3, 0, dtype=torch.float64)
    none = torch.zeros(3, dtype=torch.long)
    for got, want in zip(ops.powerlaw_fit(empty.cuda(), none.cuda(), none.cuda(), none.cuda(), 1, False),
                         ops.powerlaw_fit(empty, none, none, none, 1, False), strict=True):
        torch.testing.assert_close(got.cpu(), want, equal_nan=True)
    many = 70_000
    evals = torch.linspace(1.0, 2.0, 12, dtype=torch.float64).pow(3).repeat(many, 1)
    evals[::7] *= 1.5  # not all the same spectrum
    lengths = torch.full((many,), 12)
    lo, hi = torch.zeros_like(lengths), lengths - 1
    cpu = ops.powerlaw_fit(evals, lengths, lo, hi, 1, False)
    gpu = ops.powerlaw_fit(evals.cuda(), lengths.cuda(), lo.cuda(), hi.cuda(), 1, False)
    assert torch.equal(gpu[2].cpu(), cpu[2])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-12, atol=1e-12, equal_nan=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_xmin_peak_window_cuda_matches_cpu(dtype):
    evals, lengths = _spectra(4, batch=8, dtype=dtype)
    for log_lower_bound in (True, False):
        cpu = ops.xmin_peak_window(evals, lengths, 100, log_lower_bound)
        gpu = ops.xmin_peak_window(evals.cuda(), lengths.cuda(), 100, log_lower_bound)
        assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigvalsh_batched_matches_torch(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 70, 40, generator=g, dtype=torch.float64)
    grams = (w.transpose(1, 2) @ w).to(dtype)
    got = ops.eigvalsh_batched(grams)
    want = torch.linalg.eigvalsh(grams.double())
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.max()))
    assert got.dtype == dtype


def test_opcheck_eigvalsh_batched():
    w = torch.randn(3, 20, 12, dtype=torch.float64)
    torch.library.opcheck(torch.ops.alphalora.eigvalsh_batched.default, (w.transpose(1, 2) @ w,))


@requires_cuda
@pytest.mark.parametrize("streams", ["", "1", "3", "16"])
def test_eigvalsh_batched_cuda_matches_cpu(streams, monkeypatch):
    """The CUDA op solves the batch on several streams (ALPHALORA_EIGH_STREAMS; empty: the default 4,
    1: one after another, more streams than matrices); every matrix lands in its own row."""
    monkeypatch.setenv("ALPHALORA_EIGH_STREAMS", streams)
    w = torch.randn(7, 90, 64, dtype=torch.float64) * torch.arange(1, 8, dtype=torch.float64)[:, None, None]
    grams = w.transpose(1, 2) @ w
    side = torch.cuda.Stream()  # the Grams come from the caller's stream, whichever that is
    with torch.cuda.stream(side):
        got = ops.eigvalsh_batched(grams.cuda())
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got.cpu(), ops.eigvalsh_batched(grams))


@requires_cuda
def test_eigvalsh_batched_cuda_as_the_first_solve_of_a_process():
    """In a fresh process, where ATen has not loaded its CUDA linear-algebra library yet, the op's first call
    (four worker threads at once) still solves: the loading used to race and fail ("lazy wrapper should be
    called at most once")."""
    script = (
        "import torch\n"
        "from alphalora import ops\n"
        "w = torch.randn(8, 40, 30, dtype=torch.float64)\n"
        "grams = w.transpose(1, 2) @ w\n"
        "got = ops.eigvalsh_batched(grams.cuda()).cpu()\n"
        "torch.testing.assert_close(got, torch.linalg.eigvalsh(grams))\n"
    )
    env = {**os.environ, "ALPHALORA_EIGH_STREAMS": "4"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@requires_cuda
def test_eigvalsh_batched_cuda_workers_run_in_the_callers_grad_mode():
    """The worker threads take the caller's thread-local state: under inference_mode (where a fresh
    thread could not write the inference tensor out), and with Grams that require grad under no_grad."""
    w = torch.randn(6, 50, 30, dtype=torch.float64, device="cuda")
    grams = w.transpose(1, 2) @ w
    want = torch.linalg.eigvalsh(grams)
    with torch.inference_mode():
        got = ops.eigvalsh_batched(grams.clone())
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        got = ops.eigvalsh_batched(grams.clone().requires_grad_())
    assert got.grad_fn is None
    torch.testing.assert_close(got, want)


@requires_cuda
def test_eigvalsh_batched_cuda_refuses_a_bad_stream_count(monkeypatch):
    monkeypatch.setenv("ALPHALORA_EIGH_STREAMS", "0")
    grams = torch.eye(8, dtype=torch.float64, device="cuda").expand(2, 8, 8).contiguous()
    with pytest.raises(RuntimeError, match="ALPHALORA_EIGH_STREAMS must be a positive integer"):
        ops.eigvalsh_batched(grams)
