# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. The paper's comparison at laptop scale
#
# The paper (Table 1 of Cho & Lee, *Riemannian approach to batch normalization*, NeurIPS 2017,
# [arXiv:1709.09603](https://arxiv.org/abs/1709.09603)) trains Wide-ResNets and VGG on
# CIFAR-10/100 and SVHN with SGD, SGD-G and Adam-G and reports the **median test error of five
# runs**. This notebook repeats the protocol on scikit-learn's bundled digits (1,497 training and
# 300 test 8×8 scans, no download), with the project's training program `train/`
# (`docs/training.md`) and the recipes it ships for `digits` (`python -m train --help` lists them):
#
# | | learnRate (η) | learnRateG (η_G) | ω | ν | weight decay |
# | --- | --- | --- | --- | --- | --- |
# | SGD | 0.1 | – | – | – | 5e-4 on everything |
# | SGD-G | 0.05 | 0.2 | 0.1 | 0.1 | 5e-4 on Euclidean kernels |
# | Adam-G | 0.05 | 0.05 | 0.1 | 0.1 | 5e-4 on Euclidean kernels |
#
# Batch 64, Nesterov momentum 0.9 on the Euclidean parameters, both learning rates multiplied by
# 0.2 twice, here after 8 and 12 of 16 epochs (374 steps; the shipped digits recipe runs 20 epochs
# with decays after 10 and 16), no data augmentation. Models: a WRN-10-1 (widths 16, 32, 64) and a
# VGG-11 at an eighth of the paper's width (`width_scale=0.125`: 8, 16, 32, 64, 64 channels), so
# that all 30 runs take a few minutes on a 2-core CPU. The manifold kernels are those of the
# paper's rule ((L1) in `docs/algorithm.md`, the project's write-up of the algorithm).
#
# Each run is one call of `train.train.train_and_evaluate(config)`; the learning curves and the
# orthogonality penalty come from the `metrics.jsonl` it writes into its run directory.

# %%
import contextlib
import io
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import grassmann_optax as go
from train import checkpoints
from train import config as config_lib
from train import train as train_lib

import common

# Quick mode: one seed, 12 steps per run.
SEEDS = range(1) if common.QUICK else range(5)
SCHEDULE = dict(epochs=16, decay_epochs=(8, 12), max_steps=12 if common.QUICK else None)
MODELS = {
  'WRN-10-1': dict(model='resnet', depth=10, widen_factor=1),
  'VGG-11 (1/8 width)': dict(model='vgg11', width_scale=0.125),
}
OPTIMIZERS = {'SGD': 'sgd', 'SGD-G': 'sgdg', 'Adam-G': 'adamg'}
common.describe(seeds=list(SEEDS))


# %%
def run(workdir, model, optimizer, seed):
  config = config_lib.get_config(
    data='digits',
    optimizer=OPTIMIZERS[optimizer],
    seed=seed,
    train_path=str(Path(workdir) / re.sub(r'\W+', '_', f'{model} {optimizer} {seed}')),
    report_freq=5,
    vali_freq=10,
    save_freq=10**9,  # a checkpoint at the end only
    verbose=False,
    **MODELS[model],
    **SCHEDULE,
  )
  with contextlib.redirect_stdout(io.StringIO()):  # the program's final line, once per run
    result = train_lib.train_and_evaluate(config)
  with open(Path(result['train_dir']) / 'metrics.jsonl') as f:
    result['metrics'] = [json.loads(line) for line in f]
  return result


workdir = tempfile.mkdtemp(prefix='grassmann_study_')
runs = {}
started = time.perf_counter()
for model in MODELS:
  for optimizer in OPTIMIZERS:
    for seed in SEEDS:
      runs[model, optimizer, seed] = run(workdir, model, optimizer, seed)
    errors = [100 * runs[model, optimizer, s]['test_error'] for s in SEEDS]
    print(
      f'{model:<19} {optimizer:<7} test error (%) per seed: '
      + ' '.join(f'{e:5.2f}' for e in errors)
    )
wall_time = time.perf_counter() - started
steps = runs[next(iter(runs))]['steps']
print(f'\n{len(runs)} runs of {steps} steps in {wall_time:.0f} s')

# %% [markdown]
# ## Median test error
#
# Rows: model; columns: optimizer; median over the seeds of the test error (%) at the end of
# training, as in the paper's Table 1.


