"""In-memory datasets with deterministic, resumable batching, as in the paper's TF program.

Each dataset is one entry of ``DATASETS`` (a :class:`DatasetInfo`): where it comes from, its
sizes and classes, its preprocessing and the paper's recipe for it; ``--data``, the recipes of
``train/config.py`` and the tests take their lists from there. A dataset is read once into NumPy
arrays (through TensorFlow Datasets, or scikit-learn for the small ``digits`` set); batching,
normalisation and augmentation are done in NumPy. The batch of global step ``s`` is a pure
function of ``(seed, s)``, so a killed run resumes on exactly the batches it would have seen.

Reference: Cho & Lee, "Riemannian approach to batch normalization", NeurIPS 2017,
arXiv:1709.09603 (the TF code's ``cifar10_input.py``, ``svhn_input.py``, ``preprocessing.py``).
"""

import dataclasses
import functools
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

Split = tuple[np.ndarray, np.ndarray]  # (images, labels)


class DatasetNotPreparedError(RuntimeError):
  """The dataset is not in ``data_dir`` and cannot be downloaded now."""


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """Where tensorflow-datasets finds a dataset, and where it would download it from."""

  name: str
  train_splits: tuple[str, ...]
  test_split: str
  download_host: str
  download_port: int
  archives: tuple[str, ...]  # File names tfds accepts from `<data_dir>/downloads/manual`.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Everything the training program knows about one dataset: its one entry in ``DATASETS``.

  Attributes:
    name: the ``--data`` name.
    num_classes: the number of labels, ``0 .. num_classes - 1``.
    image_shape: ``(height, width, channels)``.
    num_train: the training set's size; the training schedule counts its epochs in it, as the TF
      program did. :func:`load_dataset` returns the sizes actually loaded.
    num_test: the test set's size.
    tfds: where tensorflow-datasets keeps it, or None for a dataset that ``load_local`` builds.
    load_local: for a dataset not in tfds: ``() -> ((x_train, y_train), (x_test, y_test))``.
    divide_by: pixels are divided by this number; None: standardised by the training set's
      per-channel mean and std.
    augment: whether training images are reflect-padded, randomly cropped and flipped.
    recipe: the settings of ``python -m train`` that the paper uses for this dataset with every
      optimizer (schedule, dropout, batch sizes); an explicit flag overrides them.
    learning_rates: per ``--optimizer``, the paper's ``learnRate`` (and ``learnRateG``).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_train: int
  num_test: int
  tfds: TfdsSource | None = None
  load_local: Callable[[], tuple[Split, Split]] | None = None
  divide_by: float | None = None
  augment: bool = False
  recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  learning_rates: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)


_DIGITS_TEST_SIZE = 300
_DIGITS_SPLIT_SEED = 0


def _load_digits() -> tuple[Split, Split]:
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  # Pixel values are 0..16; the held-out split is fixed, whatever the training seed.
  images = (digits.images[..., None] / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images,
    labels,
    test_size=_DIGITS_TEST_SIZE,
    stratify=labels,
    random_state=_DIGITS_SPLIT_SEED,
  )
  return (x_train, y_train), (x_test, y_test)


# The paper's schedules (TF cifar10_input.py, svhn_input.py and the README's commands).
_CIFAR_RECIPE = {
  'epochs': 200,
  'decay_epochs': (60, 120, 160),
  'learnRateDecay': 0.2,
  'keep_prob': 0.7,
}
_CIFAR_LEARNING_RATES = {
  'sgd': {'learnRate': 0.1},
  'sgdg': {'learnRate': 0.01, 'learnRateG': 0.2},
  'adamg': {'learnRate': 0.01, 'learnRateG': 0.05},
}

