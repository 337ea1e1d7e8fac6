"""DICOM decoding order and errors, on real files (pydicom-data RG1, ../shared/data/dicom) and broken ones."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medclipin.data.dicom import window_to_unit
from medclipin.data.readers import ImageReadError, read_image

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-12345"


def _rg1(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    return path


@pytest.fixture(scope="module")
def rg1() -> dict[str, np.ndarray]:
    return {k: read_image(_rg1(f"RG1_{k}.dcm")).pixels for k in ("UNCR", "UNCI", "J2KR", "J2KI")}


def make_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None, **tags) -> str:
    """A small, valid DICOM file (explicit VR little endian) with patient identifiers in it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality, ds.ViewPosition = PATIENT_NAME, PATIENT_ID, "CR", "AP"
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits or pixels.itemsize * 8)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return str(path)


# ------------------------------------------------------------------------------------ real files
def test_rg1_lossless_syntaxes_give_identical_pixels(rg1):
    assert rg1["UNCR"].shape == (1955, 1841) and rg1["UNCR"].dtype == np.float32
    np.testing.assert_array_equal(rg1["UNCR"], rg1["J2KR"])


def test_rg1_lossy_versions_agree_and_are_close_to_lossless(rg1):
    # RG1_UNCI is the *decompressed lossy* image, so it equals J2KI, not UNCR.
    np.testing.assert_array_equal(rg1["UNCI"], rg1["J2KI"])
    diff = np.abs(rg1["J2KI"] - rg1["UNCR"])
    assert diff.mean() < 0.005 and diff.max() < 0.05


def test_rg1_metadata_and_monochrome1_polarity():
    image = read_image(_rg1("RG1_J2KR.dcm"))
    meta = image.meta
    assert (meta.modality, meta.view_position, meta.photometric_interpretation) == ("CR", "PA", "MONOCHROME1")
    assert meta.original_size == (1955, 1841) and meta.bits_stored == 15
    assert meta.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    assert meta.pixel_spacing is None  # the file stores 0\0
    # bright = dense after the MONOCHROME1 inversion: the lungs (centre-left/right) are darker than the border
    pixels = image.pixels
    lung = pixels[700:1100, 300:700].mean()
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and lung < pixels.mean()


def test_fake_monochrome1_is_inverse_of_its_monochrome2_twin(shared_data):
    normal = read_image(shared_data / "dicom" / "siim_cr_chest_jpeg_baseline.dcm")
    flipped = read_image(shared_data / "dicom" / "siim_cr_chest_fake_monochrome1.dcm")
    assert flipped.meta.photometric_interpretation == "MONOCHROME1"
    assert normal.meta.transfer_syntax == "JPEG Baseline (Process 1)"
    np.testing.assert_allclose(flipped.pixels, 1.0 - normal.pixels, atol=1e-6)


def test_headerless_dicom_loads_with_force(shared_data):
    image = read_image(shared_data / "dicom" / "cr_mono1_10bit_chest_no_meta.dcm")
    assert image.pixels.shape == (440, 440)
    assert image.meta.bits_stored == 10 and image.meta.photometric_interpretation == "MONOCHROME1"
    assert image.meta.transfer_syntax == "Implicit VR Little Endian"
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0 and image.pixels.std() > 0.05


def _testfile(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom test data")
    return path


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_syntaxes_match_uncompressed(name):
    reference = read_image(_testfile("MR_small.dcm")).pixels
    np.testing.assert_array_equal(read_image(_testfile(name)).pixels, reference)


def test_more_syntaxes_decode():
    assert read_image(_testfile("image_dfl.dcm")).meta.transfer_syntax == "Deflated Explicit VR Little Endian"
    near = read_image(_testfile("JPEGLSNearLossless_16.dcm"))
    assert near.meta.transfer_syntax.startswith("JPEG-LS Lossy") and near.pixels.shape == (50, 10)


def test_colour_syntaxes_decode_to_rgb():
    for name in ("SC_rgb_rle.dcm", "SC_ybr_full_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        path = _testfile(name)
        pixels = read_image(path).pixels
        assert pixels.shape == (100, 100, 3)
        # the pydicom test image has pure red/green/blue bands: the first rows are red
        assert pixels[0, 50, 0] > 0.9 and pixels[0, 50, 1] < 0.1, name


# ------------------------------------------------------------------------------------- VOI order
def test_window_linear_formula():
    # PS3.3 C.11.2.1.2: x <= c - 0.5 - (w-1)/2 → min; x > c - 0.5 + (w-1)/2 → max; linear between
    values = np.array([0, 49.5, 99.5, 150, 200], np.float32)
    out = window_to_unit(values, center=100, width=101)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1.0, 1.0], atol=1e-6)
    assert window_to_unit(np.array([100.0]), 100, 100, "LINEAR_EXACT")[0] == pytest.approx(0.5)
    assert window_to_unit(np.array([100.0]), 100, 100, "SIGMOID")[0] == pytest.approx(0.5)