# %% tags=["table"]
def median_error(model, optimizer):
  return float(np.median([100 * runs[model, optimizer, s]['test_error'] for s in SEEDS]))


lines = [
  '| model | ' + ' | '.join(OPTIMIZERS) + ' |',
  '| --- |' + ' ---: |' * len(OPTIMIZERS),
]
for model in MODELS:
  cells = ' | '.join(f'{median_error(model, optimizer):.2f}' for optimizer in OPTIMIZERS)
  lines.append(f'| {model} | {cells} |')
table = '\n'.join(lines)
caption = (
  f'Median test error (%) over {len(SEEDS)} seed(s) on digits (300 test images), '
  f'{steps} steps of batch 64; {len(runs)} runs in {wall_time:.0f} s on '
  f'{jax.device_count()} {jax.devices()[0].platform} device(s).'
)
print(table)
print()
print(caption)
common.save('03_table.md', table + '\n\n' + caption + '\n')

# %% [markdown]
# One test error step is 1/300 = 0.33%, so medians within a point of each other are ties.
#
# ## Learning curves
#
# Median over seeds (line) and range (band) of the training loss, logged every 5 steps as the
# mean over those steps, and of the test error, measured every 10 steps with BatchNorm population
# statistics. The dotted lines mark the two learning-rate decays.


# %%
def curve(model, optimizer, split, key):
  per_seed = []
  for seed in SEEDS:
    rows = [m for m in runs[model, optimizer, seed]['metrics'] if m['split'] == split]
    per_seed.append([(m['step'], m[key]) for m in rows if key in m])
  steps_logged = np.array([step for step, _ in per_seed[0]])
  values = np.array([[value for _, value in seed_rows] for seed_rows in per_seed])
  return steps_logged, values


def decay_steps():
  return train_lib.decay_steps(SCHEDULE['decay_epochs'], 1497, 64)


colors = dict(zip(OPTIMIZERS, ('tab:gray', 'tab:blue', 'tab:red'), strict=True))
fig, axes = plt.subplots(2, len(MODELS), figsize=(11, 7), sharex=True)
for column, model in enumerate(MODELS):
  for row, (split, key, label) in enumerate(
    [('train', 'loss', 'training loss'), ('test', 'error', 'test error (%)')]
  ):
    ax = axes[row, column]
    for optimizer in OPTIMIZERS:
      steps_logged, values = curve(model, optimizer, split, key)
      values = 100 * values if key == 'error' else values
      ax.plot(steps_logged, np.median(values, 0), color=colors[optimizer], label=optimizer)
      band = (values.min(0), values.max(0))
      ax.fill_between(steps_logged, *band, color=colors[optimizer], alpha=0.2)
    for step in decay_steps():
      ax.axvline(step, color='0.5', linestyle=':', linewidth=1)
    ax.set(yscale='log', ylabel=label)
    ax.grid(alpha=0.3)
  axes[0, column].set_title(model)
  axes[1, column].set_xlabel('step')
axes[0, 0].legend()
fig.suptitle(f'digits, median and range over {len(SEEDS)} seed(s)')
fig.tight_layout()
common.save('03_learning_curves.png', fig)
plt.show()

# %% [markdown]
# ## The orthogonality penalty
#
# SGD-G and Adam-G add the gradient of `L_O = Σ_W ω/2·‖WᵀW − I‖²_F` ((R1), (R2); ω = 0.1) on the
# manifold kernels, and the training program logs `L_O` of the parameters at every report step
# (`go.orthogonality_penalty`; every 5 steps here). SGD has no such term; for comparison we take
# its final checkpoint (`train.checkpoints.load`), scale each column of the same kernels to unit
# norm (which changes nothing in the network, notebook 1) and evaluate the same penalty, at
# initialisation and at the end.


# %% tags=["orthogonality"]
def sgd_params(model, seed, *, at_end):
  if at_end:
    return checkpoints.load(runs[model, 'SGD', seed]['train_dir'])[1]['params']
  # A fresh initialisation of the same network, as the training program makes it.
  config = config_lib.get_config(data='digits', optimizer='sgd', seed=seed, **MODELS[model])
  net, shape = train_lib.create_model(config, num_classes=10), (1, 8, 8, 1)
  labels = train_lib.parameter_labels(config, train_lib.parameter_shapes(net, shape))
  tx = train_lib.create_optimizer(config, train_lib.create_learning_rate_fns(config, 1497), labels)
  init_rng, _ = jax.random.split(jax.random.key(seed))  # the split of train_and_evaluate
  return train_lib.create_train_state(init_rng, net, shape, labels, tx).params


