"""Tests for train/input_pipeline.py: loading, determinism, augmentation, eval padding, offline."""

import dataclasses
import socket
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.train_helpers import prepared_tfds
from train import input_pipeline as ip


@pytest.fixture(scope='module')
def digits():
  return ip.load_dataset('digits')


def _toy_dataset(n, augment=False, image_shape=(4, 4, 1)):
  """Image i is filled with the value i, so a batch's images tell which samples it holds."""
  images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, *image_shape))
  return ip.ArrayDataset(
    images=np.ascontiguousarray(images),
    labels=np.arange(n, dtype=np.int32),
    mean=np.zeros(image_shape[-1], np.float32),
    std=np.ones(image_shape[-1], np.float32),
    augment=augment,
  )


# Each dataset's facts, written out from its source rather than read from the code: a dataset
# added to ip.DATASETS gets its entry here. `tfds`: its tfds name and training splits.
_CIFAR = dict(image_shape=(32, 32, 3), num_train=50_000, num_test=10_000, augment=True)
DATASET_FACTS = {
  'cifar10': dict(_CIFAR, num_classes=10, tfds=('cifar10', ('train',)), divide_by=None),
  'cifar100': dict(_CIFAR, num_classes=100, tfds=('cifar100', ('train',)), divide_by=None),
  'svhn': dict(
    num_classes=10,
    image_shape=(32, 32, 3),
    num_train=73_257 + 531_131,
    num_test=26_032,
    tfds=('svhn_cropped', ('train', 'extra')),
    divide_by=255,
    augment=False,
  ),
  'digits': dict(
    num_classes=10,
    image_shape=(8, 8, 1),
    num_train=1_797 - 300,
    num_test=300,
    tfds=None,
    divide_by=None,
    augment=False,
  ),
}
TFDS_DATASETS = [name for name, info in ip.DATASETS.items() if info.tfds is not None]


def test_every_dataset_is_registered_with_its_facts():
  assert list(ip.DATASETS) == list(DATASET_FACTS)
  for name, info in ip.DATASETS.items():
    registered = {key: getattr(info, key) for key in DATASET_FACTS[name]}
    registered['tfds'] = (info.tfds.name, info.tfds.train_splits) if info.tfds else None
    assert info.name == name and registered == DATASET_FACTS[name], name
    assert (info.tfds is None) != (info.load_local is None), f'{name}: one source, tfds or local'


def test_every_dataset_has_a_recipe_for_every_optimizer():
  from train import config

  for name, info in ip.DATASETS.items():
    assert set(info.learning_rates) == set(config.OPTIMIZERS), name
    settings = {*info.recipe, *(key for rates in info.learning_rates.values() for key in rates)}
    assert settings <= set(config.FIELDS), f'{name}: {sorted(settings - set(config.FIELDS))}'
    assert all('learnRate' in rates for rates in info.learning_rates.values()), name


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match=', '.join(DATASET_FACTS)):
    ip.load_dataset('mnist')


def test_digits_split_and_normalisation(digits):
  train, test, info = digits
  assert train.images.shape == (1497, 8, 8, 1) and test.images.shape == (300, 8, 8, 1)
  assert (info.num_train, info.num_test, info.num_classes, info.image_shape) == (
    1497,
    300,
    10,
    (8, 8, 1),
  )
  assert train.labels.dtype == np.int32 and set(np.unique(test.labels)) == set(range(10))
  assert not train.augment and not test.augment
  # Held out: the 1,797 scans are all distinct, and none is in both splits.
  train_rows = {row.tobytes() for row in train.images.reshape(len(train), -1)}
  test_rows = {row.tobytes() for row in test.images.reshape(len(test), -1)}
  assert len(train_rows) == 1497 and len(test_rows) == 300 and not train_rows & test_rows
  assert train.images.max() <= 1.0  # Divided by 16.
  x = ip._normalise(train, train.images)
  np.testing.assert_allclose(x.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(), 1.0, atol=1e-5)
  # The split is fixed: a second load gives the same test set.
  np.testing.assert_array_equal(ip.load_dataset('digits')[1].labels, test.labels)


