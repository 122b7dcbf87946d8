"""Tests for diffax.data: sources, shuffling, sharding and iterator checkpoints."""

import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

try:  # The optional extra diffax[tfds]; `make test` installs it (the test extra includes it).
    import tensorflow_datasets as tfds
except ModuleNotFoundError:
    tfds = None
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow-datasets is not installed (diffax[tfds])")

from diffax import data


def _config(**kwargs) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({'image_size': 16, 'channels': 1, **kwargs})


class _IndexSource:
    """Record i has label i, so batches show exactly which examples they hold."""

    num_classes = 0
    class_names = []

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {'image': np.zeros((2, 2, 1), np.uint8), 'label': np.int64(i)}


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x['image'], y['image'])
        np.testing.assert_array_equal(x['label'], y['label'])


def test_digits_source_records():
    from sklearn.datasets import load_digits
    digits = load_digits()
    source = data.make_source(_config(source='digits', image_size=16))
    assert len(source) == 1797 and source.num_classes == 10
    assert source.class_names == [str(d) for d in range(10)]
    record = source[5]
    assert record['image'].shape == (16, 16, 1) and record['image'].dtype == np.uint8
    labels = np.array([source[i]['label'] for i in range(len(source))])
    np.testing.assert_array_equal(labels, digits.target)
    # Values 0..16 scaled to 0..255: the brightest pixels reach (close to) 255, the
    # background stays 0; bicubic overshoot is clipped by PIL, never wraps around.
    images = np.stack([source[i]['image'] for i in range(100)])
    assert images.min() == 0 and images.max() >= 250
    # Downsampling the 16x16 image back to 8x8 recovers the original strokes
    # (mean abs error under 10% of the range: resampling twice blurs, never moves them).
    back = np.asarray(Image.fromarray(record['image'][..., 0]).resize((8, 8), Image.Resampling.BOX), np.float32)
    assert np.abs(back - digits.images[5] * 255 / 16).mean() < 25.5
    rgb = data.make_source(_config(source='digits', image_size=32, channels=3))[5]['image']
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_train_batches_shapes_and_range():
    source = data.make_source(_config(source='digits'))
    batch = next(data.make_train_iterator(source, global_batch_size=8, seed=0))
    assert batch['image'].shape == (8, 16, 16, 1) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert batch['image'].min() == -1.0  # Background pixels (0) map to exactly -1.


def test_seeded_shuffling_is_deterministic():
    source = data.make_source(_config(source='digits'))
    make = lambda seed: _take(data.make_train_iterator(source, global_batch_size=16, seed=seed), 3)
    _assert_same_batches(make(1), make(1))
    assert not np.array_equal(make(1)[0]['label'], make(2)[0]['label'])


def test_epochs_are_permutations_reshuffled_each_epoch():
    source = _IndexSource(32)
    labels = np.concatenate([b['label'] for b in _take(data.make_train_iterator(
        source, global_batch_size=8, seed=0, shard_index=0, shard_count=1), 8)])
    first, second = labels[:32], labels[32:]
    np.testing.assert_array_equal(np.sort(first), np.arange(32))
    np.testing.assert_array_equal(np.sort(second), np.arange(32))
    assert not np.array_equal(first, second)


def test_sharding_disjoint_covering_and_equal_to_single_process():
    source, global_batch = _IndexSource(64), 16
    shards = [
        list(data.make_train_iterator(source, global_batch_size=global_batch, seed=3, shard_index=i, shard_count=2,
                                      num_epochs=1))
        for i in range(2)
    ]
    assert [len(s) for s in shards] == [4, 4]
    assert all(b['label'].shape == (8,) for s in shards for b in s)
    seen = [np.concatenate([b['label'] for b in s]) for s in shards]
    assert not set(seen[0]) & set(seen[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(64))
    # Each step's two half batches together are the single-process global batch.
    single = list(data.make_train_iterator(source, global_batch_size=global_batch, seed=3, shard_index=0,
                                           shard_count=1, num_epochs=1))
    for step, batch in enumerate(single):
        together = np.concatenate([shards[0][step]['label'], shards[1][step]['label']])
        np.testing.assert_array_equal(np.sort(together), np.sort(batch['label']))


def test_finite_epochs_give_every_shard_the_same_number_of_batches():
    # 3 epochs of 10 = 30 examples, global batch 8: 3 full batches, 6 examples dropped.
    counts = [len(list(data.make_train_iterator(_IndexSource(10), global_batch_size=8, seed=0, shard_index=i,
                                                shard_count=2, num_epochs=3))) for i in range(2)]
    assert counts == [3, 3]


def test_batch_size_must_divide_over_shards():
    with pytest.raises(ValueError, match='global_batch_size=10.*shard_count=4'):
        data.make_train_iterator(_IndexSource(16), global_batch_size=10, seed=0, shard_index=0, shard_count=4)


def test_get_state_set_state_resumes_exactly():
    source = data.make_source(_config(source='digits'))
    make = lambda: data.make_train_iterator(source, global_batch_size=16, seed=0, shard_index=0, shard_count=1)
    it = make()
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = make()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), expected)


