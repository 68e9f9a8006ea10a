"""The one image preprocessing: DICOM pixel data -> float32 (S, S) in [0, 1].

Training ingest, the ``medops predict`` client and Triton's Python backend all call
:func:`prepare_image` (through :func:`preprocess_bytes` / :func:`preprocess_file`), so a model sees
the same numbers in production as in training. The steps follow the DICOM grayscale pipeline
(PS3.4 N.2.1.1, PS3.3 C.11):

1. stored values -> modality LUT (Modality LUT Sequence, or Rescale Slope / Intercept; C.11.1);
2. -> VOI: the configured fixed window if given, else the file's VOI LUT Sequence, else its
   Window Center / Width with its VOI LUT Function (C.11.2), else the image's min..max;
3. -> presentation: MONOCHROME1 is inverted so that bright always means dense (C.7.6.3.1.2);
4. -> resized to S x S (Pillow, bilinear with antialiasing when shrinking), float32 in [0, 1].

``PREPROCESSING_VERSION`` changes whenever the numbers for the same file and settings change.

Colour images (RGB, YBR_* decoded to RGB, PALETTE COLOR through its palette, C.7.6.3.1.5) become
luminance with the ITU-R BT.601 weights and skip the grayscale LUTs, which do not apply to them.
Multi-frame images use one frame (``first`` / ``middle``) or the maximum over frames (``max``).

numpy, pydicom and Pillow only: no TensorFlow.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

from medops.dicom import PREPROCESSING_VERSION  # noqa: F401 -- see there
from medops.dicom.io import decode_pixels, number_of_frames, number_value, read_dataset, text_value
from medops.errors import DicomReadError, QuarantineReason

if TYPE_CHECKING:
    from medops.config import PreprocessSpec, Window

log = logging.getLogger(__name__)


_BT601 = np.array([0.299, 0.587, 0.114])
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"}


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map values through a VOI window onto [0, 1] (PS3.3 C.11.2.1.2 and C.11.2.1.3).

    ``LINEAR`` uses the standard's half-pixel convention (c - 0.5, w - 1), so an 8-bit image with
    center 128 and width 256 maps x to exactly x / 255. ``LINEAR_EXACT`` and ``SIGMOID`` follow
    C.11.2.1.3.2 and C.11.2.1.3.1.

    Args:
        values: modality values (after the modality LUT).
        center: Window Center (0028,1050).
        width: Window Width (0028,1051); > 1 for LINEAR, > 0 otherwise.
        function: VOI LUT Function (0028,1056).

    Returns:
        float64 array in [0, 1].
    """
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        x = np.asarray(values, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    c, w = _linear_terms(center, width, function)
    if w == 0:
        return (np.asarray(values) > c).astype(np.float64)
    # in place on one float64 copy: this runs on every pixel of every image
    x = np.array(values, dtype=np.float64)
    x -= c
    x /= w
    x += 0.5
    return np.clip(x, 0.0, 1.0, out=x)


def _linear_terms(center: float, width: float, function: str) -> tuple[float, float]:
    """``(c, w)`` of a LINEAR or LINEAR_EXACT window: the output is ``clip((x - c) / w + 0.5, 0, 1)``
    (``x > c`` when ``w`` is 0). LINEAR uses the standard's half-pixel convention (c - 0.5, w - 1).

    Raises:
        ValueError: a LINEAR window narrower than 1.
    """
    if function == "LINEAR_EXACT":
        return center, width
    if width < 1:
        raise ValueError(f"a LINEAR window needs Window Width >= 1, got {width}")
    return center - 0.5, width - 1.0


def _file_window(ds: Dataset) -> tuple[float, float, str] | None:
    """The file's Window Center / Width (the first of several) and VOI LUT Function; None when it
    has no window.

    Raises:
        TypeError, ValueError, IndexError: empty or invalid window values.
    """
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    function = (text_value(ds, "VOILUTFunction") or "LINEAR").strip().upper()
    center, width = number_value(ds, "WindowCenter", first=True), number_value(ds, "WindowWidth", first=True)
    return center, width, function


def scale_min_max(values: np.ndarray) -> np.ndarray:
    """Stretch values onto [0, 1]; a constant image becomes all zeros."""
    x = np.array(values, dtype=np.float64)
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo:
        return np.zeros_like(x)
    x -= lo
    x /= hi - lo
    return x


def _lut_max(ds: Dataset, sequence: str) -> float:
    """The largest output value of the first item's LUT: 2**bits - 1, bits being the third value
    of its LUT Descriptor (PS3.3 C.11.2.1.1)."""
    return float(2 ** int(ds[sequence][0].LUTDescriptor[2]) - 1)


def apply_voi_to_unit(values: np.ndarray, ds: Dataset, window: "Window | None" = None) -> np.ndarray:
    """The VOI step onto [0, 1] (PS3.3 C.11.2): configured window > VOI LUT > file window > min-max."""
    if window is not None:
        return apply_window(values, window.center, window.width, "LINEAR")
    if ds.get("VOILUTSequence"):
        try:
            out = apply_voi(np.asarray(values), ds, index=0)
            return np.clip(np.asarray(out, dtype=np.float64) / _lut_max(ds, "VOILUTSequence"), 0.0, 1.0)
        except Exception as exc:  # a malformed VOI LUT: fall back to the window or the image's range
            # the exception's type only: its message could quote a header value
            log.warning("the file's VOI LUT cannot be applied (%s); using its window or the image's "
                        "range instead", type(exc).__name__)
    try:
        file_window = _file_window(ds)
        if file_window is not None:
            return apply_window(values, *file_window)
    except (TypeError, ValueError, IndexError):
        pass  # empty or invalid window values: use the image's own range
    return scale_min_max(values)


def _colour_to_unit(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Luminance in [0, 1] of RGB / palette data (BT.601 weights)."""
    if photometric == "PALETTE COLOR":
        rgb = np.asarray(apply_color_lut(arr, ds), dtype=np.float64)
        peak = _lut_max_palette(ds)
    else:
        rgb = np.asarray(arr, dtype=np.float64)
        peak = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    if rgb.shape[-1] == 4:
        rgb = rgb[..., :3]
    return finite_unit(np.clip((rgb @ _BT601) / peak, 0.0, 1.0))


def _lut_max_palette(ds: Dataset) -> float:
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return float(2 ** (8 if bits == 8 else 16) - 1)


def _grayscale_values(values: np.ndarray, ds: Dataset, window: "Window | None",
                      photometric: str) -> np.ndarray:
    """Modality LUT -> VOI -> presentation for any array of stored values (pointwise)."""
    unit = apply_voi_to_unit(apply_modality_lut(values, ds), ds, window)
    return 1.0 - unit if photometric == "MONOCHROME1" else unit


def _linear_map(ds: Dataset, window: "Window | None", photometric: str) -> tuple[float, float] | None:
    """``(a, b)`` when the whole grayscale pipeline is ``clip(a * stored + b, 0, 1)``: a rescale
    (or none) and a LINEAR or LINEAR_EXACT window (the configured one, or the file's when it has
    no VOI LUT Sequence), MONOCHROME1 folded in; None for anything else (a Modality or VOI LUT
    Sequence, a sigmoid, min-max, a window the general path rejects)."""
    try:
        if ds.get("ModalityLUTSequence"):
            return None
        slope, intercept = 1.0, 0.0
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            slope, intercept = number_value(ds, "RescaleSlope"), number_value(ds, "RescaleIntercept")
        if window is not None:
            center, width, function = float(window.center), float(window.width), "LINEAR"
        elif ds.get("VOILUTSequence") or (file_window := _file_window(ds)) is None:
            return None
        else:
            center, width, function = file_window
        if function not in ("LINEAR", "LINEAR_EXACT"):
            return None
        c, w = _linear_terms(center, width, function)
    except (TypeError, ValueError, IndexError, KeyError):
        return None  # the general path decides what such values mean
    if not w > 0:  # a threshold (w == 0) or a negative width: not a multiply-add
        return None
    a, b = slope / w, (intercept - c) / w + 0.5
    if photometric == "MONOCHROME1":
        a, b = -a, 1.0 - b  # 1 - clip(z, 0, 1) == clip(1 - z, 0, 1)
    return (a, b) if np.isfinite(a) and np.isfinite(b) else None


def apply_grayscale_pipeline(arr: np.ndarray, ds: Dataset, window: "Window | None",
                             photometric: str) -> np.ndarray:
    """The grayscale pipeline of PS3.4 N.2.1.1 (modality LUT, VOI, presentation) onto [0, 1].

    Every step maps one stored value to one output value (min-max too, once the image's range is
    fixed). For large integer images: when the steps are a rescale and a linear window (CT, most
    CR/DX) it is one multiply-add and a clip in float32 (within 1e-6 of float64); otherwise it is
    computed once per distinct value in ``min..max`` and looked up. Either way the numbers are
    those of applying it pixel by pixel, at a fraction of the cost for large images (a 512 x 512
    CT slice has ~262,000 pixels but at most 4,096 values in 12 bits).
    """
    if arr.dtype.kind in "iu" and arr.size > 4096:
        linear = _linear_map(ds, window, photometric)
        if linear is not None:
            # cast once, then in place: numpy's casting multiply is slower than a plain cast
            out = arr.astype(np.float32)
            out *= np.float32(linear[0])
            out += np.float32(linear[1])
            return np.clip(out, np.float32(0.0), np.float32(1.0), out=out)
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo + 1 <= arr.size // 4:
            domain = np.arange(lo, hi + 1, dtype=arr.dtype)  # lo..hi occur in arr: the dtype holds them
            lut = finite_unit(_grayscale_values(domain, ds, window, photometric).astype(np.float32))
            # intp offsets: numpy would otherwise convert narrower indices to intp, a second pass
            return lut[np.subtract(arr, lo, dtype=np.intp)]
    return finite_unit(_grayscale_values(arr, ds, window, photometric))


def finite_unit(values: np.ndarray) -> np.ndarray:
    """``values`` with NaN -> 0, +inf -> 1, -inf -> 0 (a corrupt LUT or float pixel data).

    Only a float array with a non-finite value is copied; the check is one pass.
    """
    values = np.asarray(values)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        return np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0)
    return values


# Shrinking by more than this factor first averages whole blocks of pixels (Pillow's reduce()),
# then filters what is left (Pillow's reducing_gap): within 0.004 of the full antialiased filter
# on 512 -> 28 CT slices (mean 0.0003), 1.7x faster there and 3.7x from 2048 x 2048 radiographs.
_REDUCING_GAP = 4.0


def resize_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a 2-D float image to ``image_size`` x ``image_size`` (Pillow bilinear, antialiased
    when shrinking; large reductions average blocks first, see ``_REDUCING_GAP``)."""
    if image.shape == (image_size, image_size):
        return image.astype(np.float32)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    out = pil.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def pixel_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm of a data set's pixels, or None when it does not say.

    Pixel Spacing (0028,0030, in the patient) first, else Imager Pixel Spacing (0018,1164, at the
    detector, what CR/DX files often carry alone); the first value is the row spacing (the
    distance between rows), the second the column spacing (PS3.3 10.7.1.3).
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            rows, columns = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if rows > 0 and columns > 0 and np.isfinite(rows) and np.isfinite(columns):
            return rows, columns
    return None


def resample_to_spacing(image: np.ndarray, spacing: tuple[float, float], target: float,
                        image_size: int) -> np.ndarray:
    """Resample a 2-D [0, 1] image to ``target`` mm per pixel, then centre it on an
    ``image_size`` x ``image_size`` canvas: a fixed field of view of ``image_size * target`` mm.

    Resampling is Pillow bilinear (antialiased when shrinking, as :func:`resize_image`), separately per axis, so
    anisotropic pixels come out square. A larger result is centre-cropped; a smaller one is
    padded with 0. The same physical size in every image, whatever its detector or zoom.
    """
    rows, columns = image.shape
    new_rows = max(1, int(round(rows * spacing[0] / target)))
    new_columns = max(1, int(round(columns * spacing[1] / target)))
    if (new_rows, new_columns) != (rows, columns):
        pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
        image = np.asarray(pil.resize((new_columns, new_rows), Image.Resampling.BILINEAR,
                                      reducing_gap=_REDUCING_GAP))
    out = np.zeros((image_size, image_size), dtype=np.float32)
    src_r, dst_r, n_r = _centre(new_rows, image_size)
    src_c, dst_c, n_c = _centre(new_columns, image_size)
    out[dst_r:dst_r + n_r, dst_c:dst_c + n_c] = image[src_r:src_r + n_r, src_c:src_c + n_c]
    return np.clip(out, 0.0, 1.0)


def _centre(length: int, size: int) -> tuple[int, int, int]:
    """(source start, destination start, count) that centres ``length`` on ``size``."""
    if length >= size:
        return (length - size) // 2, 0, size
    return 0, (size - length) // 2, length


def prepare_image(ds: Dataset, spec: "PreprocessSpec") -> np.ndarray:
    """Turn a data set's pixel data into the model input: float32 (S, S) in [0, 1].

    Implements the grayscale pipeline of PS3.4 N.2.1.1: modality LUT (PS3.3 C.11.1), VOI
    (C.11.2), presentation (MONOCHROME1 inverted, C.7.6.3.1.2), then a resize.

    Args:
        ds: a data set with pixel data (from :func:`medops.dicom.io.read_dataset`).
        spec: the preprocessing settings (``ingest.preprocessing``): S = ``spec.image_size``;
            ``spec.window`` overrides the file's VOI (None = the file's own VOI LUT / window,
            or min-max when it has neither); ``spec.frame`` picks a multi-frame image's frame
            (``first``, ``middle``) or their maximum (``max``); ``spec.pixel_spacing`` (mm per
            output pixel) resamples and centres on the S x S canvas
            (:func:`resample_to_spacing`), None = resize the whole image to S.

    Raises:
        DicomReadError: the pixel data cannot be decoded or described (reason says why), or
            ``spec.pixel_spacing`` is set and the file gives no pixel spacing.
    """
    window, frame, pixel_spacing = spec.window, spec.frame, spec.pixel_spacing
    spacing = None
    if pixel_spacing is not None:
        spacing = pixel_spacing_mm(ds)
        if spacing is None:
            raise DicomReadError(
                f"no Pixel Spacing or Imager Pixel Spacing: cannot resample to "
                f"ingest.pixel_spacing = {pixel_spacing:g} mm", QuarantineReason.UNSUPPORTED_PIXELS)
    arr, photometric = decode_pixels(ds, frame=frame)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    try:
        if photometric == "PALETTE COLOR" or samples > 1 or photometric in _COLOUR:
            if samples > 1 and arr.shape[-1] != samples:
                raise DicomReadError(f"expected {samples} samples per pixel, decoded shape {arr.shape}",
                                     QuarantineReason.UNSUPPORTED_PIXELS)
            unit = _colour_to_unit(arr, ds, photometric)
        elif photometric in ("MONOCHROME1", "MONOCHROME2"):
            unit = apply_grayscale_pipeline(arr, ds, window, photometric)
        else:
            raise DicomReadError(f"unsupported photometric interpretation {photometric!r}",
                                 QuarantineReason.UNSUPPORTED_PIXELS)
    except DicomReadError:
        raise
    except Exception as exc:
        raise DicomReadError(f"cannot apply the display pipeline: {type(exc).__name__}: {exc}",
                             QuarantineReason.UNSUPPORTED_PIXELS) from exc
    unit = np.asarray(unit)  # finite: both pipelines map non-finite values (finite_unit)
    if unit.ndim == 3 and frame == "max" and number_of_frames(ds) > 1:
        unit = unit.max(axis=0)  # maximum intensity projection over frames
    if unit.ndim != 2:
        raise DicomReadError(f"expected a 2-D image after preprocessing, got shape {unit.shape}",
                             QuarantineReason.UNSUPPORTED_PIXELS)
    if spacing is not None:  # only set when pixel_spacing is
        return resample_to_spacing(unit, spacing, pixel_spacing, spec.image_size)
    return resize_image(unit, spec.image_size)


def preprocess_bytes(data: bytes, spec: "PreprocessSpec") -> np.ndarray:
    """:func:`prepare_image` for a DICOM file's bytes (what a client uploads to Triton)."""
    return prepare_image(read_dataset(data), spec)


def preprocess_file(path: str | os.PathLike, spec: "PreprocessSpec") -> np.ndarray:
    """:func:`prepare_image` for a DICOM file on disk."""
    return prepare_image(read_dataset(path), spec)
