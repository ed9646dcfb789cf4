import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from spade.config import IMAGENET_MEAN
from spade.io.images import ImageDecodeError, content_id, decode_rgb, preprocess
from spade.io.maps import decode_mask, decode_score_map, encode_mask, encode_score_map
from spade.scoring.scoremap import combine_layer_maps, crop_box_pixels, smooth, to_original_geometry
from spade.io.sources import expand_images, label_from_uri, mask_uri, read_inputs


def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_converts_modes_to_rgb():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert decode_rgb(png_bytes(gray)).shape == (8, 8, 3)
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    out = decode_rgb(png_bytes(rgba))
    assert out.shape == (4, 5, 3) and out[0, 0, 0] == 200
    sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = decode_rgb(png_bytes(sixteen))
    assert out.shape == (8, 8, 3) and out.max() == 255


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, I am a text file\n", "not a readable image"),
    (None, "corrupt or truncated"),
])
def test_decode_errors_say_why(data, reason):
    if data is None:
        data = png_bytes(np.full((64, 64, 3), 7, dtype=np.uint8))[:60]
    with pytest.raises(ImageDecodeError, match=reason):
        decode_rgb(data)


def test_preprocess_shape_and_normalisation():
    rgb = np.full((300, 400, 3), 255, dtype=np.uint8)
    tensor = preprocess(rgb, 256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert tuple(tensor.shape) == (3, 224, 224)
    assert float(tensor.min()) == pytest.approx(1.0) and float(tensor.max()) == pytest.approx(1.0)


def test_brightness_imagenet_mean_moves_a_frames_mean_and_keeps_its_contrast_and_colours():
    """``brightness: imagenet_mean``: one offset moves the framed image's mean (over pixels and channels) to ImageNet's,
    so a frame and the same frame lit brighter give the same tensor; ``keep`` leaves the frame as it is."""
    rng = np.random.default_rng(0)
    rgb = (rng.random((120, 160, 3)) * 80 + 20).astype(np.uint8)
    rgb[..., 2] //= 2  # a colour cast that must survive
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.2)  # the network's normalisation, applied after the move
    level = sum(IMAGENET_MEAN) / 3  # 0.449, whatever the normalisation
    m, s = np.array(mean).reshape(3, 1, 1), np.array(std).reshape(3, 1, 1)
    kept = preprocess(rgb, 128, 128, mean, std, "full").numpy() * s + m
    moved = preprocess(rgb, 128, 128, mean, std, "full", "imagenet_mean").numpy() * s + m
    assert abs(float(kept.mean()) - level) > 0.1  # a dark frame: there is something to move
    assert float(moved.mean()) == pytest.approx(level, abs=1e-5)
    np.testing.assert_allclose(moved - moved.mean(), kept - kept.mean(), atol=1e-5)  # contrast, colour balance kept
    brighter = rgb + np.uint8(60)  # no value reaches 255: the same scene, lit brighter
    np.testing.assert_allclose(preprocess(brighter, 128, 128, mean, std, "full", "imagenet_mean").numpy(),
                               preprocess(rgb, 128, 128, mean, std, "full", "imagenet_mean").numpy(), atol=1e-5)
    assert not np.allclose(preprocess(brighter, 128, 128, mean, std, "full").numpy(),
                           preprocess(rgb, 128, 128, mean, std, "full").numpy(), atol=1e-2)
    with pytest.raises(ValueError, match="brightness 'auto': use keep or imagenet_mean"):
        preprocess(rgb, 128, 128, mean, std, "full", "auto")


def test_brightness_reaches_the_frames_the_pipeline_reads(tmp_path):
    """The read step frames each image with its route's ``brightness``: under ``imagenet_mean`` two captures that
    differ only in exposure give one tensor."""
    from spade.config import SpadeConfig
    from transforms.read import DecodeImages

    rng = np.random.default_rng(1)
    rgb = (rng.random((96, 128, 3)) * 90 + 30).astype(np.uint8)
    uris = []
    for name, image in (("dim.png", rgb), ("bright.png", rgb + np.uint8(70))):
        (tmp_path / name).write_bytes(png_bytes(image))
        uris.append(str(tmp_path / name))

    def tensors(brightness):
        step = DecodeImages({"": SpadeConfig(backbone="resnet18", weights="random", framing="full", resize=64,
                                             crop=64, brightness=brightness)})
        step.setup()
        (route, batch), = list(step.process(("", uris)))
        return {image.uri.rsplit("/", 1)[-1]: image.tensor for image in batch}

    moved, kept = tensors("imagenet_mean"), tensors("keep")
    np.testing.assert_allclose(moved["dim.png"], moved["bright.png"], atol=1e-5)
    assert np.abs(kept["dim.png"] - kept["bright.png"]).mean() > 0.5