DATASETS = {
  info.name: info
  for info in (
    DatasetInfo(
      'cifar10',
      num_classes=10,
      image_shape=(32, 32, 3),
      num_train=50_000,
      num_test=10_000,
      tfds=TfdsSource(
        'cifar10', ('train',), 'test', 'www.cs.toronto.edu', 443, ('cifar-10-binary.tar.gz',)
      ),
      augment=True,
      recipe=_CIFAR_RECIPE,
      learning_rates=_CIFAR_LEARNING_RATES,
    ),
    DatasetInfo(
      'cifar100',
      num_classes=100,
      image_shape=(32, 32, 3),
      num_train=50_000,
      num_test=10_000,
      tfds=TfdsSource(
        'cifar100', ('train',), 'test', 'www.cs.toronto.edu', 443, ('cifar-100-binary.tar.gz',)
      ),
      augment=True,
      recipe=_CIFAR_RECIPE,
      learning_rates=_CIFAR_LEARNING_RATES,
    ),
    # TF svhn_input.py trains on train + extra (604,388 images), divided by 255, not augmented;
    # tfds labels are already 0..9.
    DatasetInfo(
      'svhn',
      num_classes=10,
      image_shape=(32, 32, 3),
      num_train=604_388,
      num_test=26_032,
      tfds=TfdsSource(
        'svhn_cropped',
        ('train', 'extra'),
        'test',
        'ufldl.stanford.edu',
        80,
        ('train_32x32.mat', 'test_32x32.mat', 'extra_32x32.mat'),
      ),
      divide_by=255.0,
      recipe={'epochs': 160, 'decay_epochs': (60, 120), 'learnRateDecay': 0.1, 'keep_prob': 0.6},
      learning_rates={
        'sgd': {'learnRate': 0.01},
        'sgdg': {'learnRate': 0.001, 'learnRateG': 0.02},
        'adamg': {'learnRate': 0.001, 'learnRateG': 0.005},
      },
    ),
    # Not in the paper: 1,797 8x8 scans shipped with scikit-learn, for runs that need no download;
    # its recipe is tuned to train a WRN-10-4 in about a minute on a CPU.
    DatasetInfo(
      'digits',
      num_classes=10,
      image_shape=(8, 8, 1),
      num_train=1_497,
      num_test=300,
      load_local=_load_digits,
      recipe={
        'epochs': 20,
        'decay_epochs': (10, 16),
        'learnRateDecay': 0.2,
        'keep_prob': None,
        'batch_size': 64,
        'vali_batch_size': 400,
        'vali_freq': 200,
        'depth': 10,
        'widen_factor': 4,
      },
      learning_rates={
        'sgd': {'learnRate': 0.1},
        'sgdg': {'learnRate': 0.05, 'learnRateG': 0.2},
        'adamg': {'learnRate': 0.05, 'learnRateG': 0.05},
      },
    ),
  )
}

_PROBE_TIMEOUT_S = 3.0
_LOAD_CHUNK = 10_000


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  """One split in memory, with how to turn stored pixels into network inputs.

  ``images`` keep their stored dtype (uint8 for the tfds sets, 1.7 GB for SVHN train) and are
  normalised batch by batch: ``(x - mean) / std`` per channel.
  """

  images: np.ndarray
  labels: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  augment: bool = False
  padding_size: int = 4
  crop_size: int = 32

  def __len__(self) -> int:
    return len(self.labels)


def pad_crop_flip(
  images: np.ndarray,
  offsets: np.ndarray,
  flips: np.ndarray,
  *,
  padding_size: int,
  crop_size: int,
) -> np.ndarray:
  """Reflect-pads, crops at ``offsets`` (N, 2) and mirrors where ``flips`` (N,) is true.

  NumPy ``'reflect'`` mirrors without repeating the edge pixel, as the TF code does.
  One gather does the crop and the flip for the whole batch.
  """
  p = padding_size
  padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode='reflect')
  span = np.arange(crop_size)
  rows = offsets[:, 0, None] + span
  cols = offsets[:, 1, None] + np.where(flips[:, None], span[::-1], span)
  batch = np.arange(len(images))[:, None, None]
  return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_augment(
  images: np.ndarray, rng: np.random.Generator, *, padding_size: int, crop_size: int
) -> np.ndarray:
  """Random crop (offsets uniform in {0..H+2p-crop}) and horizontal flip with p=0.5."""
  height, width = images.shape[1:3]
  max_offset = np.array([height, width]) + 2 * padding_size - crop_size
  if np.any(max_offset < 0):
    raise ValueError(
      f'crop_size {crop_size} exceeds the padded image ({height}x{width} + 2*{padding_size})'
    )
  offsets = rng.integers(0, max_offset + 1, size=(len(images), 2))
  flips = rng.random(len(images)) < 0.5
  return pad_crop_flip(images, offsets, flips, padding_size=padding_size, crop_size=crop_size)


