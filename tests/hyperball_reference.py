"""AdamH and MuonH in NumPy float64, written from the published step (Wen et al. 2025).

For a matrix ``W`` with base update ``u`` and rate ``η``:
``W' = Norm(W − η‖W‖·u/max(‖u‖, 1e-10))·‖W‖``, Frobenius norms, per matrix (per slice of the
leading axis for a stacked leaf). AdamH's ``u``: bias-corrected Adam, ε outside the square root.
MuonH's ``u``: Nesterov momentum ``b ← μb + g``, ``u = μb + g``, orthogonalised by five
Newton–Schulz iterations (3.4445, −4.7750, 2.0315; ``X/(‖X‖ + 1e-8)`` first; on the transpose of
a matrix with more rows than columns). Nothing here is taken from the library.
"""

import numpy as np

NS = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = NS
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def hyperball(w: np.ndarray, u: np.ndarray, lr: float) -> np.ndarray:
  """The published step of one matrix."""
  radius = np.linalg.norm(w)
  moved = w - lr * radius * u / max(np.linalg.norm(u), 1e-10)
  return moved / np.linalg.norm(moved) * radius


def _per_matrix(fn, *arrays):
  """``fn`` on each matrix: the array itself, or each slice of the leading axis."""
  if arrays[0].ndim == 2:
    return fn(*arrays)
  return np.stack([fn(*slices) for slices in zip(*arrays, strict=True)])


def adamh(w, grads, lr, b1=0.9, b2=0.95, eps=1e-8):
  """The points after each step of AdamH from ``w`` with ``grads``."""
  w = np.asarray(w, np.float64)
  m, v, out = np.zeros_like(w), np.zeros_like(w), []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    w = _per_matrix(lambda w, u: hyperball(w, u, lr), w, u)
    out.append(w)
  return out


def muonh(w, grads, lr, momentum=0.95, nesterov=True, ns_steps=5):
  """The points after each step of MuonH from ``w`` with ``grads``."""
  w = np.asarray(w, np.float64)
  b, out = np.zeros_like(w), []
  for g in grads:
    g = np.asarray(g, np.float64)
    b = momentum * b + g
    u = momentum * b + g if nesterov else b
    u = _per_matrix(lambda u: newton_schulz(u, ns_steps), u)
    w = _per_matrix(lambda w, u: hyperball(w, u, lr), w, u)
    out.append(w)
  return out