def test_content_id_is_stable():
    assert content_id(b"abc") == content_id(b"abc") != content_id(b"abd")
    assert len(content_id(b"abc")) == 16


def test_expand_folder_glob_mvtec_and_tar(tmp_path):
    root = tmp_path / "cat"
    for rel in ["train/good/a.png", "train/good/b.png", "test/good/c.png", "test/crack/d.png", "ground_truth/crack/d_mask.png"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "train/good/.hidden").write_bytes(b"x")
    assert [u.rsplit("/", 1)[-1] for u in expand_images(str(root), split="train")] == ["a.png", "b.png"]
    assert [u.rsplit("/", 1)[-1] for u in expand_images(str(root), split="test")] == ["d.png", "c.png"]
    assert len(expand_images(str(root / "test" / "**" / "*.png"))) == 2
    assert len(expand_images(f"file://{root}/train/good/*.png")) == 2
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        expand_images(str(tmp_path / "missing"))
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for name in ["x.png", "y.png", "y.json"]:
            info = tarfile.TarInfo(name)
            info.size = 3
            archive.addfile(info, io.BytesIO(b"abc"))
    members = list(read_inputs(str(shard)))
    assert [m[0].rsplit("#", 1)[-1] for m in members] == ["x.png", "y.png", "y.json"]
    assert members[0][1] == b"abc" and members[2][2] is not None
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"not a tar at all" * 100)
    [(uri, data, problem)] = list(read_inputs(str(broken)))
    assert data is None and "tar" in problem
    [(uri, data, problem)] = list(read_inputs(str(tmp_path / "nope.png")))
    assert problem == "file not found"


def test_labels_and_mask_locations():
    assert label_from_uri("/d/bottle/test/broken_large/000.png") == "broken_large"
    assert label_from_uri("gs://b/bottle/train/good/000.png") == "good"
    assert label_from_uri("/photos/img.png") == ""
    assert mask_uri("/d/gt", "crack", "/d/test/crack/012.png") == "/d/gt/crack/012_mask.png"


def test_score_map_png_round_trip():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 7.5, size=(33, 47)).astype(np.float32)
    png, scale = encode_score_map(values)
    assert scale == pytest.approx(values.max())
    back = decode_score_map(png)
    assert back.shape == values.shape
    assert np.abs(back - values).max() <= scale / 65535
    mask = values > 4
    assert (decode_mask(encode_mask(mask)) == mask).all()


@pytest.mark.parametrize("shape", [(1, 1), (1, 301), (257, 1), (64, 64), (900, 611)])
def test_score_map_png_is_a_standard_16_bit_png_of_the_quantised_map(shape):
    """Our own scanlines (Sub filter) decode, in Pillow, to exactly the quantised values Pillow's encoder would store."""
    values = np.random.default_rng(sum(shape)).gamma(2.0, 3.0, size=shape).astype(np.float32)
    values.flat[0] = 0.0
    png, scale = encode_score_map(values)
    with Image.open(io.BytesIO(png)) as img:
        assert img.mode == "I;16" and img.size == (shape[1], shape[0])
        assert float(img.text["spade_scale"]) == scale
        stored = np.asarray(img, dtype=np.int64)
    expected = np.round(values.astype(np.float64) / scale * 65535.0).astype(np.int64)
    np.testing.assert_array_equal(stored, expected)
    assert stored.min() == 0 and stored.max() == (65535 if values.max() > 0 else 0)


def test_layer_maps_combine_smooth_and_map_back():
    combined = combine_layer_maps([np.ones((56, 56)), 3 * np.ones((28, 28)), np.zeros((14, 14))], 224)
    assert combined.shape == (224, 224)
    np.testing.assert_allclose(combined, 4 / 3, rtol=1e-6)
    spike = np.zeros((224, 224), dtype=np.float32)
    spike[100, 100] = 1.0
    smoothed = smooth(spike, 4.0)
    assert smoothed.sum() == pytest.approx(1.0, rel=1e-3) and smoothed.max() < 0.02
    assert to_original_geometry(combined, (256, 256), 256, 224).shape == (256, 256)
    assert to_original_geometry(combined, (900, 600), 256, 224).shape == (600, 900)
    assert crop_box_pixels((256, 256), 256, 224) == (16, 16, 240, 240)
    assert crop_box_pixels((512, 512), 256, 224) == (32, 32, 480, 480)
