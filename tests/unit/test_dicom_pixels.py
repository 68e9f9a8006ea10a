"""pixels: the one preprocessing, checked against values worked out by hand (PS3.3 C.11)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medops.config import PreprocessSpec, SynthConfig, Window
from medops.dicom import pixels, synth
from medops.errors import DicomReadError, QuarantineReason
from medops.paths import BUNDLED_DATASET


def make_dataset(values: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                 signed: bool = False, frames: int = 1, samples: int = 1, **attrs) -> Dataset:
    """A minimal native (uncompressed) image data set holding ``values``."""
    values = np.asarray(values)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    shape = values.shape[1:] if frames > 1 else values.shape
    ds.Rows, ds.Columns = shape[0], shape[1]
    ds.SamplesPerPixel = samples
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = values.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(values).tobytes()
    return ds


def test_monochrome1_with_rescale_and_window_matches_hand_computation():
    # stored 0, 100, 200, 300; slope 2, intercept -100 -> modality -100, 100, 300, 500 (C.11.1.1)
    # LINEAR window c=200, w=401 -> y = (x - 199.5) / 400 + 0.5, clipped (C.11.2.1.2.1):
    #   -100 -> 0; 100 -> 0.25125; 300 -> 0.75125; 500 -> 1
    # MONOCHROME1 is inverted: 1, 0.74875, 0.24875, 0
    ds = make_dataset(np.array([[0, 100], [200, 300]], dtype=np.uint16), photometric="MONOCHROME1",
                      bits_stored=12, RescaleSlope="2", RescaleIntercept="-100",
                      WindowCenter="200", WindowWidth="401")
    out = pixels.prepare_image(ds, PreprocessSpec(image_size=2))
    assert out.dtype == np.float32 and out.shape == (2, 2)
    np.testing.assert_allclose(out, [[1.0, 0.74875], [0.24875, 0.0]], atol=1e-6)


def test_8bit_monochrome2_with_the_full_range_window_is_identity():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = make_dataset(values, WindowCenter="128", WindowWidth="256")
    out = pixels.prepare_image(ds, PreprocessSpec(image_size=16))
    assert np.array_equal(out, values.astype(np.float32) / np.float32(255))


def test_synthetic_files_give_exactly_original_over_255(tmp_path):
    synth.run(SynthConfig(max_images_per_split=2), source_npz=BUNDLED_DATASET, out_dir=tmp_path)
    for path in sorted((tmp_path / "dicom").rglob("*.dcm")):
        original = pydicom.dcmread(path).pixel_array
        out = pixels.preprocess_bytes(path.read_bytes(), PreprocessSpec(image_size=28))
        assert np.array_equal(out, (original / 255).astype(np.float32))
        assert np.array_equal(pixels.preprocess_file(path, PreprocessSpec(image_size=28)), out)


def test_configured_window_overrides_the_files():
    ds = make_dataset(np.array([[0, 50], [100, 150]], dtype=np.uint8), WindowCenter="128", WindowWidth="256")
    # c=100, w=101 -> (x - 99.5) / 100 + 0.5: 0 -> 0, 50 -> 0.005, 100 -> 0.505, 150 -> 1
    out = pixels.prepare_image(ds, PreprocessSpec(image_size=2, window=Window(center=100, width=101)))
    np.testing.assert_allclose(out, [[0.0, 0.005], [0.505, 1.0]], atol=1e-6)


def test_without_any_window_the_image_range_is_stretched():
    ds = make_dataset(np.array([[10, 20], [30, 50]], dtype=np.uint8))
    np.testing.assert_allclose(pixels.prepare_image(ds, PreprocessSpec(image_size=2)), [[0, 0.25], [0.5, 1.0]], atol=1e-7)
    flat = make_dataset(np.full((2, 2), 7, dtype=np.uint8))
    assert np.array_equal(pixels.prepare_image(flat, PreprocessSpec(image_size=2)), np.zeros((2, 2), np.float32))


def test_linear_exact_and_sigmoid_windows():
    x = np.array([0.0, 50.0, 100.0])
    # LINEAR_EXACT (C.11.2.1.3.2): (x - c) / w + 0.5 with c=50, w=100 -> 0, 0.5, 1
    np.testing.assert_allclose(pixels.apply_window(x, 50, 100, "LINEAR_EXACT"), [0.0, 0.5, 1.0])
    # SIGMOID (C.11.2.1.3.1): 1 / (1 + exp(-4 (x - c) / w)) -> 1/(1+e^2), 0.5, 1/(1+e^-2)
    np.testing.assert_allclose(pixels.apply_window(x, 50, 100, "SIGMOID"),
                               [1 / (1 + np.e**2), 0.5, 1 / (1 + np.e**-2)])


def test_signed_ct_like_values_through_rescale_and_window():
    # signed, 12 bits stored, intercept -1024: stored -1, 1024, 1064, 2047 -> HU -1025, 0, 40, 1023
    # window c=40 w=400 (LINEAR): (x - 39.5) / 399 + 0.5 -> 0, 0.40100..., 0.50125..., 1
    ds = make_dataset(np.array([[-1, 1024], [1064, 2047]], dtype=np.int16), signed=True, bits_stored=12,
                      RescaleSlope="1", RescaleIntercept="-1024", WindowCenter="40", WindowWidth="400")
    expected = np.clip((np.array([[-1025, 0], [40, 1023]]) - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(pixels.prepare_image(ds, PreprocessSpec(image_size=2)), expected, atol=1e-6)


def test_bits_stored_masks_values_above_high_bit():
    # 12 bits stored in 16 allocated: bit 12 and above are not pixel data (PS3.5 8.1.1), so a
    # stored 0x1005 is 5; min-max over 0, 5, 10, 20 -> 0, 0.25, 0.5, 1
    ds = make_dataset(np.array([[0, 0x1005], [10, 20]], dtype=np.uint16), bits_stored=12)
    np.testing.assert_allclose(pixels.prepare_image(ds, PreprocessSpec(image_size=2)), [[0, 0.25], [0.5, 1.0]], atol=1e-7)


def test_resize_keeps_range_and_shape():
    rng = np.random.default_rng(0)
    ds = make_dataset(rng.integers(0, 4096, size=(64, 48), dtype=np.uint16), bits_stored=12)
    out = pixels.prepare_image(ds, PreprocessSpec(image_size=28))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_large_reductions_stay_close_to_the_full_antialiasing_filter():
    """512 -> 28 averages 4 x 4 blocks before the bilinear filter: the result must stay within
    0.005 of Pillow's full antialiased filter on a CT-like slice (smooth body, sharp edges, noise),
    and a block average must not leak aliasing: a 1-pixel checkerboard comes out flat grey."""
    from PIL import Image

    yy, xx = np.mgrid[0:512, 0:512]
    body = ((yy - 256) ** 2 / 220 ** 2 + (xx - 256) ** 2 / 180 ** 2 < 1).astype(np.float32)
    lungs = ((yy - 230) ** 2 / 90 ** 2 + (np.abs(xx - 256) - 80) ** 2 / 50 ** 2 < 1)
    image = np.clip(0.7 * body - 0.5 * lungs + np.random.default_rng(0).normal(0, 0.05, (512, 512)),
                    0, 1).astype(np.float32)
    full = np.asarray(Image.fromarray(image).resize((28, 28), Image.Resampling.BILINEAR))
    out = pixels.resize_image(image, 28)
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert np.abs(out - full).max() < 0.005 and np.abs(out - full).mean() < 0.001
    checker = ((yy + xx) % 2).astype(np.float32)
    np.testing.assert_allclose(pixels.resize_image(checker, 28), 0.5, atol=0.01)


def test_multi_frame_policies():
    frames = np.stack([np.full((2, 2), v, dtype=np.uint8) for v in (10, 20, 30)])
    frames[0, 0, 0] = 250  # frame 0 holds the brightest pixel
    common = dict(frames=3, WindowCenter="128", WindowWidth="256")
    first = pixels.prepare_image(make_dataset(frames, **common), PreprocessSpec(image_size=2, frame="first"))
    middle = pixels.prepare_image(make_dataset(frames, **common), PreprocessSpec(image_size=2, frame="middle"))
    mip = pixels.prepare_image(make_dataset(frames, **common), PreprocessSpec(image_size=2, frame="max"))
    np.testing.assert_allclose(first, np.array([[250, 10], [10, 10]]) / 255, atol=1e-7)
    np.testing.assert_allclose(middle, np.full((2, 2), 20 / 255), atol=1e-7)
    np.testing.assert_allclose(mip, np.array([[250, 30], [30, 30]]) / 255, atol=1e-7)


def test_rgb_becomes_bt601_luminance():
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    ds = make_dataset(rgb, photometric="RGB", samples=3)
    np.testing.assert_allclose(pixels.prepare_image(ds, PreprocessSpec(image_size=2)),
                               [[0.299, 0.587], [0.114, 1.0]], atol=1e-6)


def test_preprocess_bytes_of_a_written_file_round_trips():
    ds = make_dataset(np.array([[0, 255], [128, 64]], dtype=np.uint8), WindowCenter="128", WindowWidth="256")
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    out = pixels.preprocess_bytes(buf.getvalue(), PreprocessSpec(image_size=2))
    np.testing.assert_array_equal(out, np.array([[0, 255], [128, 64]], np.float32) / np.float32(255))


def test_unsupported_photometric_is_a_typed_failure():
    from medops.errors import DicomReadError, QuarantineReason

    ds = make_dataset(np.zeros((2, 2), np.uint8), photometric="HSV")
    with pytest.raises(DicomReadError) as err:
        pixels.prepare_image(ds, PreprocessSpec(image_size=2))
    assert err.value.reason == QuarantineReason.UNSUPPORTED_PIXELS


def _lut_item(first: int, bits: int, data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first, bits]
    item.LUTData = data
    return item


def test_modality_lut_sequence_then_min_max():
    # Modality LUT (C.11.1): stored 0..3 -> 10, 20, 40, 80; no VOI -> min-max: 0, 1/7, 3/7, 1
    ds = make_dataset(np.array([[0, 1], [2, 3]], dtype=np.uint16), bits_stored=12)
    item = _lut_item(0, 16, [10, 20, 40, 80])
    item.add_new("LUTData", "OW", np.array([10, 20, 40, 80], dtype="<u2").tobytes())
    ds.ModalityLUTSequence = [item]
    np.testing.assert_allclose(pixels.prepare_image(ds, PreprocessSpec(image_size=2)), [[0, 1 / 7], [3 / 7, 1]], atol=1e-7)


def test_voi_lut_sequence_maps_through_the_table():
    # VOI LUT (C.11.2.1.1): first mapped value 100, 8-bit entries 0, 64, 128, 255; values below
    # the first entry take the first, above the last take the last; output / (2**8 - 1)
    ds = make_dataset(np.array([[99, 101], [102, 200]], dtype=np.uint16), bits_stored=12,
                      WindowCenter="0", WindowWidth="2")  # the LUT wins over a window
    ds.VOILUTSequence = [_lut_item(100, 8, [0, 64, 128, 255])]
    ds["VOILUTSequence"][0]["LUTData"].VR = "US"
    np.testing.assert_allclose(pixels.prepare_image(ds, PreprocessSpec(image_size=2)),
                               [[0, 64 / 255], [128 / 255, 1]], atol=1e-7)


def test_a_malformed_voi_lut_falls_back_to_the_window_with_a_warning(caplog):
    import logging

    ds = make_dataset(np.array([[99, 101], [102, 200]], dtype=np.uint16), bits_stored=12,
                      WindowCenter="150", WindowWidth="101")
    item = Dataset()
    item.LUTDescriptor = [4, 100, 8]  # and no LUTData
    item.LUTExplanation = "CANARY-LUT"
    ds.VOILUTSequence = [item]
    with caplog.at_level(logging.WARNING, logger="medops.dicom.pixels"):
        out = pixels.prepare_image(ds, PreprocessSpec(image_size=2))
    window = pixels.prepare_image(make_dataset(np.array([[99, 101], [102, 200]], dtype=np.uint16),
                                               bits_stored=12, WindowCenter="150", WindowWidth="101"),
                                  PreprocessSpec(image_size=2))
    np.testing.assert_array_equal(out, window)
    assert "VOI LUT cannot be applied" in caplog.text and "CANARY" not in caplog.text


def test_palette_colour_becomes_luminance_of_its_palette():
    # PALETTE COLOR (C.7.6.3.1.5): index -> (R, G, B) from 16-bit tables; gray = BT.601 luminance
    ds = make_dataset(np.array([[0, 1], [2, 3]], dtype=np.uint8), photometric="PALETTE COLOR")
    red, green, blue = [0, 65535, 0, 65535], [0, 0, 65535, 65535], [0, 0, 0, 65535]
    for colour, data in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(data, dtype="<u2").tobytes())
    np.testing.assert_allclose(pixels.prepare_image(ds, PreprocessSpec(image_size=2)),
                               [[0, 0.299], [0.587, 0.299 + 0.587 + 0.114]], atol=1e-6)


def test_ybr_full_grey_is_its_luma():
    # YBR_FULL (C.7.6.3.1.2) with neutral chroma is grey: R = G = B = Y, so the output is Y / 255
    ybr = np.zeros((2, 2, 3), dtype=np.uint8)
    ybr[..., 0] = [[0, 60], [128, 255]]
    ybr[..., 1:] = 128
    ds = make_dataset(ybr, photometric="YBR_FULL", samples=3)
    np.testing.assert_allclose(pixels.prepare_image(ds, PreprocessSpec(image_size=2)),
                               np.array([[0, 60], [128, 255]]) / 255, atol=1.5 / 255)


@pytest.mark.parametrize("photometric,signed", [("MONOCHROME1", False), ("MONOCHROME2", True)])
def test_lookup_table_path_gives_the_pixelwise_numbers(photometric, signed):
    # large integer images go through a per-value lookup table; it must equal the pixelwise math
    rng = np.random.default_rng(1)
    dtype = np.int16 if signed else np.uint16
    lo = -2048 if signed else 0
    values = rng.integers(lo, lo + 4096, size=(128, 128)).astype(dtype)
    ds = make_dataset(values, photometric=photometric, bits_stored=12, signed=signed,
                      RescaleSlope="0.5", RescaleIntercept="-30", WindowCenter="100", WindowWidth="700")
    fast = pixels.apply_grayscale_pipeline(values, ds, None, photometric)
    slow = pixels._grayscale_values(values, ds, None, photometric).astype(np.float32)
    # rescale + linear window: one multiply-add and a clip in float32
    assert fast.dtype == np.float32 and pixels._linear_map(ds, None, photometric) is not None
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)
    assert 0.1 < (fast == 0).mean() + (fast == 1).mean() < 0.9  # both clipped and in-window pixels
    for function in ("LINEAR_EXACT", "SIGMOID"):  # the first linear, the second by lookup table
        other = make_dataset(values, photometric=photometric, bits_stored=12, signed=signed,
                             RescaleSlope="0.5", RescaleIntercept="-30", WindowCenter="100",
                             WindowWidth="700", VOILUTFunction=function)
        np.testing.assert_allclose(pixels.apply_grayscale_pipeline(values, other, None, photometric),
                                   pixels._grayscale_values(values, other, None, photometric),
                                   rtol=0, atol=1e-6)
    no_window = make_dataset(values, photometric=photometric, bits_stored=12, signed=signed)
    np.testing.assert_array_equal(pixels.apply_grayscale_pipeline(values, no_window, None, photometric),
                                  pixels._grayscale_values(values, no_window, None, photometric).astype(np.float32))


def test_non_finite_float_pixels_become_0_and_1_in_both_pipeline_paths():
    # Float Pixel Data (7FE0,0008) may hold NaN and infinities; windowed, -inf maps to 0, +inf to
    # 1 and NaN to 0, and the finite values keep their hand-computed window values
    values = np.array([[np.nan, np.inf], [-np.inf, 50.0]], dtype=np.float32)
    ds = make_dataset(np.zeros((2, 2), dtype=np.float32), WindowCenter="50", WindowWidth="101")
    unit = pixels.apply_grayscale_pipeline(values, ds, None, "MONOCHROME2")
    # LINEAR c=50, w=101: 50 -> (50 - 49.5) / 100 + 0.5 = 0.505
    np.testing.assert_allclose(unit, [[0.0, 1.0], [0.0, 0.505]], atol=1e-6)
    assert pixels.finite_unit(np.array([1.0, np.nan])).tolist() == [1.0, 0.0]
    # the integer (lookup-table) path keeps the same values as computing every pixel
    stored = np.random.default_rng(0).integers(-1000, 3000, size=(128, 128)).astype(np.int16)
    ct = make_dataset(stored, signed=True, RescaleSlope="1", RescaleIntercept="-1024",
                      WindowCenter="40", WindowWidth="400")
    by_lut = pixels.apply_grayscale_pipeline(stored, ct, None, "MONOCHROME2")
    direct = np.clip((stored.astype(np.float64) - 1024 - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(by_lut, direct, atol=1e-6)


def test_resampling_to_a_pixel_spacing_makes_anisotropic_pixels_square():
    # 4 rows x 2 columns, rows 1 mm apart, columns 2 mm apart: at 1 mm per pixel it is 4 x 4.
    # Columns 0 -> 1 upsampled by Pillow's bilinear (triangle) filter: output centres at 0.25,
    # 0.75, 1.25, 1.75 input pixels -> 0, 0.25, 0.75, 1 (edges take the nearest pixel alone)
    values = np.tile(np.array([0, 255], dtype=np.uint8), (4, 1))
    ds = make_dataset(values, PixelSpacing=[1.0, 2.0], WindowCenter="128", WindowWidth="256")
    out = pixels.prepare_image(ds, PreprocessSpec(image_size=4, pixel_spacing=1.0))
    expected_row = np.clip((np.array([0, 0.25, 0.75, 1.0]) * 255 - 127.5) / 255 + 0.5, 0, 1)
    np.testing.assert_allclose(out, np.tile(expected_row, (4, 1)), atol=1e-5)


def test_resampling_centres_the_field_of_view_cropping_or_padding():
    # 6 x 6 at 1 mm, 4 x 4 output at 1 mm: the central 4 x 4 (rows/columns 1..4)
    big = np.arange(36, dtype=np.float32).reshape(6, 6) / 35
    np.testing.assert_allclose(pixels.resample_to_spacing(big, (1.0, 1.0), 1.0, 4), big[1:5, 1:5])
    # 2 x 2 at 1 mm on a 4 x 4 canvas: padded with 0 around the centre
    small = np.full((2, 2), 0.5, dtype=np.float32)
    out = pixels.resample_to_spacing(small, (1.0, 1.0), 1.0, 4)
    assert out[1:3, 1:3].tolist() == [[0.5, 0.5], [0.5, 0.5]] and out.sum() == 2.0
    # 8 x 8 at 0.5 mm = 4 x 4 at 1 mm: the whole image shrunk (a constant image stays constant)
    np.testing.assert_allclose(pixels.resample_to_spacing(np.full((8, 8), 0.3, np.float32),
                                                          (0.5, 0.5), 1.0, 4), 0.3, atol=1e-6)


def test_pixel_spacing_falls_back_to_imager_pixel_spacing_and_is_required_when_set():
    values = np.zeros((4, 4), dtype=np.uint8)
    assert pixels.pixel_spacing_mm(make_dataset(values, ImagerPixelSpacing=[0.2, 0.3])) == (0.2, 0.3)
    assert pixels.pixel_spacing_mm(make_dataset(values, PixelSpacing=[0.5, 0.5],
                                                ImagerPixelSpacing=[0.2, 0.3])) == (0.5, 0.5)
    bare = make_dataset(values)
    assert pixels.pixel_spacing_mm(bare) is None
    with pytest.raises(DicomReadError, match="cannot resample") as info:
        pixels.prepare_image(bare, PreprocessSpec(image_size=4, pixel_spacing=1.0))
    assert info.value.reason is QuarantineReason.UNSUPPORTED_PIXELS
    assert pixels.prepare_image(bare, PreprocessSpec(image_size=4)).shape == (4, 4)  # not set: a plain resize


def test_a_configured_window_on_a_large_ct_slice_is_the_pixelwise_window():
    from medops.config import Window

    stored = np.random.default_rng(3).integers(-1000, 3000, size=(256, 256)).astype(np.int16)
    ct = make_dataset(stored, signed=True, RescaleSlope="1", RescaleIntercept="-1024",
                      WindowCenter="40", WindowWidth="400")
    lung = Window(center=-600, width=1500)
    out = pixels.apply_grayscale_pipeline(stored, ct, lung, "MONOCHROME2")
    # the configured window replaces the file's: HU = stored - 1024, LINEAR c=-600, w=1500
    expected = np.clip((stored.astype(np.float64) - 1024 - (-600 - 0.5)) / 1499 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
