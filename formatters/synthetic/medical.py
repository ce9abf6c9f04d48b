"""Tiny medical datasets in their real release formats (VQA-RAD, SLAKE, PMC-VQA, PathVQA, DICOM).

Each writer documents exactly what it writes, so tests can reason about the expected records
independently of the formatter. Images are small solid-colour pictures (distinct per file).
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

# ------------------------------------------------------------------------------------------- images


def _picture(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A small RGB picture, different per seed (so a wrong file shows up)."""
    colour = ((seed * 53) % 256, (seed * 97) % 256, (seed * 151) % 256)
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], 0, 0), (0, 0, size[0] // 2, size[1] // 2))
    return image


def _save_picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _picture(seed).save(path)


def _encoded(seed: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    _picture(seed).save(buffer, format=fmt)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ VQA-RAD


def write_vqa_rad(root: str | Path) -> Path:
    """`VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/` as released. Returns the json path.

    Rows: 0 closed yes ("freeform"), 1 closed "left" (not yes/no), 2 open "brain" (test_freeform),
    3 open with the int answer 2 (test_para), 4 an image that does not exist, 5 an empty answer.
    """
    root = Path(root)
    images = root / "VQA_RAD Image Folder"
    _save_picture(images / "synpic100.jpg", 1)
    _save_picture(images / "synpic200.jpg", 2)
    rows = [
        {"qid": 1, "image_name": "synpic100.jpg", "image_case_url": "https://medpix.example/1",
         "image_organ": "CHEST", "answer": "yes", "answer_type": "CLOSED", "question_type": "PRES",
         "question": "Is there a pneumothorax?", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic100.jpg", "image_organ": "CHEST", "answer": "left",
         "answer_type": "CLOSED ", "question_type": "POS", "question": "Which lung is collapsed, left or right?",
         "phrase_type": "para"},
        {"qid": 3, "image_name": "synpic200.jpg", "image_organ": "HEAD", "answer": "brain",
         "answer_type": "OPEN", "question_type": "ORGAN", "question": "What organ is shown?",
         "phrase_type": "test_freeform"},
        {"qid": 4, "image_name": "synpic200.jpg", "image_organ": "HEAD", "answer": 2, "answer_type": "OPEN",
         "question_type": "COUNT", "question": "How many lesions are seen?", "phrase_type": "test_para"},
        {"qid": 5, "image_name": "synpic999.jpg", "image_organ": "ABD", "answer": "no", "answer_type": "CLOSED",
         "question": "Is the liver enlarged?", "phrase_type": "freeform"},
        {"qid": 6, "image_name": "synpic100.jpg", "image_organ": "CHEST", "answer": "", "answer_type": "OPEN",
         "question": "What is abnormal?", "phrase_type": "freeform"},
    ]
    path = root / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------- SLAKE


def _slake_row(qid: int, img: str, lang: str, question: str, answer: str, answer_type: str) -> dict:
    return {"img_id": int(img.split("/")[0].removeprefix("xmlab")), "img_name": img, "question": question,
            "answer": answer, "q_lang": lang, "location": "Abdomen", "modality": "CT",
            "answer_type": answer_type, "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"],
            "qid": qid}


def write_slake(root: str | Path) -> Path:
    """A Slake1.0 folder: train/validate/test json + imgs/xmlabN/source.jpg. Returns the folder.

    train.json: 3 English rows (open "CT", closed "Yes", and one whose image is missing) and 2
    Chinese rows. validate.json: 1 English row. test.json: 1 English + 1 Chinese row.
    """
    root = Path(root)
    for n in range(3):
        _save_picture(root / "imgs" / f"xmlab{n}" / "source.jpg", 10 + n)
    train = [
        _slake_row(100, "xmlab0/source.jpg", "en", "What modality is used to take this image?", "CT", "OPEN"),
        _slake_row(101, "xmlab0/source.jpg", "zh", "这张图片是用什么模态拍摄的？", "CT", "OPEN"),
        _slake_row(102, "xmlab1/source.jpg", "en", "Does the picture contain liver?", "Yes", "CLOSED"),
        _slake_row(103, "xmlab1/source.jpg", "zh", "图片中包含肝脏吗？", "是", "CLOSED"),
        _slake_row(104, "xmlab7/source.jpg", "en", "Is this a CT image?", "Yes", "CLOSED"),
    ]
    validate = [_slake_row(200, "xmlab2/source.jpg", "en", "Where is the liver?", "Left", "OPEN")]
    test = [_slake_row(300, "xmlab2/source.jpg", "en", "Which organ is the largest?", "Liver", "OPEN"),
            _slake_row(301, "xmlab2/source.jpg", "zh", "最大的器官是什么？", "肝脏", "OPEN")]
    for name, rows in (("train", train), ("validate", validate), ("test", test)):
        (root / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------ PMC-VQA


def write_pmc_vqa(root: str | Path, *, answer_column: str = "Answer") -> Path:
    """`train.csv` + `images/` with the answer column spelled `answer_column` ("Answer" or the
    release's "Anwser"). Returns the csv path.

    Lines (header = 1): 2 "A:"-prefixed choices, label B; 3 plain choices, label C; 4 no label,
    answer text = choice D; 5 no label and an answer matching no choice; 6 a missing figure.
    """
    root = Path(root)
    _save_picture(root / "images" / "PMC100_fig1.jpg", 20)
    _save_picture(root / "images" / "PMC200_fig2.jpg", 21)
    header = ["Figure_path", "Question", answer_column, "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    rows = [
        ["PMC100_fig1.jpg", "What imaging modality was used?", "MRI", " A:CT ", " B:MRI ", " C:X-ray ",
         " D:Ultrasound ", "B"],
        ["PMC200_fig2.jpg", "Where is the lesion located?", "Right lobe", "Left lobe", "Hilum", "Right lobe",
         "Apex", "C"],
        ["PMC200_fig2.jpg", "What does the arrow indicate?", "Calcification", "A: Mass", "B: Cyst",
         "C: Edema", "D: Calcification", ""],
        ["PMC100_fig1.jpg", "What is the staining method?", "Giemsa", "A: H&E", "B: PAS", "C: Trichrome",
         "D: Silver", ""],
        ["PMC999_missing.jpg", "Which view is shown?", "Axial", "A: Axial", "B: Coronal", "C: Sagittal",
         "D: Oblique", "A"],
    ]
    path = root / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------ PathVQA


def write_pathvqa_parquet(root: str | Path) -> Path:
    """The parquet mirror: `data/train-0000{0,1}-of-00002.parquet` + `data/test-00000-of-00001.parquet`.

    train-00000: image as {"bytes", "path"} structs: PNG "yes", JPEG open answer, corrupt bytes.
    train-00001: image as plain binary: PNG "no". test-00000: one row. Returns the folder.
    Needs a pyarrow that imports (pyarrow 26 needs numpy 2).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = Path(root) / "data"
    data.mkdir(parents=True, exist_ok=True)
    struct_rows = {
        "image": [{"bytes": _encoded(30, "PNG"), "path": None}, {"bytes": _encoded(31, "JPEG"), "path": None},
                  {"bytes": b"not an image at all", "path": None}],
        "question": ["Is there necrosis?", "What type of stain is shown?", "Is this benign?"],
        "answer": ["yes", "hematoxylin and eosin", "no"],
    }
    pq.write_table(pa.table(struct_rows), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"image": [_encoded(32, "PNG")], "question": ["Are mitoses present?"],
                             "answer": ["no"]}), data / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"image": [{"bytes": _encoded(33, "PNG"), "path": None}],
                             "question": ["What organ is this?"], "answer": ["liver"]}),
                   data / "test-00000-of-00001.parquet")
    return Path(root)


def write_pathvqa_pickle(root: str | Path) -> Path:
    """The original layout: `pvqa/qas/train/train_qa.pkl` (list of {image, question, answer}, image =
    file stem) + `pvqa/images/train/<stem>.jpg`. Rows: "yes", open answer. Returns the pkl path."""
    pvqa = Path(root) / "pvqa"
    _save_picture(pvqa / "images" / "train" / "train_0000.jpg", 40)
    _save_picture(pvqa / "images" / "train" / "train_0001.jpg", 41)
    rows = [{"image": "train_0000", "question": "Is this tissue inflamed?", "answer": "yes"},
            {"image": "train_0001", "question": "What cells are shown?", "answer": "neutrophils"}]
    path = pvqa / "qas" / "train" / "train_qa.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(rows))
    return path


# -------------------------------------------------------------------------------------------- DICOM

# CT fixture: Hounsfield units per pixel; stored = (HU - intercept) / slope with slope 0.5, so a
# reader that ignores the slope gets visibly wrong grey levels.
CT_HU = np.array([[-1000, -600, -160, 40, 140],
                  [240, 400, 1000, 0, -100],
                  [-1000, -600, -160, 40, 140],
                  [240, 400, 1000, 0, -100]], dtype=np.int32)
CT_SLOPE, CT_INTERCEPT = 0.5, -1024.0
CT_WINDOW = (40.0, 400.0)
CR_VALUES = np.array([[0, 2048, 4095], [4095, 2048, 0]], dtype=np.uint16)  # MONOCHROME1, window 2048/4096
MULTIFRAME_VALUES = (100, 200, 300)  # one constant value per frame, window 200/200
VOI_LUT = [0, 1000, 3000, 4000]  # VOI LUT Sequence over stored values 0..3
US_RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)


def _dicom(path: Path, sop_class: str, modality: str, pixels: np.ndarray | None, **elements) -> None:
    """Write a Part-10 file (preamble, file meta, explicit VR little endian) with the given pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = modality, "ANON0001", "Anonymous^Patient"
    if pixels is not None:  # (rows, cols) grey, (frames, rows, cols) grey, or (rows, cols, 3) uint8 colour
        colour = pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.Rows, ds.Columns = pixels.shape[:2] if colour or pixels.ndim == 2 else pixels.shape[1:]
        if pixels.ndim == 3 and not colour:
            ds.NumberOfFrames = pixels.shape[0]
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def write_dicom_folder(root: str | Path) -> Path:
    """A folder of DICOM files + `labels.csv` (file,label) and `qa.csv` (file,question,answer).

    - ct.dcm: CT, MONOCHROME2, CT_HU stored with slope 0.5 / intercept -1024, window 40/400.
    - cr.dcm: CR, MONOCHROME1, 12-bit CR_VALUES, window 2048/4096, no rescale.
    - mr_multiframe.dcm: MR, 3 frames of MULTIFRAME_VALUES, window 200/200.
    - mr_voilut.dcm: MR, stored 0..3 with a VOI LUT Sequence VOI_LUT (and a window it must not use).
    - us_rgb.dcm: US, 8-bit RGB US_RGB (colour: no windowing).
    - nopixels.dcm: a valid DICOM dataset without pixel data. not_dicom.dcm: plain text.
    labels.csv also names missing.dcm. Returns the folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stored = np.rint((CT_HU - CT_INTERCEPT) / CT_SLOPE).astype(np.uint16)
    _dicom(root / "ct.dcm", CTImageStorage, "CT", stored, PhotometricInterpretation="MONOCHROME2",
           BitsStored=12, HighBit=11, RescaleSlope=CT_SLOPE, RescaleIntercept=CT_INTERCEPT, RescaleType="HU",
           WindowCenter=CT_WINDOW[0], WindowWidth=CT_WINDOW[1])
    _dicom(root / "cr.dcm", ComputedRadiographyImageStorage, "CR", CR_VALUES, PhotometricInterpretation="MONOCHROME1",
           BitsStored=12, HighBit=11, WindowCenter=2048, WindowWidth=4096)
    frames = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in MULTIFRAME_VALUES])
    _dicom(root / "mr_multiframe.dcm", MRImageStorage, "MR", frames, PhotometricInterpretation="MONOCHROME2",
           BitsStored=16, HighBit=15, WindowCenter=200, WindowWidth=200)
    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [len(VOI_LUT), 0, 16])  # ambiguous VRs (US/SS, US/OW): say which
    lut.add_new("LUTData", "US", VOI_LUT)
    _dicom(root / "mr_voilut.dcm", MRImageStorage, "MR", np.array([[0, 1], [2, 3]], dtype=np.uint16),
           PhotometricInterpretation="MONOCHROME2", BitsStored=16, HighBit=15, VOILUTSequence=[lut],
           WindowCenter=1, WindowWidth=1)
    _dicom(root / "us_rgb.dcm", UltrasoundImageStorage, "US", US_RGB, PhotometricInterpretation="RGB",
           BitsStored=8, HighBit=7)
    _dicom(root / "nopixels.dcm", CTImageStorage, "CT", None)
    (root / "not_dicom.dcm").write_text("this is a text file, not DICOM\n", encoding="utf-8")
    labels = [("ct.dcm", "normal"), ("cr.dcm", "fracture"), ("mr_multiframe.dcm", "normal"),
              ("mr_voilut.dcm", "tumour"), ("us_rgb.dcm", "normal"), ("nopixels.dcm", "normal"), ("not_dicom.dcm", "normal"),
              ("missing.dcm", "fracture")]
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("file", "label"), *labels])
    qa = [("ct.dcm", "Is there a fracture?", "no"), ("cr.dcm", "Which bone is imaged?", "radius")]
    with open(root / "qa.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("file", "question", "answer"), *qa])
    return root
