import numpy as np
import pytest
import torch
from PIL import Image

from fddaq.data import BACKGROUND, UNLABELLED, Preprocess, load_image_folder, preset
from fddaq.errors import ConfigError, DataError

GREY = Preprocess(input_size=4, mean=(0.5,), std=(0.25,), channels=1)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_image_folder_labels_by_sorted_class_and_normalises(tmp_path):
    save(tmp_path / "b_cat" / "1.png", np.full((4, 4), 255))
    save(tmp_path / "a_dog" / "1.png", np.zeros((4, 4)))
    save(tmp_path / "a_dog" / "2.png", np.full((4, 4), 51))
    data = load_image_folder(tmp_path, GREY)
    assert data.class_names == ("a_dog", "b_cat")
    assert data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 1, 4, 4)
    assert torch.allclose(data.images[:, 0, 0, 0], torch.tensor([-2.0, (0.2 - 0.5) / 0.25, 2.0]))


def test_given_class_list_maps_folders(tmp_path):
    save(tmp_path / "cat" / "1.png", np.zeros((4, 4)))
    data = load_image_folder(tmp_path, GREY, ("ant", "bee", "cat"))
    assert data.labels.tolist() == [2]
    with pytest.raises(DataError, match="class folders the model does not know: cat"):
        load_image_folder(tmp_path, GREY, ("ant", "bee"))


def test_flat_folder_is_unlabelled(tmp_path):
    save(tmp_path / "x.png", np.zeros((4, 4)))
    data = load_image_folder(tmp_path, GREY)
    assert data.labels.tolist() == [UNLABELLED] and not data.labelled


