import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd.data.tokenizer import build_tokenizer

SHARED = Path(__file__).resolve().parents[3] / "shared"
SQA_SAMPLE = SHARED / "scienceqa-sample"
SQA_REFERENCE = SHARED / "scienceqa-reference"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    texts = ["How many red circles are there? The answer is B. Give a brief description of the image."] * 20
    return build_tokenizer(tmp_path_factory.mktemp("tok"), texts, vocab_size=320)


def make_processor(size: int):
    def process(images: list[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(im.resize((size, size)), dtype=np.float32) / 255.0 for im in images]
        return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])

    return process


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_image(path: Path, colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path)
    return path
