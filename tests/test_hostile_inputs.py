"""Whatever the cameras wrote: oversized and elongated images are refused before decoding (bounded memory),
EXIF orientation is applied, and a few hundred generated broken files each give exactly one row."""
import io
import resource
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from spade.config import SpadeConfig
from spade.io.images import DecodeLimits, ImageBeyondLimits, ImageDecodeError, decode_rgb
from spade.io.maps import decode_score_map
from spade.io.results import read_score_table
from tests.conftest import spade_process

DEFAULT_LIMITS = DecodeLimits(SpadeConfig().max_source_pixels, SpadeConfig().max_aspect_ratio)


def write_png(path: Path, size: tuple[int, int], mode: str = "L") -> Path:
    """A PNG of zeros: tiny on disk (it compresses), large once decoded."""
    Image.new(mode, size).save(path, format="PNG", compress_level=9)
    return path


def test_limits_are_checked_on_the_header_and_name_the_config_key(tmp_path):
    long = write_png(tmp_path / "line.png", (1, 40000)).read_bytes()
    huge = write_png(tmp_path / "huge.png", (9000, 9000)).read_bytes()
    assert len(huge) < 400_000
    with pytest.raises(ImageBeyondLimits, match=r"1x40000, aspect ratio 40000.0.*max_aspect_ratio=50.*Raise `max_aspect_ratio`"):
        decode_rgb(long, DEFAULT_LIMITS)
    with pytest.raises(ImageBeyondLimits, match=r"9000x9000 = 81.0 megapixels.*Raise `max_source_pixels`"):
        decode_rgb(huge, DEFAULT_LIMITS)
    assert decode_rgb(long, DecodeLimits(None, None)).shape == (40000, 1, 3)  # the limits, not the decoder, refused
    with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
        SpadeConfig(max_aspect_ratio=0.5)


def test_hostile_folder_scores_with_bounded_memory(tiny_night, tmp_path):
    """A 1x40000 and a 9000x9000 PNG beside a normal image: error rows naming the limit, the normal one
    scored, and the whole `spade score` process stays under 1.5 GB peak RSS."""
    folder = tmp_path / "camera"
    folder.mkdir()
    write_png(folder / "line_1x40000.png", (1, 40000))
    write_png(folder / "huge_9000x9000.png", (9000, 9000))
    write_png(folder / "strip_3x5000.png", (3, 5000))
    normal = sorted(Path(tiny_night["data"], "test", "good").glob("*.png"))[0]
    (folder / "normal.png").write_bytes(normal.read_bytes())
    out = tmp_path / "out"
    measure = [sys.executable, "-c", "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stdout); sys.exit(code)"]
    run = spade_process(["score", "--config", tiny_night["config"], "--gallery", tiny_night["gallery"],
                         "--images", str(folder), "--out", str(out)], tmp_path, wrapper=measure)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    peak_kib = int(stdout.strip().splitlines()[-1])
    assert peak_kib < 1.5 * 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    rows = {Path(r["uri"]).name: r for r in read_score_table(str(out)).to_pylist()}
    assert set(rows) == {"line_1x40000.png", "huge_9000x9000.png", "strip_3x5000.png", "normal.png"}
    assert rows["normal.png"]["status"] == "ok"
    for name, key in (("line_1x40000.png", "max_aspect_ratio"), ("huge_9000x9000.png", "max_source_pixels"),
                      ("strip_3x5000.png", "max_aspect_ratio")):
        assert rows[name]["status"] == "error" and rows[name]["is_anomalous"] is None
        assert name in rows[name]["error"] and f"Raise `{key}` in the config" in rows[name]["error"]


def exif_rotated_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    """A JPEG whose EXIF says 'rotate to display', and the pixels as a viewer shows them (turned by hand)."""
    rng = np.random.default_rng(3)
    pixels = (rng.random((48, 80, 3)) * 255).astype(np.uint8)
    pixels[:10, :20] = 255  # a marker in a corner, so a wrong turn cannot pass unnoticed
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(buffer.getvalue())) as stored:
        as_stored = np.asarray(stored.convert("RGB"))
    return buffer.getvalue(), as_stored