def test_a_flat_folder_with_system_or_empty_sub_folders_stays_flat_and_says_so(tmp_path):
    """`__MACOSX/` or a folder named `holiday.jpg/` flipped a flat folder into class-folder mode."""
    for i in range(3):
        save(tmp_path / f"{i}.png", np.zeros((4, 4)))
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._0.png").write_bytes(b"apple double")
    (tmp_path / "holiday.jpg").mkdir()
    data = load_image_folder(tmp_path, GREY)
    assert len(data) == 3 and not data.labelled and data.skipped == 0
    assert data.layout == "a flat folder (unlabelled); folders ignored: __MACOSX, holiday.jpg"
    save(tmp_path / "holiday.jpg" / "x.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match=r"holds both images and folders of images \(holiday.jpg\)"):
        load_image_folder(tmp_path, GREY)
    classes = tmp_path / "classes"
    save(classes / "cat" / "1.png", np.zeros((4, 4)))
    (classes / "__MACOSX").mkdir()
    assert load_image_folder(classes, GREY).layout == "1 class folder; folders ignored: __MACOSX"


def test_resize_and_centre_crop_rgb(tmp_path):
    image = np.zeros((8, 16, 3))
    image[:, 8:] = 255  # right half white
    save(tmp_path / "c" / "1.png", image)
    prep = Preprocess(input_size=4, resize=4, mean=(0.0,), std=(1.0,), channels=3)
    data = load_image_folder(tmp_path, prep)
    assert data.images.shape == (1, 3, 4, 4)  # 8x16 -> 4x8 -> centre 4x4
    assert data.images[0, :, :, 0].max() < 0.5 and data.images[0, :, :, 3].min() > 0.5


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    save(tmp_path / "c" / "good.png", np.zeros((4, 4)))
    (tmp_path / "c" / "bad.png").write_bytes(b"garbage")
    data = load_image_folder(tmp_path, GREY)
    assert len(data) == 1 and data.skipped == 1
    (tmp_path / "c" / "good.png").write_bytes(b"garbage too")
    with pytest.raises(DataError, match="none of the 2 files"):
        load_image_folder(tmp_path, GREY)


def test_mostly_unreadable_folders_and_classes_without_a_readable_image_are_refused(tmp_path):
    """10 real images among 90 garbage files ran with exit 0, the skips only in report.json."""
    for i in range(3):
        save(tmp_path / "a" / f"{i}.png", np.zeros((4, 4)))
    for i in range(4):
        (tmp_path / "a" / f"bad{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"4 of the 7 image files in .* are not readable images \(e.g. .*bad0.png\)"):
        load_image_folder(tmp_path, GREY)
    (tmp_path / "a" / "bad3.png").unlink()
    assert load_image_folder(tmp_path, GREY).skipped == 3  # half: read, and counted
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.png").write_bytes(b"garbage")
    save(tmp_path / "a" / "3.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match="class folder b of .* has no readable image"):
        load_image_folder(tmp_path, GREY)


def test_an_image_header_claiming_a_huge_size_is_skipped_and_counted(tmp_path):
    """A PNG header that claims 20000x20000 pixels (a few bytes) raised PIL's
    DecompressionBombError through the whole tool."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    save(tmp_path / "c" / "good.png", np.zeros((4, 4)))
    data = load_image_folder(tmp_path, GREY)
    assert len(data) == 1 and data.skipped == 1


def test_missing_empty_and_too_small(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", GREY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        load_image_folder(tmp_path / "empty", GREY)
    save(tmp_path / "small" / "c" / "1.png", np.zeros((2, 2)))
    with pytest.raises(DataError, match="smaller than the 4x4 crop"):
        load_image_folder(tmp_path / "small", GREY)


def test_presets_and_validation():
    assert preset("imagenet", 3).resize == 256
    with pytest.raises(ConfigError, match="unknown preset 'cifar'"):
        preset("cifar", 3)
    with pytest.raises(ConfigError, match="mean has 2 values"):
        Preprocess(input_size=4, mean=(0.1, 0.2), std=(1.0,), channels=3)
    with pytest.raises(ConfigError, match="input_size=100000 must be within 1..4096 pixels"):
        Preprocess(input_size=100000, mean=(0.5,), std=(1.0,), channels=1)  # one forward pass: 40 GB
    with pytest.raises(ConfigError, match="resize=100 must be within input_size=224..8192"):
        Preprocess(input_size=224, resize=100, mean=(0.5,), std=(1.0,), channels=1)


def test_decoding_threads_keep_order_labels_and_values(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(24):
        folder = tmp_path / f"class_{index % 3}"
        if index % 7 == 3:  # unreadable files between readable ones
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{index:02d}.jpg").write_bytes(b"not an image")
        else:
            save(folder / f"{index:02d}.png", rng.integers(0, 256, (9, 12, 3)))
    prep = Preprocess(input_size=6, resize=7, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), channels=3,
                      interpolation="bicubic")
    serial = load_image_folder(tmp_path, prep, workers=1)
    threaded = load_image_folder(tmp_path, prep, workers=4)
    assert len(serial) == 21 and serial.skipped == threaded.skipped == 3
    assert torch.equal(serial.images, threaded.images) and serial.images.is_contiguous()
    assert serial.labels.tolist() == threaded.labels.tolist() == [int(p.split("class_")[1][0]) for p in serial.paths]
    assert serial.paths == threaded.paths
    # each image is its own file's pixels, normalised: check one by hand
    from PIL import Image

    with Image.open(serial.paths[5]) as img:
        pixels = np.asarray(img.convert("RGB").resize((9, 7), Image.BICUBIC), dtype=np.float32) / 255
    crop = torch.from_numpy(pixels[:6, 1:7]).permute(2, 0, 1)
    expected = (crop - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) / torch.tensor([0.2, 0.3, 0.4])[:, None, None]
    assert torch.allclose(threaded.images[5], expected, atol=1e-6)


def test_decoding_threads_raise_a_too_small_image(tmp_path):
    for index in range(8):
        save(tmp_path / "c" / f"{index}.png", np.zeros((4, 4) if index != 5 else (2, 2)))
    with pytest.raises(DataError, match="5.png is 2x2, smaller than the 4x4 crop"):
        load_image_folder(tmp_path, GREY, workers=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_images_match_pageable_ones(tmp_path):
    for index in range(4):
        save(tmp_path / "c" / f"{index}.png", np.full((4, 4), 60 * index))
    (tmp_path / "c" / "bad.png").write_bytes(b"garbage")
    pinned = load_image_folder(tmp_path, GREY, pin_memory=True)
    assert pinned.images.is_pinned() and torch.equal(pinned.images, load_image_folder(tmp_path, GREY).images)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_pil_mode_decodes_to_the_same_image(tmp_path, channels):
    """16-bit greyscale was clipped by convert("L") (a folder of them scored 70% instead of
    93%); 32-bit integer and float images, palettes with a transparent entry, grey + alpha,
    RGBA and CMYK decode to the same values as the 8-bit image they hold."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 6)).astype(np.uint8)
    grey[0, 0], grey[0, 1] = 0, 255
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
    prep = Preprocess(input_size=6, mean=(0.0,) * channels, std=(1.0,) * channels, channels=channels)
    reference_image = Image.fromarray(grey if channels == 1 else rgb)
    folder = tmp_path / ("grey" if channels == 1 else "rgb")
    folder.mkdir()
    reference_image.save(folder / "a_reference.png")
    if channels == 1:
        Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "b_16bit.png")  # mode I;16
        Image.fromarray(grey.astype(np.int32) * 257, "I").save(folder / "c_32bit.tif")
        Image.fromarray(grey.astype(np.float32) / 255, "F").save(folder / "d_float.tif")
        Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=2), "LA").save(folder / "e_la.png")
    else:
        Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)]), "RGBA").save(folder / "b_rgba.png")
        Image.fromarray(rgb).convert("CMYK").save(folder / "c_cmyk.tif")
        Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "d_grey16.png")  # a grey 16-bit file, RGB model
    data = load_image_folder(folder, prep)
    assert data.skipped == 0 and len(data) >= 4
    reference = data.images[0]
    for name, image in zip(data.paths[1:], data.images[1:]):
        expected = reference if "grey16" not in name else torch.from_numpy(grey / 255.0).float().expand(3, 6, 6)
        torch.testing.assert_close(image, expected, atol=1 / 255 + 1e-6, rtol=0, msg=name)