def test_orbax_checkpoint_manager_resumes_exactly(tmp_path):
    source = data.make_source(_config(source='digits'))
    make = lambda: data.make_train_iterator(source, global_batch_size=16, seed=0, shard_index=0, shard_count=1)
    it = make()
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 2)
    resumed = make()
    with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',)) as mngr:
        assert mngr.latest_step() == 3
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _assert_same_batches(_take(resumed, 2), expected)


@needs_tfds
def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        source = data.make_source(_config(source='tfds', tfds_name='mnist', split='train', image_key='image',
                                          label_key='label', channels=3))
        assert len(source) == 12 and source.num_classes == 10
        assert source[0]['image'].shape == (16, 16, 3) and source[0]['image'].dtype == np.uint8
        batch = next(data.make_train_iterator(source, global_batch_size=4, seed=0, shard_index=0, shard_count=1))
        assert batch['image'].shape == (4, 16, 16, 3)
        assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()
        unlabeled = data.make_source(_config(source='tfds', tfds_name='mnist', label_key=''))
        assert unlabeled.num_classes == 0 and unlabeled[0]['label'] == 0


@needs_tfds
def test_tfds_missing_key_names_key_and_features():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match=r"no feature 'pixels'.*\['image', 'label'\]"):
            data.make_source(_config(source='tfds', tfds_name='mnist', image_key='pixels'))


def _tiny_captions_builder():
    """A tfds builder (registered as 'tiny_captions' when defined) with COCO's caption layout, a sequence of
    {'text', 'id'} per image, and a plain Text feature; tfds.testing.mock_data makes its records."""
    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'captions': tfds.features.Sequence({'text': tfds.features.Text(), 'id': np.int64}),
                'title': tfds.features.Text(), 'label': tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples()}

        def _generate_examples(self):
            yield from ()

    return TinyCaptions


@needs_tfds
def test_tfds_captions_from_a_text_feature_and_the_first_of_a_nested_sequence():
    builder = _tiny_captions_builder()
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.data_source('tiny_captions', split='train')
        coco = data.make_source(_config(source='tfds', tfds_name='tiny_captions', caption_key='captions/text',
                                        channels=3, label_key=''))
        for i in range(3):
            texts = raw[i]['captions']['text']
            first = texts[0].decode() if isinstance(texts[0], bytes) else str(texts[0])
            assert coco[i]['caption'] == first and isinstance(coco[i]['caption'], str)
            assert coco[i]['image'].shape == (16, 16, 3)
        title = data.make_source(_config(source='tfds', tfds_name='tiny_captions', caption_key='title', channels=3))
        assert title[0]['caption'] == str(raw[0]['title']) and title.num_classes == 2
        for key, what in (('captions/id', 'is a Tensor'), ('captions/txt', 'is no such feature'),
                          ('label', 'is a ClassLabel')):
            with pytest.raises(ValueError, match=f"tiny_captions.*caption_key {key!r} {what}, not a Text"):
                data.make_source(_config(source='tfds', tfds_name='tiny_captions', caption_key=key))
    assert builder.name == 'tiny_captions'