def test_rescale_then_window_then_invert(tmp_path):
    stored = np.array([[0, 1000], [2000, 4095]], np.uint16)
    # modality LUT: HU = stored - 1024; window 0±500 in HU → stored 524..1524
    path = make_dicom(tmp_path / "w.dcm", stored, bits=12, RescaleSlope=1, RescaleIntercept=-1024,
                      WindowCenter=0, WindowWidth=1001)
    pixels = read_image(path).pixels
    assert pixels[0, 0] == 0.0 and pixels[1, 0] == 1.0
    assert pixels[0, 1] == pytest.approx((1000 - 1024 + 500) / 1000, abs=1e-3)
    mono1 = make_dicom(tmp_path / "w1.dcm", stored, photometric="MONOCHROME1", bits=12, RescaleSlope=1,
                       RescaleIntercept=-1024, WindowCenter=0, WindowWidth=1001)
    np.testing.assert_allclose(read_image(mono1).pixels, 1.0 - pixels, atol=1e-6)


def test_no_window_uses_bits_stored_range_and_other_windows(tmp_path):
    stored = np.array([[0, 1023], [2048, 4095]], np.uint16)
    path = make_dicom(tmp_path / "b.dcm", stored, bits=12)
    np.testing.assert_allclose(read_image(path).pixels, stored / 4095.0, atol=1e-6)
    minmax = read_image(path, window="none").pixels
    assert minmax.min() == 0.0 and minmax.max() == 1.0
    rng = np.random.default_rng(0)
    noisy = rng.integers(1000, 2000, size=(64, 64), dtype=np.uint16)
    noisy[0, 0] = 4095  # one outlier: percentile window ignores it
    perc = read_image(make_dicom(tmp_path / "p.dcm", noisy, bits=12), window="percentile").pixels
    assert perc.mean() == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="window"):
        read_image(path, window="lung")


def test_metadata_has_no_patient_identifiers(tmp_path):
    path = make_dicom(tmp_path / "id.dcm", np.zeros((8, 8), np.uint8), PixelSpacing=[0.2, 0.25])
    meta = read_image(path).meta
    assert meta.pixel_spacing == (0.2, 0.25) and meta.view_position == "AP"
    assert PATIENT_NAME not in repr(meta) and PATIENT_ID not in repr(meta)


def test_multiframe_needs_a_frame():
    path = get_testdata_file("emri_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    with pytest.raises(ImageReadError, match=r"multi-frame.*10 frames.*frame="):
        read_image(path)
    frame = read_image(path, frame=3)
    assert frame.pixels.shape == (64, 64) and frame.meta.number_of_frames == 10
    expected = pydicom.dcmread(path).pixel_array[3]
    assert np.corrcoef(frame.pixels.ravel(), expected.ravel())[0, 1] > 0.999
    with pytest.raises(ImageReadError, match="frame 10"):
        read_image(path, frame=10)


# ------------------------------------------------------------------------------------ broken files
def test_12bit_jpeg_extended_is_a_clear_error():
    # 12-bit JPEG Extended that no installed decoder reads
    path = get_testdata_file("JPEG-lossy.dcm", download=False)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert "JPEG-lossy.dcm" in message and "JPEG Extended" in message and "1.2.840.10008.1.2.4.51" in message
    assert "12-bit" in message


def test_truncated_pixel_data(tmp_path):
    good = make_dicom(tmp_path / "t.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), bits=16)
    data = open(good, "rb").read()
    (tmp_path / "trunc.dcm").write_bytes(data[: len(data) - 2000])
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "trunc.dcm")
    assert "trunc.dcm" in str(info.value) and "Explicit VR Little Endian" in str(info.value)


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_truncated_compressed_file(tmp_path):
    data = open(_rg1("RG1_J2KR.dcm"), "rb").read()
    (tmp_path / "j2k.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"j2k\.dcm.*JPEG 2000"):
        read_image(tmp_path / "j2k.dcm")


def test_no_pixel_data(tmp_path):
    path = make_dicom(tmp_path / "n.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ImageReadError, match=r"nopix\.dcm.*Explicit VR Little Endian.*no pixel data"):
        read_image(tmp_path / "nopix.dcm")


def test_voi_lut_sequence_is_used_before_window(tmp_path):
    stored = np.array([[0, 1], [2, 3]], np.uint16)
    lut_item = Dataset()
    lut_item.LUTDescriptor = [4, 0, 8]  # 4 entries, first stored value 0, 8-bit output
    lut_item.add_new(0x00283006, "US", [0, 200, 100, 50])  # LUTData; non-monotonic: only a LUT does this
    path = make_dicom(tmp_path / "lut.dcm", stored, bits=2, WindowCenter=1, WindowWidth=2,
                      VOILUTSequence=[lut_item])
    np.testing.assert_allclose(read_image(path).pixels, [[0.0, 1.0], [0.5, 0.25]], atol=1e-6)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_malformed_header_values_are_named_errors(tmp_path):
    """A header value that cannot be read as a number is the file's fault: ImageReadError, not ValueError."""
    import pydicom
    from test_prepare_common import write_dicom

    path = write_dicom(tmp_path / "bad_bits.dcm")
    ds = pydicom.dcmread(path)
    ds.BitsStored = 12
    ds.save_as(path)
    data = path.read_bytes()
    # BitsStored (0028,0101) US 12 -> change its VR to IS with a non-number (the length stays 2)
    patched = data.replace(b"\x28\x00\x01\x01US\x02\x00\x0c\x00", b"\x28\x00\x01\x01IS\x02\x00x!")
    assert patched != data
    path.write_bytes(patched)
    with pytest.raises(ImageReadError, match=r"bad_bits\.dcm \(transfer syntax .*\): unreadable image header"):
        read_image(path)
