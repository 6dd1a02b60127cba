import numpy as np
import pytest
import torch
from PIL import Image

from fddaq.data import UNLABELLED, Preprocess, load_image_folder, preset
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