@needs_tfds
@pytest.mark.slow  # a tiny VAE and CLIP compile (seconds on an idle machine): `make test-slow`
def test_tfds_captions_feed_the_latent_cache(tmp_path):
    """COCO-style first captions through a tiny random CLIP into a latent cache, record by record."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_fixtures import tiny_clip, tiny_vae, write_tokenizer

    from diffax.data.cache import build_cache
    from diffax.data.latent_cache import LatentCacheSource
    from diffax.train.config import base_config

    tiny_vae().save_pretrained(tmp_path / 'vae')  # RGB 16x16 -> 8x8x4
    tokenizer = write_tokenizer(tmp_path / 'tokenizer')
    tiny_clip(tokenizer).save_pretrained(tmp_path / 'text_encoder')
    _tiny_captions_builder()
    c = base_config()
    c.data.update(dict(source='tfds', tfds_name='tiny_captions', label_key='', caption_key='captions/text',
                       image_size=16, channels=3))
    c.cache.update(dict(vae=str(tmp_path / 'vae'), text_encoder=str(tmp_path / 'text_encoder'),
                        tokenizer=str(tokenizer), out=str(tmp_path / 'cache'), batch_size=4))
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.data_source('tiny_captions', split='train')
        firsts = [str(raw[i]['captions']['text'][0]) for i in range(5)]
        source = LatentCacheSource(build_cache(c))
    assert len(source) == 5 and [source.stored[i]['caption'] for i in range(5)] == firsts
    assert source[0]['cond']['encoder_hidden_states'].shape == (77, 32)
    assert source.manifest['captions'] == list(dict.fromkeys(firsts))


def test_tfds_source_without_tfds_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # `import tensorflow_datasets` now fails
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'diffax\[tfds\]'"):
        data.make_source(_config(source='tfds', tfds_name='mnist'))


def _save(path, size, color, mode='RGB'):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_with_class_subfolders(tmp_path):
    _save(tmp_path / 'dog' / 'a.PNG', (20, 20), (0, 0, 255))
    _save(tmp_path / 'cat' / 'b.jpg', (40, 24), (255, 0, 0))
    _save(tmp_path / 'cat' / 'nested' / 'c.webp', (16, 16), (255, 0, 0))
    (tmp_path / 'cat' / 'notes.txt').write_text('not an image')
    source = data.make_source(_config(source='folder', path=str(tmp_path), channels=3))
    assert source.class_names == ['cat', 'dog'] and source.num_classes == 2 and len(source) == 3
    records = [source[i] for i in range(3)]
    assert [int(r['label']) for r in records] == [0, 0, 1]
    for r in records:
        assert r['image'].shape == (16, 16, 3) and r['image'].dtype == np.uint8
    # JPEG is lossy: the solid colour survives within a few levels.
    np.testing.assert_allclose(records[0]['image'].reshape(-1, 3).mean(0), [255, 0, 0], atol=4)
    np.testing.assert_array_equal(records[2]['image'].reshape(-1, 3).mean(0), [0, 0, 255])


def test_flat_folder_center_crops(tmp_path):
    # A 30x10 image: white 10x10 centre, black sides. After the centre crop only white is left.
    image = np.zeros((10, 30), np.uint8)
    image[:, 10:20] = 255
    Image.fromarray(image).save(tmp_path / 'wide.png')
    _save(tmp_path / 'grey.bmp', (8, 8), 128, mode='L')
    source = data.make_source(_config(source='folder', path=str(tmp_path)))
    assert source.num_classes == 0 and source.class_names == [] and len(source) == 2
    grey, wide = source[0], source[1]  # Sorted by file name.
    assert grey['label'] == 0 and wide['label'] == 0
    np.testing.assert_array_equal(wide['image'], np.full((16, 16, 1), 255, np.uint8))
    np.testing.assert_array_equal(grey['image'], np.full((16, 16, 1), 128, np.uint8))


def test_folder_without_images_names_the_folder(tmp_path):
    (tmp_path / 'empty_class').mkdir()
    (tmp_path / 'readme.txt').write_text('no images here')
    with pytest.raises(ValueError, match=f'{tmp_path}.*holds no images'):
        data.make_source(_config(source='folder', path=str(tmp_path)))
    with pytest.raises(ValueError, match='does not exist'):
        data.make_source(_config(source='folder', path=str(tmp_path / 'missing')))


def test_unknown_source_and_bad_channels():
    with pytest.raises(ValueError, match="data.source must be one of.*'imagenet'"):
        data.make_source(_config(source='imagenet'))
    with pytest.raises(ValueError, match='data.channels must be 1 or 3'):
        data.make_source(_config(source='digits', channels=4))


def test_worker_processes_resume_exactly():
    # Two workers split the stream between them, so their batches differ from the
    # in-process ones, but are just as deterministic and resumable.
    source = data.make_source(_config(source='digits'))
    make = lambda: data.make_train_iterator(source, global_batch_size=8, seed=0, shard_index=0, shard_count=1,
                                            worker_count=2)
    it = make()
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 2)
    resumed = make()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), expected)
    assert expected[0]['image'].shape == (8, 16, 16, 1) and expected[0]['label'].dtype == np.int32