def sgd_penalty(model, seed, *, at_end):
  params = sgd_params(model, seed, at_end=at_end)
  labels = go.grassmann_labels(params)
  unit = jax.tree.map(
    lambda w, label: (
      w / jnp.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0) if label == go.GRASSMANN else w
    ),
    params,
    labels,
  )
  return float(go.orthogonality_penalty(unit, labels, 0.1))


fig, axes = plt.subplots(1, len(MODELS), figsize=(11, 3.8))
for ax, model in zip(axes, MODELS, strict=True):
  for optimizer in ('SGD-G', 'Adam-G'):
    steps_logged, values = curve(model, optimizer, 'train', 'orthogonality')
    ax.plot(steps_logged, np.median(values, 0), color=colors[optimizer], label=optimizer)
    ax.fill_between(steps_logged, values.min(0), values.max(0), color=colors[optimizer], alpha=0.2)
  start = np.median([sgd_penalty(model, s, at_end=False) for s in SEEDS])
  end = np.median([sgd_penalty(model, s, at_end=True) for s in SEEDS])
  ax.axhline(end, color=colors['SGD'], linestyle='--', label='SGD at the end (unit columns)')
  ax.axhline(start, color=colors['SGD'], linestyle=':', label='SGD at step 0 (unit columns)')
  g_end = {
    o: float(np.median(curve(model, o, 'train', 'orthogonality')[1][:, -1]))
    for o in ('SGD-G', 'Adam-G')
  }
  print(
    f'{model:<19} orthogonality penalty: SGD {start:.3f} -> {end:.3f}; '
    + '; '.join(f'{o} at the end {v:.1e}' for o, v in g_end.items())
  )
  for step in decay_steps():
    ax.axvline(step, color='0.5', linestyle=':', linewidth=1)
  ax.set(yscale='log', xlabel='step', ylabel='ω/2 ‖WᵀW − I‖² (ω = 0.1)', title=model)
  ax.grid(alpha=0.3)
axes[0].legend(fontsize=9, loc='lower left')
fig.tight_layout()
common.save('03_orthogonality.png', fig)
plt.show()

# %% [markdown]
# ## Reading the results
#
# (About the committed full run; the test suite's quick run trains 12 steps per run.)
#
# * **Test error.** Every run ends at 0.7-3.3% test error, the medians at 0.7-3.0%. On the WRN
#   both Riemannian optimizers' medians are below SGD's (SGD-G 0.67%, Adam-G 1.00%, SGD 1.33%),
#   the direction of the paper's Table 1; on the VGG, Adam-G's is below SGD's (2.33% against
#   2.67%) and SGD-G's above it (3.00%). These differences are one or two test images, within the
#   spread over seeds printed above. An earlier execution of this notebook (2026-11-30, the same
#   seeds on an older version of the library and the training program) ranked the VGG's
#   optimizers otherwise, SGD-G first (1.33%) and SGD and Adam-G tied (2.33%): at this scale the
#   study reproduces the protocol and the magnitudes, not a ranking. The protocol runs at the
#   paper's scale with `python -m train --data=cifar10 ...` (the recipes of `docs/training.md`).
# * **Orthogonality.** Here the optimizers differ by orders of magnitude. Under SGD-G and Adam-G
#   the penalty `ω/2‖WᵀW − I‖²` falls from 0.3-2 at the first report to about 1e-3 (VGG) and a
#   few 1e-6 (WRN): the output units of each layer become nearly orthogonal directions. SGD has
#   no such term, and its normalised kernels become *more* correlated during training than they
#   were at initialisation (WRN 1.7 → 2.1, VGG 2.7 → 9.1).
# * **Population statistics need time.** The test error is measured with BatchNorm's population
#   statistics, an exponential average with momentum 0.99 (a memory of ~100 steps). With half as
#   many steps, SGD's VGG errors measured that way were several times its errors with batch
#   statistics, because the averages had not caught up with weights still changing; 16 epochs
#   leave them time. Short schedules should be checked for this before comparing optimizers.

# %%
shutil.rmtree(workdir)  # run directories: checkpoints, TensorBoard events, metrics.jsonl
