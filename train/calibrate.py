"""Temperature scaling (Guo et al., 2017): one scalar ``T`` so that ``softmax(z / T)`` is calibrated.

The temperature is fitted on held-out logits by minimising the negative log-likelihood
over ``log T`` (which keeps ``T`` positive without a constraint) and is stored in the
model artefact; serving divides the logits by it before the softmax.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

#: Fitted temperatures are clamped to this range; values outside it mean the
#: validation set is degenerate (separable, or logits unrelated to the labels).
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def _to_numpy(values: ArrayLike | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _check(logits: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    z = _to_numpy(logits).astype(np.float64)
    t = _to_numpy(y)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"logits must be (n > 0, classes >= 2), got shape {z.shape}")
    if t.shape != (z.shape[0],):
        raise ValueError(f"y must have shape ({z.shape[0]},), got {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"y must hold integer class indices, got dtype {t.dtype}")
    if t.min() < 0 or t.max() >= z.shape[1]:
        raise ValueError(f"class indices must lie in [0, {z.shape[1]}), got [{t.min()}, {t.max()}]")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")
    return z, t.astype(np.int64)


def softmax_np(logits: ArrayLike | torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax over the last axis of ``logits / temperature``.

    Parameters
    ----------
    logits
        Array of raw scores, classes on the last axis (a tensor is moved to the CPU).
    temperature
        Positive divisor applied before the softmax.

    Returns
    -------
    numpy.ndarray
        ``float64`` probabilities of the same shape, summing to 1 on the last axis.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = _to_numpy(logits).astype(np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(
    logits: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor, temperature: float = 1.0
) -> float:
    """Mean negative log-likelihood of the true classes under ``softmax(logits / temperature)``.

    Parameters
    ----------
    logits
        ``(n, classes)`` raw scores.
    y
        ``(n,)`` integer class indices.
    temperature
        Positive divisor applied before the softmax.

    Returns
    -------
    float
        Mean NLL in nats.
    """
    z, t = _check(logits, y)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = z / float(temperature)
    peak = z.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(z - peak).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(z.shape[0]), t]))


def fit_temperature(logits: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Fit the temperature that minimises the NLL of held-out logits.

    Parameters
    ----------
    logits
        ``(n, classes)`` raw scores of a validation set (numpy or torch, any device).
    y
        ``(n,)`` integer class indices.

    Returns
    -------
    float
        The temperature, clamped to ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``. The NLL is
        convex in ``1/T``, so it has a single minimum along ``log T`` and clamping gives
        the constrained optimum.
    """
    z_np, t_np = _check(logits, y)
    z = torch.from_numpy(z_np)
    t = torch.from_numpy(t_np)
    # Clamping inside the objective bounds the search: outside [lo, hi] the gradient is
    # zero and L-BFGS stops, instead of chasing T -> 0 on separable data into NaN.
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(z / log_t.clamp(lo, hi).exp(), t)
        loss.backward()
        return loss

    # The caller may be inside torch.no_grad() (an evaluation loop); the fit needs autograd.
    with torch.enable_grad():
        optimiser.step(closure)
    raw = float(log_t.detach().item())
    if not math.isfinite(raw):
        logger.warning("temperature fit diverged; using T=1")
        return 1.0
    if not lo < raw < hi:
        logger.warning(
            "fitted temperature %.4g clamped to [%g, %g]",
            math.exp(min(raw, 700.0)),
            MIN_TEMPERATURE,
            MAX_TEMPERATURE,
        )
    return float(np.clip(math.exp(min(max(raw, lo), hi)), MIN_TEMPERATURE, MAX_TEMPERATURE))
