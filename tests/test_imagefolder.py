"""Image folders as users have them: the same real Fashion-MNIST images in 8 bits, 16 bits, float, with transparency
and in CMYK decode to the same pixels; a decompression bomb, a zero-byte, truncated or text file is one `error:` line
naming it; hidden folders are neither classes nor images; the cache keeps one file per folder and image size."""
import itertools
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from helpers import run_cli, runs_of, write_image_folder
from PIL import Image

from fine_tune.errors import DataError
from fine_tune.learn.fashion import load
from fine_tune.learn.imagefolder import image_folder

N = 4  # real images per class


def real_images(count: int = N, start: int = 0) -> np.ndarray:
    """`count` real Fashion-MNIST test images (uint8, 28x28)."""
    return load()[2][start:start + count].numpy()


def write_png(path, width: int, height: int, bit_depth: int, color_type: int, rows) -> None:
    """A PNG written chunk by chunk from raw scanlines: Pillow cannot write 16-bit colour, and a bomb is written
    without ever holding its pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(b"\0" + row) for row in rows) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def decoded(root, size: int = 28) -> dict[str, torch.Tensor]:
    """Each class of the flat folder `root`: its images decoded, in file order."""
    src = image_folder(root, size)
    return {name: src.train.x[src.train.y == i] for i, name in enumerate(src.class_names)}


def test_16_bit_float_transparent_and_cmyk_images_decode_to_their_8_bit_pixels(tmp_path):
    """The same real images, written 8-bit, 16-bit (grey PNG, colour PNG, PGM, TIFF), float, transparent and CMYK,
    decode to the same RGB pixels: 16-bit is scaled by its depth, not clipped at 255 (which turned it near-white)."""
    grey, colour = real_images(), real_images(3 * N, start=N).reshape(N, 3, 28, 28).transpose(0, 2, 3, 1)
    writers = {
        "grey8": lambda i, p: Image.fromarray(grey[i], "L").save(p.with_suffix(".png")),
        "grey16": lambda i, p: Image.fromarray(grey[i].astype(np.uint16) * 257).save(p.with_suffix(".png")),
        "grey16pgm": lambda i, p: p.with_suffix(".pgm").write_bytes(
            b"P5\n28 28\n65535\n" + (grey[i].astype(">u2") * 257).tobytes()),
        "grey16tif": lambda i, p: Image.fromarray(grey[i].astype(np.uint16) * 257).save(p.with_suffix(".tif")),
        "greyfloat": lambda i, p: Image.fromarray(grey[i].astype(np.float32) / 255).save(p.with_suffix(".tif")),
        "greyrgba": lambda i, p: Image.fromarray(grey[i], "L").convert("RGBA").save(p.with_suffix(".png")),
        "colour8": lambda i, p: Image.fromarray(colour[i], "RGB").save(p.with_suffix(".png")),
        "colour16": lambda i, p: write_png(p.with_suffix(".png"), 28, 28, 16, 2,
                                           (row.tobytes() for row in colour[i].astype(">u2") * 257)),
        "colourcmyk": lambda i, p: Image.fromarray(colour[i], "RGB").convert("CMYK").save(p.with_suffix(".tif")),
    }
    for (name, write), i in itertools.product(writers.items(), range(N)):
        (tmp_path / "f" / name).mkdir(parents=True, exist_ok=True)
        write(i, tmp_path / "f" / name / f"{i}")
    got = decoded(tmp_path / "f")
    grey_rgb = torch.from_numpy(grey).unsqueeze(1).expand(-1, 3, -1, -1)
    for name in writers:
        want = torch.from_numpy(colour).permute(0, 3, 1, 2) if name.startswith("colour") else grey_rgb
        assert torch.equal(got[name], want), name
    assert (got["grey16"] == 255).float().mean() < 0.05  # clipped, nearly half the pixels were white


def test_transparent_pixels_are_white_as_a_viewer_shows_them(tmp_path):
    """Grey+alpha, RGBA and palette images with a transparent index: transparent pixels white, opaque ones as
    written, half-transparent ones blended."""
    grey = real_images(1)[0]
    alpha = np.where(np.arange(28)[:, None] < 14, 0, 255).astype(np.uint8) * np.ones((1, 28), np.uint8)
    alpha[14] = 128  # one half-transparent row
    folder = tmp_path / "f" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.stack([grey, alpha], -1), "LA").save(folder / "la.png")
    Image.fromarray(np.stack([grey] * 3 + [alpha], -1), "RGBA").save(folder / "rgba.png")
    palette = Image.fromarray(np.where(alpha == 0, 0, np.maximum(grey, 1)).astype(np.uint8), "P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    palette.save(folder / "p.png", transparency=0)
    half = np.rint(grey.astype(float) * 128 / 255 + 255 * 127 / 255)
    blended = np.where(alpha == 0, 255, np.where(alpha == 128, half, grey))
    want = {"la": blended, "p": np.where(alpha == 0, 255, np.maximum(grey, 1)), "rgba": blended}
    got = decoded(tmp_path / "f")["a"].numpy().astype(float)
    for i, name in enumerate(want):  # the files in name order
        assert (got[i, 0] == got[i, 1]).all() and (got[i, 0] == got[i, 2]).all(), name
        assert np.abs(got[i, 0] - want[name]).max() <= 1, name


def bomb(path, side: int) -> None:
    """A valid 1-bit PNG of side x side black pixels: a few hundred kilobytes that decode to side**2 bytes."""
    write_png(path, side, side, 1, 0, itertools.repeat(bytes(side // 8), side))


@pytest.mark.parametrize("side", [20000, 10000])  # over twice Pillow's limit (an error), over it (a warning)
def test_a_decompression_bomb_is_refused_in_one_line(tmp_path, side):
    root, _ = write_image_folder(tmp_path / "f", {"Bag": 8, "Sandal": 5}, per_class=3, flat=True)
    bomb(root / "Bag" / "huge.png", side)
    with pytest.raises(DataError, match=r"image .*huge\.png is too large to decode safely .* resize or remove it"):
        image_folder(root, 28)


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["train", "sweep"])
def test_a_decompression_bomb_is_one_error_line_and_exit_2_from_the_cli(tmp_path, verb):
    root, _ = write_image_folder(tmp_path / "f", {"Bag": 8, "Sandal": 5}, per_class=6, flat=True)
    bomb(root / "Bag" / "huge.png", 20000)
    (tmp_path / "e.yaml").write_text(f"study: bomb\ndata: {{kind: imagefolder, root: {root}}}\nval_per_class: 2\n"
                                     "epochs: 1\nsearch: {lr: {low: 1.0e-3, high: 1.0e-2, log: true}}\n"
                                     "sweep: {n_trials: 2, pruner: none}\n")
    done = run_cli(tmp_path, verb, "--config", "e.yaml")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: image ") and "huge.png" in lines[0], done.stderr
    if (tmp_path / "runs" / "mlflow.db").exists():  # the data is read before any run opens: none is left RUNNING
        runs = runs_of(tmp_path / "runs", "bomb")
        assert runs.empty or "RUNNING" not in runs["status"].tolist()


def test_hidden_folders_are_neither_classes_nor_images(tmp_path):
    """Jupyter's `.ipynb_checkpoints`, Synology's `@eaDir`, macOS's `._*` and `.DS_Store`: skipped wherever they are."""
    root, _ = write_image_folder(tmp_path / "f", {"Bag": 8, "Sandal": 5}, per_class=3, flat=True)
    before = decoded(root)
    for junk in (root / ".ipynb_checkpoints" / "Bag", root / "@eaDir" / "x", root / "Bag" / ".ipynb_checkpoints",
                 root / "Bag" / "@eaDir" / "0000.png"):
        junk.mkdir(parents=True)
        Image.fromarray(real_images(1)[0], "L").save(junk / "0000-checkpoint.png")
    (root / "Bag" / "._0000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "Sandal" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    after = decoded(root)
    assert list(after) == ["Bag", "Sandal"]
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_cache_keeps_the_latest_file_of_each_folder_and_size(tmp_path):
    a, _ = write_image_folder(tmp_path / "a", {"Bag": 8, "Sandal": 5}, per_class=3, flat=True)
    b, _ = write_image_folder(tmp_path / "b", {"Bag": 8, "Sandal": 5}, per_class=3, flat=True)
    cache = tmp_path / "cache"
    for root, size in ((a, 28), (a, 32), (b, 28)):
        image_folder(root, size, cache)
    first = set(cache.glob("imagefolder-*.pt"))
    assert len(first) == 3  # one per (folder, size): a sweep over image sizes keeps them all
    for edit in range(3):  # each edit of `a` replaces its 28 px file, never adds one
        os.utime(next((a / "Bag").iterdir()), (edit + 1, edit + 1))
        src = image_folder(a, 28, cache)
    now = set(cache.glob("imagefolder-*.pt"))
    assert len(now) == 3 and len(now - first) == 1 and src.class_names == ["Bag", "Sandal"]
    assert not list(cache.glob(".*"))  # no temp file left behind


def test_what_a_folder_may_hold_behaves(tmp_path):
    """Unicode names, a symlink to an image outside the folder (read), dangling links and link loops (skipped)."""
    root, _ = write_image_folder(tmp_path / "f", {"Sandalé 凉鞋": 5, "Bag": 8}, per_class=3, flat=True)
    outside = tmp_path / "outside.png"
    Image.fromarray(real_images(1, start=100)[0], "L").save(outside)
    (root / "Bag" / "ü-link.png").symlink_to(outside)
    (root / "Bag" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "Bag" / "x.png").symlink_to(root / "Bag" / "y.png")
    (root / "Bag" / "y.png").symlink_to(root / "Bag" / "x.png")
    (root / "Bag" / "loop").symlink_to(root / "Bag", target_is_directory=True)
    got = decoded(root)
    assert list(got) == ["Bag", "Sandalé 凉鞋"] and len(got["Bag"]) == 4 and len(got["Sandalé 凉鞋"]) == 3
    assert torch.equal(got["Bag"][3, 0], torch.from_numpy(real_images(1, start=100)[0]))


def _truncated(path):
    Image.fromarray(real_images(1)[0], "L").save(path)
    path.write_bytes(path.read_bytes()[:120])


def _link_outside(path):
    outside = path.parents[2] / "bad.png"  # beside the image folder
    outside.write_text("not a picture")
    path.symlink_to(outside)


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b""),
    lambda p: p.write_text("hello, not a picture\n"),
    _truncated,
    _link_outside,
], ids=["zero-byte", "text", "truncated", "symlink-outside"])
def test_an_unreadable_image_is_one_line_naming_it(tmp_path, make):
    root, _ = write_image_folder(tmp_path / "f", {"Bag": 8, "Sandal": 5}, per_class=3, flat=True)
    make(root / "Sandal" / "broken.png")
    with pytest.raises(DataError) as e:
        image_folder(root, 28)
    assert "broken.png" in str(e.value) and "\n" not in str(e.value) and "fix or remove it" in str(e.value)