def test_transparent_pixels_are_composited_onto_the_stated_background(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    rgba[2:, :, :3] = 90  # colour hidden under alpha 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([200, 200, 200, 90, 90, 90])
    palette.info["transparency"] = 1
    palette.save(tmp_path / "b.png", transparency=1)
    prep = Preprocess(input_size=2, mean=(0.0,), std=(1.0,), channels=3)
    data = load_image_folder(tmp_path, prep)
    background = torch.tensor(BACKGROUND, dtype=torch.float32) / 255
    assert torch.allclose(data.images[0, :, 0, 0], torch.full((3,), 200 / 255))
    assert torch.allclose(data.images[0, :, 1, 0], background)  # bottom-left after the 4 -> 2 centre crop rows 1..2
    assert torch.allclose(data.images[1, :, 0, 0], torch.full((3,), 200 / 255))
    assert torch.allclose(data.images[1, :, 0, 1], background)


def test_an_input_size_without_a_resize_scales_the_presets_resize():
    """--preset imagenet --input-size 64 kept resize 256: a 64 px crop from the middle of a
    256 px image, a quarter of the picture."""
    from fddaq.pipeline import PreprocessOptions, resolve_preprocess

    small = resolve_preprocess("torchvision:resnet18", 3, PreprocessOptions(preset="imagenet", input_size=64))
    assert (small.input_size, small.resize) == (64, 73)  # 256 / 224 of 64
    assert small.describe() == ("shorter side to 73 (bilinear), centre crop 64x64, RGB, mean 0.485, 0.456, 0.406, "
                                "std 0.229, 0.224, 0.225")
    given = resolve_preprocess("torchvision:resnet18", 3, PreprocessOptions(preset="imagenet", input_size=64, resize=64))
    assert given.resize == 64
    assert resolve_preprocess("x:y", 3, PreprocessOptions(preset="imagenet")).resize == 256


def test_spread_samples_hold_at_most_the_count_asked():
    """Regression: a stride of len // most gave up to 2 * most - 1 items (511 of 'up to 256')."""
    from fddaq.pipeline import spread

    for count, most in ((300, 256), (511, 256), (1000, 128), (100, 128), (0, 128)):
        picked = range(count)[spread(count, most)]
        assert len(picked) <= most and (count == 0 or picked[-1] >= count - picked.step), (count, most)
        assert count == 0 or len(picked) > min(count, most) // 2, (count, most)  # most of what is asked
    assert list(range(10)[spread(10, 128)]) == list(range(10))