def test_exif_orientation_is_applied(tiny_night, tmp_path):
    jpeg, as_stored = exif_rotated_jpeg(6)  # 6: the camera was turned; display rotated 90 degrees clockwise
    upright = np.rot90(as_stored, k=-1)
    np.testing.assert_array_equal(decode_rgb(jpeg), upright)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "tagged.jpg").write_bytes(jpeg)
    Image.fromarray(np.ascontiguousarray(upright)).save(folder / "turned.png")
    out = tmp_path / "out"
    assert main(["--quiet", "score", "--config", tiny_night["config"], "--gallery", tiny_night["gallery"],
                 "--images", str(folder), "--out", str(out), "--runner=FnApiRunner"]) == 0
    rows = {Path(r["uri"]).name: r for r in read_score_table(str(out)).to_pylist()}
    tagged, turned = rows["tagged.jpg"], rows["turned.png"]
    assert (tagged["width"], tagged["height"]) == (turned["width"], turned["height"]) == (48, 80)
    assert tagged["image_score"] == pytest.approx(turned["image_score"], rel=1e-6)
    assert tagged["neighbours"] == turned["neighbours"]
    maps = [decode_score_map(Path(r["map_uri"]).read_bytes()) for r in (tagged, turned)]
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-5, atol=1e-6)
    unturned = decode_rgb(exif_rotated_jpeg(1)[0])
    assert unturned.shape == (48, 80, 3)  # orientation 1: left as stored


FORMATS = {"PNG": ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I"], "JPEG": ["L", "RGB", "CMYK"],
           "TIFF": ["1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"], "GIF": ["L", "P"],
           "BMP": ["1", "L", "P", "RGB"]}


def fuzz_image(rng: np.random.Generator) -> bytes:
    """A valid small image of a random format, mode and size (1x1, 1xN, Nx1 among them)."""
    fmt = list(FORMATS)[rng.integers(len(FORMATS))]
    mode = FORMATS[fmt][rng.integers(len(FORMATS[fmt]))]
    shape = [(1, 1), (1, int(rng.integers(2, 80))), (int(rng.integers(2, 80)), 1),
             (int(rng.integers(2, 90)), int(rng.integers(2, 90)))][rng.integers(4)]
    pixels = (rng.random((shape[1], shape[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray((np.asarray(img).astype(np.float32) * 200).astype(
            {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def fuzz_file(rng: np.random.Generator) -> bytes:
    kind = rng.integers(6)
    if kind == 0:  # random bytes, sometimes behind a real magic number
        junk = rng.bytes(int(rng.integers(0, 600)))
        magic = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"GIF89a", b"BM"][rng.integers(6)]
        return magic + junk
    data = fuzz_image(rng)
    if kind == 1:  # truncated anywhere
        return data[: int(rng.integers(0, len(data)))]
    if kind in (2, 3):  # a few bytes changed, in the header (kind 2) or anywhere (kind 3)
        mutable = bytearray(data)
        span = min(len(mutable), 64) if kind == 2 else len(mutable)
        for _ in range(int(rng.integers(1, 6))):
            mutable[int(rng.integers(0, span))] = int(rng.integers(0, 256))
        return bytes(mutable)
    return data  # valid files in odd modes and sizes


def test_fuzzed_files_each_give_one_row(tiny_night, tmp_path):
    rng = np.random.default_rng(20261130)
    folder = tmp_path / "fuzz"
    folder.mkdir()
    suffixes = [".png", ".jpg", ".tif", ".gif", ".bmp", ".bin"]
    for i in range(300):
        (folder / f"f{i:03d}{suffixes[i % len(suffixes)]}").write_bytes(fuzz_file(rng))
    out = tmp_path / "out"
    assert main(["--quiet", "score", "--config", tiny_night["config"], "--gallery", tiny_night["gallery"],
                 "--images", str(folder), "--out", str(out), "--runner=FnApiRunner"]) == 0
    rows = read_score_table(str(out)).to_pylist()
    assert sorted(Path(r["uri"]).name for r in rows) == sorted(p.name for p in folder.iterdir())
    ok = [r for r in rows if r["status"] == "ok"]
    errors = [r for r in rows if r["status"] == "error"]
    assert len(ok) + len(errors) == 300 and len(ok) >= 50 and len(errors) >= 50
    for row in errors:
        assert row["error"].startswith(row["uri"]) and row["image_score"] is None
    for row in ok:
        assert np.isfinite(row["image_score"]) and Path(row["map_uri"]).is_file()


def test_decode_survives_every_fuzzed_file_or_says_why():
    """The decoder alone: each generated file decodes to RGB or raises `ImageDecodeError`, nothing else."""
    rng = np.random.default_rng(7)
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(400):
        try:
            rgb = decode_rgb(fuzz_file(rng), DEFAULT_LIMITS)
        except ImageDecodeError:
            outcomes["refused"] += 1
            continue
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
        outcomes["ok"] += 1
    assert outcomes["ok"] > 50 and outcomes["refused"] > 50