def test_train_batch_is_pure_function_of_seed_and_step(digits):
  train = digits[0]
  straight = [ip.train_batch(train, step, 32, seed=7) for step in range(5)]
  again = ip.train_batch(train, 3, 32, seed=7)  # as a resumed run computes it
  np.testing.assert_array_equal(again[0], straight[3][0])
  np.testing.assert_array_equal(again[1], straight[3][1])
  assert again[0].dtype == np.float32 and again[0].shape == (32, 8, 8, 1)
  assert again[1].dtype == np.int32
  other_seed = ip.train_batch(train, 3, 32, seed=8)
  assert not np.array_equal(other_seed[1], again[1])


def test_batches_straddle_epochs_and_each_epoch_is_a_permutation():
  n, batch_size = 10, 4
  ds = _toy_dataset(n)
  batches = [ip.train_batch(ds, step, batch_size, seed=3) for step in range(5)]
  stream = np.concatenate([labels for _, labels in batches])
  # 20 samples = exactly two epochs; batch 2 holds the last 2 of epoch 0 and the first 2 of 1.
  for epoch in range(2):
    np.testing.assert_array_equal(np.sort(stream[epoch * n : (epoch + 1) * n]), np.arange(n))
  np.testing.assert_array_equal(stream[:n], np.random.default_rng([3, 0]).permutation(n))
  np.testing.assert_array_equal(stream[n:], np.random.default_rng([3, 1]).permutation(n))
  assert not np.array_equal(stream[:n], stream[n:])
  # Images follow their labels.
  np.testing.assert_array_equal(batches[2][0][:, 0, 0, 0], batches[2][1].astype(np.float32))


def test_reflect_pad_crop_flip():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  kwargs = {'padding_size': 4, 'crop_size': 32}
  centred = ip.pad_crop_flip(images, np.full((3, 2), 4), np.zeros(3, bool), **kwargs)
  np.testing.assert_array_equal(centred, images)
  flipped = ip.pad_crop_flip(images, np.full((3, 2), 4), np.ones(3, bool), **kwargs)
  np.testing.assert_array_equal(flipped, images[:, :, ::-1])
  # Offset (0, 0): the top-left 4 pixels are the mirror without the edge pixel ('reflect').
  corner = ip.pad_crop_flip(images, np.zeros((3, 2), int), np.zeros(3, bool), **kwargs)
  np.testing.assert_array_equal(corner[:, 4:, 4:], images[:, :28, :28])
  np.testing.assert_array_equal(corner[:, 4, :4], images[:, 0, 4:0:-1])
  np.testing.assert_array_equal(corner[:, :4, 4], images[:, 4:0:-1, 0])
  # Smaller crops and per-sample offsets.
  mixed = ip.pad_crop_flip(
    images,
    np.array([[0, 8], [8, 0], [6, 5]]),
    np.array([0, 1, 0], bool),
    padding_size=4,
    crop_size=24,
  )
  assert mixed.shape == (3, 24, 24, 3) and mixed.dtype == np.uint8
  # Offsets count in padded coordinates: (6, 5) starts at row 2, column 1 of the original.
  np.testing.assert_array_equal(mixed[2], images[2, 2:26, 1:25])

  augmented = ip.random_augment(images, np.random.default_rng(1), **kwargs)
  assert augmented.shape == images.shape and augmented.dtype == images.dtype


def test_random_augment_offsets_and_flips_are_uniform():
  n = 4000
  # A 1x1 crop of a 9x9 image holding 9*row + col reveals the offsets: uniform over {0..8}^2.
  grid = np.arange(81).reshape(1, 9, 9, 1).repeat(n, axis=0)
  out = ip.random_augment(grid, np.random.default_rng(0), padding_size=0, crop_size=1)
  rows, cols = np.divmod(out.ravel(), 9)
  for offsets in (rows, cols):
    counts = np.bincount(offsets, minlength=9)
    assert len(counts) == 9 and counts.min() > 350  # About 444 each.
  # A full crop of [0, 1] starts with 1 exactly when it was flipped: p = 0.5.
  pair = np.array([[0, 1], [0, 1]]).reshape(1, 2, 2, 1).repeat(n, axis=0)
  flipped = ip.random_augment(pair, np.random.default_rng(1), padding_size=0, crop_size=2)
  assert 0.45 < flipped[:, 0, 0, 0].mean() < 0.55
  with pytest.raises(ValueError, match='crop_size 3'):
    ip.random_augment(pair, np.random.default_rng(1), padding_size=0, crop_size=3)