def _normalise(ds: ArrayDataset, images: np.ndarray) -> np.ndarray:
  return ((images.astype(np.float32) - ds.mean) / ds.std).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  # Cached because consecutive steps share an epoch; SVHN's permutation has 604,388 entries.
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_indices(num_examples: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of the batch of ``step`` in a stream of concatenated per-epoch permutations.

  Sample ``i = step * batch_size + k`` is at position ``i % n`` of epoch ``i // n``'s
  permutation, so batches straddle epochs as in the TF queue.
  """
  sample = np.arange(step * batch_size, (step + 1) * batch_size)
  epoch, position = np.divmod(sample, num_examples)
  indices = np.empty(batch_size, dtype=np.int64)
  for e in np.unique(epoch):
    where = epoch == e
    indices[where] = _epoch_permutation(seed, int(e), num_examples)[position[where]]
  return indices


def train_batch(
  ds: ArrayDataset, step: int, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """The training batch of global ``step``: a pure function of ``(seed, step)``.

  Returns float32 NHWC images and int32 labels.
  """
  indices = train_indices(len(ds), step, batch_size, seed)
  images = ds.images[indices]
  if ds.augment:
    # A trailing 1 keeps this stream apart from the permutations' [seed, epoch] seeds
    # (SeedSequence treats [seed, step] and [seed, step, 0] alike).
    rng = np.random.default_rng([seed, step, 1])
    images = random_augment(
      rng=rng, images=images, padding_size=ds.padding_size, crop_size=ds.crop_size
    )
  return _normalise(ds, images), ds.labels[indices]


def eval_batches(
  ds: ArrayDataset, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Each example once, in order, as ``(images, labels, mask)`` batches of one fixed shape.

  The last batch is padded with zero images; ``mask`` (float32) is 0 there, so one compiled
  eval step serves every batch.
  """
  for start in range(0, len(ds), batch_size):
    images = _normalise(ds, ds.images[start : start + batch_size])
    labels = ds.labels[start : start + batch_size]
    mask = np.ones(batch_size, np.float32)
    pad = batch_size - len(labels)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      mask[-pad:] = 0.0
    yield images, labels, mask


def _host_reachable(host: str, port: int, timeout: float = _PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to ``host`` opens within ``timeout`` seconds, DNS included.

  The socket timeout does not bound name resolution, so the probe runs in a daemon thread
  that is abandoned when ``timeout`` expires.
  """
  reachable = []

  def probe():
    try:
      with socket.create_connection((host, port), timeout=timeout):
        reachable.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(reachable)


def _not_prepared_message(source: TfdsSource, data_dir: str, reason: str) -> str:
  return (
    f'Dataset {source.name!r} is not prepared in {data_dir} and {reason}. To prepare it, either\n'
    f'  - run `tfds build {source.name} --data_dir={data_dir}` on a machine with network access\n'
    f'    (then copy {data_dir}/{source.name} here if that was another machine), or\n'
    f'  - put the original {", ".join(source.archives)} into {data_dir}/downloads/manual\n'
    '    and run again (no network needed), or\n'
    '  - pass --data_dir pointing at a directory that already holds a prepared copy.'
  )


def _bad_archive_message(checksum_error: str, manual_dir: str) -> str:
  """Names the archive that tfds found damaged (from its message) and how to fetch it again."""
  found = re.search(r'Artifact (\S+), downloaded to (.+?), has wrong checksum', checksum_error)
  url, path = found.groups() if found else ('its source', f'an archive in {manual_dir}')
  sizes = re.search(
    r'Expected: UrlInfo\(size=([^,]+),.*Got: UrlInfo\(size=([^,]+),', checksum_error, re.S
  )
  size = f' ({sizes.group(2)}; the original is {sizes.group(1)})' if sizes else ''
  return (
    f'the manually downloaded archive {path}{size} is incomplete or damaged: it does not match '
    f'the checksum that tensorflow_datasets expects. Delete it and download it again from {url}, '
    'then run again'
  )


def _ensure_prepared(builder, source: TfdsSource, download: bool) -> None:
  """Prepares the dataset if possible, failing within seconds when it is not.

  Left alone, tfds retries an unreachable host for minutes before it gives up.
  """
  if builder.is_prepared():
    return
  import tensorflow_datasets as tfds

  manual_dir = os.path.join(builder.data_dir_root, 'downloads', 'manual')
  if all(os.path.exists(os.path.join(manual_dir, name)) for name in source.archives):
    # tfds checksums and uses these files; skipping its GCS lookup keeps this offline.
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    config = tfds.download.DownloadConfig(try_download_gcs=False)
    try:
      builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as error:
      raise DatasetNotPreparedError(_bad_archive_message(str(error), manual_dir)) from None
    return
  data_dir = str(builder.data_dir_root)
  if not download:
    raise DatasetNotPreparedError(_not_prepared_message(source, data_dir, 'download=False'))
  if not _host_reachable(source.download_host, source.download_port):
    reason = f'{source.download_host} cannot be reached (no network?)'
    raise DatasetNotPreparedError(_not_prepared_message(source, data_dir, reason))
  builder.download_and_prepare()


def _read_split(builder, split: str) -> Split:
  # Chunked rather than batch_size=-1, which under tfds.testing.mock_data (no split sizes known)
  # asks for a batch of sys.maxsize examples and aborts the process.
  import tensorflow_datasets as tfds

  ds = builder.as_dataset(split=split, batch_size=_LOAD_CHUNK, as_supervised=True)
  chunks = list(tfds.as_numpy(ds))
  images = np.concatenate([images for images, _ in chunks])
  labels = np.concatenate([labels for _, labels in chunks]).astype(np.int32)
  return images, labels


def _load_tfds(source: TfdsSource, data_dir: str | None, download: bool) -> tuple[Split, Split]:
  # Imported here so that the digits path never starts TensorFlow.
  import tensorflow_datasets as tfds

  builder = tfds.builder(source.name, data_dir=data_dir)
  _ensure_prepared(builder, source, download)
  train_parts = [_read_split(builder, split) for split in source.train_splits]
  train = tuple(np.concatenate(arrays) for arrays in zip(*train_parts, strict=True))
  return train, _read_split(builder, source.test_split)


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  # Accumulated in float64 over (N, H, W): SVHN-sized uint8 arrays would overflow float32 sums.
  mean = images.mean(axis=(0, 1, 2), dtype=np.float64)
  std = images.std(axis=(0, 1, 2), dtype=np.float64)
  return mean.astype(np.float32), std.astype(np.float32)


def load_dataset(
  name: str,
  *,
  data_dir: str | None = None,
  download: bool = True,
  padding_size: int = 4,
  crop_size: int = 32,
) -> tuple[ArrayDataset, ArrayDataset, DatasetInfo]:
  """Loads ``name`` into memory as ``(train, test, info)``, as its entry in ``DATASETS`` says.

  Pixels are divided by the entry's ``divide_by`` (SVHN: 255), or else standardised with the
  training set's per-channel mean and std (CIFAR; digits after its division by 16). Where the
  entry says ``augment`` (CIFAR), training images are reflect-padded by ``padding_size``, randomly
  cropped to ``crop_size`` and flipped. ``info`` carries the sizes actually loaded.

  Raises:
    ValueError: for an unknown ``name``.
    DatasetNotPreparedError: if a tfds dataset is not in ``data_dir`` and either ``download`` is
      false or its download host does not answer within a few seconds.
  """
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; valid names: {", ".join(DATASETS)}')
  info = DATASETS[name]
  if info.tfds is not None:
    (x_train, y_train), (x_test, y_test) = _load_tfds(info.tfds, data_dir, download)
  else:
    (x_train, y_train), (x_test, y_test) = info.load_local()

  if info.divide_by is not None:
    channels = x_train.shape[-1]
    mean, std = np.zeros(channels, np.float32), np.full(channels, info.divide_by, np.float32)
  else:
    mean, std = _channel_stats(x_train)
  train = ArrayDataset(x_train, y_train, mean, std, info.augment, padding_size, crop_size)
  test = ArrayDataset(x_test, y_test, mean, std)
  return train, test, dataclasses.replace(info, num_train=len(train), num_test=len(test))
