"""Bad images, pixel tensors and codes give a clear `seed.InputError`; odd but legal images give codes.

Every file here is written by the test: re-saved and truncated copies of the shipped photo, a
text file named .jpg, a forged PNG header, every Pillow mode, 16-bit and float twins.
"""

from __future__ import annotations

import importlib.util
import io
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import seed
from conftest import ROOT
from seed.images import open_image

CHELSEA = ROOT / "assets" / "chelsea.png"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def forged_png(width: int, height: int) -> bytes:
    """A well-formed PNG header (valid CRCs) claiming ``width x height`` RGB, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good and bad image files, all made from the shipped photo."""
    d = tmp_path_factory.mktemp("images")
    photo = Image.open(CHELSEA).convert("RGB")
    photo.save(d / "good.png")
    photo.save(d / "good.jpg", quality=90)
    out = {"good.png": d / "good.png", "good.jpg": d / "good.jpg"}
    for name in ("good.png", "good.jpg"):
        data = out[name].read_bytes()
        out[f"truncated {name}"] = d / f"truncated_{name[5:]}.{name[5:]}"
        out[f"truncated {name}"].write_bytes(data[: len(data) * 2 // 3])
    (d / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (d / "empty.png").write_bytes(b"")
    (d / "bomb.png").write_bytes(forged_png(40000, 40000))
    (d / "a_folder.png").mkdir()
    out.update({"text.jpg": d / "text.jpg", "empty.png": d / "empty.png", "bomb.png": d / "bomb.png",
                "missing.png": d / "missing.png", "folder": d / "a_folder.png"})
    return out


BAD = {  # file -> what the message must say
    "missing.png": "no such file",
    "folder": "not a file",
    "empty.png": "empty",
    "truncated good.png": "truncated",
    "truncated good.jpg": "truncated",
    "text.jpg": "not an image",
    "bomb.png": "decompression bomb",
}


@pytest.mark.parametrize("name", BAD)
def test_bad_file_raises_input_error_naming_it(parity_tok, files, name):
    path = files[name]
    with pytest.raises(seed.InputError, match=BAD[name]) as err:
        parity_tok.encode(path)
    assert str(path) in str(err.value)
    with pytest.raises(seed.InputError, match=BAD[name]):
        parity_tok.encode(str(path))


@pytest.mark.parametrize("name", ["empty.png", "truncated good.png", "truncated good.jpg", "text.jpg", "bomb.png"])
def test_bad_bytes_and_file_objects_raise_input_error(parity_tok, files, name):
    data = files[name].read_bytes()
    for src in (data, bytearray(data), memoryview(data)):
        with pytest.raises(seed.InputError, match=BAD[name]):
            parity_tok.encode(src)
    stream_match = "not an image" if name == "empty.png" else BAD[name]  # a stream's size is not known
    with pytest.raises(seed.InputError, match=stream_match):
        parity_tok.encode(io.BytesIO(data))
    with open(files[name], "rb") as f, pytest.raises(seed.InputError, match=stream_match) as err:
        parity_tok.encode(f)
    assert str(files[name]) in str(err.value)  # a real file object is named by its path


def test_good_bytes_and_file_objects_give_the_path_codes(parity_tok, files):
    for name in ("good.png", "good.jpg"):
        path = files[name]
        data = path.read_bytes()
        with open(path, "rb") as f:
            codes = parity_tok.encode([path, data, bytearray(data), memoryview(data), io.BytesIO(data), f,
                                     Image.open(path)])
        assert all(torch.equal(row, codes[0]) for row in codes[1:]), name


def test_lazily_opened_truncated_pil_image_raises_input_error(parity_tok, files):
    img = Image.open(files["truncated good.png"])  # opening reads only the header: this succeeds
    with pytest.raises(seed.InputError, match="truncated"):
        parity_tok.encode(img)


def test_bomb_fails_before_allocating(files):
    assert Image.MAX_IMAGE_PIXELS is not None, "Pillow's pixel limit must stay on"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(3):
        with pytest.raises(seed.InputError, match="decompression bomb"):
            open_image(files["bomb.png"])
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 500, f"peak memory grew by {grown_mib:.0f} MiB; decoding would need 4.8 GB"


def test_one_bad_item_fails_the_batch_naming_position_and_path(parity_tok, files):
    good, bad = files["good.png"], files["truncated good.jpg"]
    with pytest.raises(seed.InputError) as err:
        parity_tok.encode([good, good, bad, good])
    msg = str(err.value)
    assert "image 2 of 4" in msg and str(bad) in msg and "truncated" in msg
    with pytest.raises(seed.InputError, match="image 1 of 2"):
        parity_tok.preprocess([good, files["text.jpg"].read_bytes()])
    with pytest.raises(seed.InputError, match="image 0 of 1"):
        parity_tok.encode([42])
    with pytest.raises(seed.InputError, match="empty list"):
        parity_tok.encode([])


def _pixels(src) -> np.ndarray:
    return np.asarray(open_image(src))


def test_every_pillow_mode_gives_codes(parity_tok, tmp_path):
    photo = Image.open(CHELSEA).convert("RGB")
    paths = []
    for mode in Image.MODES:  # 1 CMYK F HSV I I;16 I;16B I;16L I;16N L LA La LAB P PA RGB RGBA RGBa RGBX YCbCr
        img = photo.convert("LA").convert("La") if mode == "La" else photo.convert(mode)
        assert img.mode == mode
        fmt = {"1": "png", "L": "png", "LA": "png", "P": "png", "RGB": "png", "RGBA": "png",
               "CMYK": "tiff", "I": "tiff", "F": "tiff", "I;16": "png", "YCbCr": "tiff", "LAB": "tiff"}.get(mode)
        if fmt:  # also through a real file, reopened in the same mode
            path = tmp_path / f"{mode}.{fmt}"
            img.save(path)
            if Image.open(path).mode == mode:  # (Pillow < 13 reopens a YCbCr TIFF as RGB)
                paths.append(path)
                continue
        paths.append(img)  # modes no common format stores (in this Pillow): as PIL images
    codes = parity_tok.encode(paths)
    assert codes.shape == (len(paths), 32) and codes.dtype == torch.int64
    assert ((codes >= 0) & (codes < 8192)).all()
    # the modes that hold the photo losslessly give its exact pixels
    rgb = np.asarray(photo)
    for mode in ("RGB", "RGBA", "CMYK", "RGBX", "RGBa"):
        assert np.array_equal(_pixels(paths[Image.MODES.index(mode)]), rgb), mode
    gray = np.asarray(photo.convert("L").convert("RGB"))
    for mode in ("L", "LA", "La"):
        assert np.array_equal(_pixels(paths[Image.MODES.index(mode)]), gray), mode


def test_tiny_and_huge_images(parity_tok, tmp_path):
    one = [Image.new("RGB", (1, 1), (200, 30, 40)), Image.new("L", (1, 1), 7), Image.new("RGBA", (1, 1)),
           Image.new("RGB", (1, 3000), (1, 2, 3))]
    one[0].save(tmp_path / "1x1.png")
    codes = parity_tok.encode([tmp_path / "1x1.png", *one])
    assert codes.shape == (5, 32)
    assert torch.equal(codes[0], codes[1])
    # huge but under Pillow's limit (24 Mpx; the limit is ~89 Mpx)
    g = Image.linear_gradient("L").resize((6000, 4000))
    Image.merge("RGB", [g, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), g.rotate(180)]).save(
        tmp_path / "huge.png", compress_level=1)
    assert parity_tok.encode(tmp_path / "huge.png").shape == (1, 32)


@pytest.fixture(scope="module")
def gray(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The photo in 8-bit grayscale, as a file and its uint8 array."""
    path = tmp_path_factory.mktemp("gray") / "gray8.png"
    Image.open(CHELSEA).convert("L").save(path)
    return path, np.asarray(Image.open(path))


def test_16_bit_image_gives_the_codes_of_its_8_bit_twin(parity_tok, gray, tmp_path):
    path8, v = gray
    path16 = tmp_path / "gray16.png"
    Image.fromarray(v.astype(np.uint16) * 257).save(path16)
    reopened = Image.open(path16)
    assert reopened.mode == "I;16" and np.asarray(reopened).max() > 255  # really 16-bit on disk
    assert np.array_equal(_pixels(path16), _pixels(path8))  # scaled, not clipped to white
    path32 = tmp_path / "gray32.tiff"  # mode I: 32-bit integers holding 16-bit values
    Image.fromarray(v.astype(np.int32) * 257).save(path32)
    assert Image.open(path32).mode == "I"
    assert np.array_equal(_pixels(path32), _pixels(path8))
    codes = parity_tok.encode([path8, path16, path32])
    assert torch.equal(codes[1], codes[0]) and torch.equal(codes[2], codes[0])


def test_float_image_gives_the_codes_of_its_8_bit_twin(parity_tok, gray, tmp_path):
    path8, v = gray
    unit, full = tmp_path / "unit.tiff", tmp_path / "full.tiff"
    Image.fromarray(v.astype(np.float32) / 255).save(unit)    # [0, 1]
    Image.fromarray(v.astype(np.float32)).save(full)          # [0, 255], as Pillow's convert("F")
    assert Image.open(unit).mode == "F" and Image.open(full).mode == "F"
    assert np.array_equal(_pixels(unit), _pixels(path8))
    assert np.array_equal(_pixels(full), _pixels(path8))
    codes = parity_tok.encode([path8, unit, full])
    assert torch.equal(codes[1], codes[0]) and torch.equal(codes[2], codes[0])
    # out of any known range (and with NaN): stretched min..max, still an image
    odd = Image.fromarray((v.astype(np.float32) - 1000) * 3)
    odd.putpixel((0, 0), float("nan"))
    px = _pixels(odd)
    assert px.min() == 0 and px.max() == 255


def test_transparent_images_are_composited_on_white(parity_tok, tmp_path):
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    clear = np.dstack([colours, np.zeros((64, 48), np.uint8)])
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    Image.fromarray(np.dstack([colours[..., 0], np.zeros((64, 48), np.uint8)]), "LA").save(tmp_path / "clear_la.png")
    pal = Image.fromarray(colours).convert("P")
    pal.info["transparency"] = bytes([0] * 256)  # every palette entry fully transparent
    pal.save(tmp_path / "clear_p.png")
    Image.new("RGB", (48, 64), "white").save(tmp_path / "white.png")
    white = np.full((64, 48, 3), 255, np.uint8)
    for name in ("clear.png", "clear_la.png", "clear_p.png"):
        assert np.array_equal(_pixels(tmp_path / name), white), name
    codes = parity_tok.encode([tmp_path / n for n in ("white.png", "clear.png", "clear_la.png", "clear_p.png")])
    assert all(torch.equal(codes[i], codes[0]) for i in (1, 2, 3))
    # half transparent black over white: mid grey, not black
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert abs(int(_pixels(half)[0, 0, 0]) - 127) <= 1


@pytest.mark.parametrize("shape, dtype, match", [
    ((1, 3, 56), torch.float32, r"\[B,3,56,56\]"),
    ((1, 3, 57, 56), torch.float32, r"\[B,3,56,56\]"),
    ((1, 4, 56, 56), torch.float32, r"\[B,3,56,56\]"),
    ((1, 1, 3, 56, 56), torch.float32, r"\[B,3,56,56\]"),
    ((0, 3, 56, 56), torch.float32, "empty"),
    ((1, 3, 56, 56), torch.int16, "uint8"),  # (a uint8 tensor is an image batch)
    ((1, 3, 56, 56), torch.int64, "float"),
])
def test_bad_pixel_tensors(parity_tok, shape, dtype, match):
    with pytest.raises(seed.InputError, match=match):
        parity_tok.encode(torch.zeros(shape, dtype=dtype))


def test_non_finite_pixels_name_their_batch_position(parity_tok):
    x = torch.zeros(3, 3, 56, 56)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2, 5, 5] = bad
        with pytest.raises(seed.InputError, match=r"NaN or inf at batch position\(s\) \[1\]"):
            parity_tok.encode(y)
    assert torch.equal(parity_tok.encode(x[0]), parity_tok.encode(x[:1]))  # [3,S,S] is a batch of one


@pytest.mark.parametrize("codes, match", [
    (torch.full((2, 32), 3.0), "integers"),
    ([0.5] * 32, "integers"),
    (torch.ones(2, 32, dtype=torch.bool), "integers"),
    (torch.tensor([[0] * 31 + [8192]]), r"out of range \[0, 8192\) in batch row\(s\) \[0\]"),
    (torch.tensor([[0] * 32, [-1] + [0] * 31]), r"out of range .* row\(s\) \[1\]"),
    (torch.zeros(2, 31, dtype=torch.long), r"\[B,32\]"),
    (torch.zeros(1, 33, dtype=torch.long), r"\[B,32\]"),
    (torch.zeros(1, 1, 32, dtype=torch.long), r"\[B,32\]"),
    (list(range(31)), r"\[B,32\]"),
    (7, r"\[B,32\]"),
    ([[1] * 32, [1] * 31], "rectangular"),
    (["a"] * 32, "rectangular"),
    ([], "empty"),
])
def test_bad_codes(parity_tok, codes, match):
    with pytest.raises(seed.InputError, match=match):
        parity_tok.embed(codes)


def test_codes_one_sequence_and_any_integer_dtype(parity_tok):
    codes = torch.tensor([list(range(0, 8192, 256)), list(range(8191, 0, -256)), list(range(32))])
    batch = parity_tok.embed(codes)
    assert torch.equal(parity_tok.embed(codes[0]), batch[:1])                    # 1-D tensor of 32
    assert torch.equal(parity_tok.embed(codes[1].tolist()), batch[1:2])          # list of 32
    assert torch.equal(parity_tok.embed(codes.numpy().astype(np.int16)), batch)  # numpy, int16
    small = torch.arange(32, dtype=torch.uint8)  # 8192 does not fit in uint8: must not wrap around
    assert torch.equal(parity_tok.embed(small), batch[2:])


SCRIPT = ROOT / "scripts" / "check_image.py"


def test_check_image_script(files):
    names = ["good.png", "good.jpg", "truncated good.png", "text.jpg", "missing.png", "bomb.png"]
    r = subprocess.run([sys.executable, str(SCRIPT), *(str(files[n]) for n in names)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(names)
    for line, name in zip(lines, names):
        assert str(files[name]) in line
        if name.startswith("good"):
            assert line.startswith("OK ")
        else:
            assert line.startswith("BAD ") and BAD[name] in line, line
    assert "PNG RGB 451x300" in lines[0]
    assert "2 of 6 file(s) OK, 4 bad" in r.stderr


def test_check_image_script_exit_codes_and_folders(files, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("check_image", SCRIPT)  # in-process: importing seed is slow
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["check_image.py", *map(str, args)])
        rc = script.main()
        return rc, capsys.readouterr().out

    rc, out = run(files["good.png"], CHELSEA)
    assert rc == 0 and out.count("OK ") == 2, out
    rc, out = run("-q", files["good.png"].parent)  # a folder: every file under it (the empty subfolder: none)
    assert rc == 1 and "OK " not in out and out.count("BAD ") == 5, out
    rc, out = run(files["folder"])
    assert rc == 2