def test_augmentation_only_where_enabled():
  ramp = np.broadcast_to(np.arange(32, dtype=np.float32)[None, None, :, None], (8, 32, 32, 3))
  ramp_ds = ip.ArrayDataset(
    images=np.ascontiguousarray(ramp),
    labels=np.arange(8, dtype=np.int32),
    mean=np.zeros(3, np.float32),
    std=np.ones(3, np.float32),
    augment=True,
  )
  augmented = ip.train_batch(ramp_ds, 0, 8, seed=0)[0]
  np.testing.assert_array_equal(augmented, ip.train_batch(ramp_ds, 0, 8, seed=0)[0])
  assert not np.array_equal(augmented, ramp)
  assert not np.array_equal(augmented, ip.train_batch(ramp_ds, 1, 8, seed=0)[0])
  plain_ds = dataclasses.replace(ramp_ds, augment=False)
  np.testing.assert_array_equal(ip.train_batch(plain_ds, 0, 8, seed=0)[0], ramp)


@pytest.mark.parametrize('batch_size', [7, 10, 32])
def test_eval_batches_cover_each_example_once(batch_size):
  ds = _toy_dataset(23)
  batches = list(ip.eval_batches(ds, batch_size))
  assert len(batches) == -(-23 // batch_size)
  assert {b[0].shape for b in batches} == {(batch_size, 4, 4, 1)}
  labels = np.concatenate([b[1] for b in batches])
  mask = np.concatenate([b[2] for b in batches])
  assert mask.dtype == np.float32 and mask.sum() == 23
  np.testing.assert_array_equal(mask, np.arange(len(mask)) < 23)
  np.testing.assert_array_equal(labels[mask == 1], np.arange(23))
  images = np.concatenate([b[0] for b in batches])
  np.testing.assert_array_equal(images[mask == 1, 0, 0, 0], np.arange(23))


@pytest.mark.parametrize('name', TFDS_DATASETS)
def test_tfds_datasets_load_under_mock(name, tmp_path, monkeypatch):
  facts = DATASET_FACTS[name]
  num_classes, image_shape = facts['num_classes'], facts['image_shape']
  tfds_name, train_splits = facts['tfds']
  monkeypatch.setattr(ip, '_host_reachable', lambda host, port: pytest.fail('probed network'))
  with prepared_tfds(tmp_path, tfds_name, num_examples=12):
    train, test, info = ip.load_dataset(name, data_dir=str(tmp_path), download=False)
  # Every training split is loaded (SVHN's is train + extra: twice the mocked split size).
  num_train = 12 * len(train_splits)
  assert train.images.shape == (num_train, *image_shape)
  assert test.images.shape == (12, *image_shape)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  for split in (train, test):
    assert 0 <= split.labels.min() and split.labels.max() < num_classes
  assert (info.num_train, info.num_test, info.num_classes) == (num_train, 12, num_classes)
  assert train.augment == facts['augment'] and not test.augment
  if facts['divide_by'] is not None:
    np.testing.assert_array_equal(train.mean, 0.0)
    np.testing.assert_array_equal(train.std, facts['divide_by'])
  else:
    np.testing.assert_allclose(train.mean, train.images.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(train.std, train.images.std(axis=(0, 1, 2)), rtol=1e-5)
  images, labels = ip.train_batch(train, 0, 8, seed=0)
  assert images.shape == (8, *image_shape) and images.dtype == np.float32
  assert labels.shape == (8,)


def _write_cifar10_binaries(directory, rng):
  """Fake CIFAR-10 binary batches (1 label byte + 3072 CHW pixel bytes per record)."""
  folder = directory / 'cifar-10-batches-bin'
  folder.mkdir(parents=True)
  (folder / 'batches.meta.txt').write_text('\n'.join(f'class{i}' for i in range(10)))
  splits = {}
  for split, files, n in (
    ('train', [f'data_batch_{i}.bin' for i in range(1, 6)], 5),
    ('test', ['test_batch.bin'], 9),
  ):
    labels, images = [], []
    for name in files:
      y = rng.integers(0, 10, n, dtype=np.uint8)
      x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
      np.concatenate([y[:, None], x.reshape(n, -1)], axis=1).tofile(folder / name)
      labels.append(y)
      images.append(x.transpose(0, 2, 3, 1))
    splits[split] = (np.concatenate(images), np.concatenate(labels))
  return splits


def _as_multiset(images, labels):
  return sorted((int(label), image.tobytes()) for image, label in zip(images, labels, strict=True))


def test_prepared_cifar10_loads_pixels_and_labels_exactly(tmp_path, monkeypatch):
  """The non-mocked path: a dataset that tfds really prepared from (fake) raw files."""
  # tfds' download_and_prepare imports it (a missing dependency makes `tfds build` fail too).
  pytest.importorskip('importlib_resources')
  raw = _write_cifar10_binaries(tmp_path / 'raw', np.random.default_rng(0))
  data_dir = str(tmp_path / 'tfds')
  monkeypatch.setattr(
    tfds.download.DownloadManager, 'download_and_extract', lambda self, url: tmp_path / 'raw'
  )
  config = tfds.download.DownloadConfig(try_download_gcs=False)
  tfds.builder('cifar10', data_dir=data_dir).download_and_prepare(download_config=config)
  monkeypatch.setattr(ip, '_host_reachable', lambda host, port: pytest.fail('probed network'))

  train, test, info = ip.load_dataset('cifar10', data_dir=data_dir, download=False)
  assert (info.num_train, info.num_test) == (25, 9)
  assert _as_multiset(train.images, train.labels) == _as_multiset(*raw['train'])
  assert _as_multiset(test.images, test.labels) == _as_multiset(*raw['test'])
  np.testing.assert_allclose(train.mean, raw['train'][0].mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(train.std, raw['train'][0].std(axis=(0, 1, 2)), rtol=1e-6)


@pytest.mark.parametrize('download', [True, False])
def test_unprepared_dataset_fails_fast(download, tmp_path, monkeypatch):
  probed = []
  monkeypatch.setattr(ip, '_host_reachable', lambda host, port: probed.append(host) or False)
  monkeypatch.setattr(
    tfds.core.DatasetBuilder, 'download_and_prepare', lambda *a, **k: pytest.fail('downloaded')
  )
  with pytest.raises(ip.DatasetNotPreparedError, match='tfds build cifar10') as error:
    ip.load_dataset('cifar10', data_dir=str(tmp_path), download=download)
  assert str(tmp_path) in str(error.value)
  assert 'cifar-10-binary.tar.gz into' in str(error.value)
  assert f'{tmp_path}/downloads/manual' in str(error.value)
  assert probed == (['www.cs.toronto.edu'] if download else [])


def test_archives_in_manual_dir_are_prepared_without_network(tmp_path, monkeypatch):
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  for name in ('train_32x32.mat', 'test_32x32.mat', 'extra_32x32.mat'):
    (manual / name).touch()
  calls = []

  def download_and_prepare(self, download_config=None):
    calls.append((self.name, download_config.try_download_gcs))
    raise RuntimeError('stop here')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', download_and_prepare)
  monkeypatch.setattr(ip, '_host_reachable', lambda host, port: pytest.fail('probed network'))
  with pytest.raises(RuntimeError, match='stop here'):
    ip.load_dataset('svhn', data_dir=str(tmp_path), download=False)
  assert calls == [('svhn_cropped', False)]


def test_host_probe_has_a_short_timeout(monkeypatch):
  timeouts = []

  def never_connects(address, timeout=None):
    timeouts.append(timeout)
    raise OSError('unreachable')

  monkeypatch.setattr(socket, 'create_connection', never_connects)
  assert not ip._host_reachable('example.invalid', 443)
  assert timeouts and 0 < timeouts[0] <= 5

  # A probe stuck in name resolution (which the socket timeout does not bound) is abandoned:
  # the answer comes while the probe still hangs.
  release, finished = threading.Event(), threading.Event()

  def hangs(address, timeout=None):
    release.wait(60)
    finished.set()
    raise OSError('name resolution gave up')

  monkeypatch.setattr(socket, 'create_connection', hangs)
  assert not ip._host_reachable('example.invalid', 443, timeout=0.05)
  assert not finished.is_set()
  release.set()  # let the abandoned probe thread end
  assert finished.wait(60)
