"""An independent NumPy transcription of the original SGD-G / Adam-G steps, in float64.

It follows the original PyTorch ``SGDG.step`` / ``AdamG.step`` (``grassmann=True`` branch) and
their ``gutils`` helpers operation by operation, on the columns of ``W = w.reshape(-1, p)``
(``docs/algorithm.md`` (G1)-(G7), (S1)-(S7), (A1)-(A11), (R2)). It shares no code with the
library, so tests can hold the library to it for any step size, far beyond the five golden
steps. The buffers are those of the originals: the SGD-G buffer ``τ`` holds the learning rate
(``τ = −η b`` for the library's buffer ``b`` in gradient units, at a constant rate).
"""

import numpy as np

EPS = 1e-8


def columns(x):
  x = np.asarray(x, np.float64)
  return x.reshape(-1, x.shape[-1])


def unit(v):
  norm = np.sqrt(np.sum(v * v, axis=0, keepdims=True))
  return v / (norm + EPS), norm


def exp_map(y, h):
  u, theta = unit(h)
  return y * np.cos(theta) + u * np.sin(theta)


def transport_step(y, h):
  u, theta = unit(h)
  return (u * np.cos(theta) - y * np.sin(theta)) * theta


def transport(y, h, t):
  u, theta = unit(h)
  inner = np.sum(u * t, axis=0, keepdims=True)
  return t - inner * (y * np.sin(theta) + u * (1 - np.cos(theta)))


def _riemannian_gradient(w, g, omega, grad_clip):
  y, _ = unit(w)
  if omega:
    g = g + 2 * omega * (y @ (y.T @ y) - y)
  h = g - np.sum(y * g, axis=0, keepdims=True) * y
  if grad_clip is not None:
    norm = np.sqrt(np.sum(h * h, axis=0, keepdims=True))
    h = np.where(norm > grad_clip, h * grad_clip / np.where(norm > 0, norm, 1), h)
  return y, h


def sgdg_step(w, g, tau, lr, *, momentum=0.9, grad_clip=0.1, omega=0.0):
  """One SGD-G step on column matrices; returns ``(w, tau)``."""
  y, h = _riemannian_gradient(w, g, omega, grad_clip)
  d = momentum * tau - lr * h
  return exp_map(y, d), transport_step(y, d)


def adamg_step(w, g, m, v, t, lr, *, b1=0.9, b2=0.99, eps=1e-8, grad_clip=0.1, omega=0.0):
  """One Adam-G step (``t`` = 1, 2, ...); ``v`` has shape ``(1, p)``; returns ``(w, m, v)``."""
  y, h = _riemannian_gradient(w, g, omega, grad_clip)
  m = b1 * m + (1 - b1) * h
  v = b2 * v + (1 - b2) * np.sum(h * h, axis=0, keepdims=True)
  alpha = np.sqrt(1 - b2**t) / (1 - b1**t)
  d = -alpha * lr * m / np.sqrt(v + eps)
  return exp_map(y, d), transport(y, d, m), v


def sgdg_trajectory(w, grads, lr, **hp):
  """Points and buffers ``τ`` after each step, for column matrices."""
  w, tau = columns(w), np.zeros_like(columns(w))
  out = []
  for g in grads:
    w, tau = sgdg_step(w, columns(g), tau, lr, **hp)
    out.append((w, tau))
  return out


def adamg_trajectory(w, grads, lr, **hp):
  """Points, first and second moments after each step, for column matrices."""
  w = columns(w)
  m, v = np.zeros_like(w), np.zeros((1, w.shape[1]))
  out = []
  for t, g in enumerate(grads, start=1):
    w, m, v = adamg_step(w, columns(g), m, v, t, lr, **hp)
    out.append((w, m, v))
  return out
