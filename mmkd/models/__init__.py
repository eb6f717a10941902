"""Teachers and students behind one output contract; MoE upcycling; tiny presets; export."""

from mmkd.contract import CLIPOutput, ModelOutput
from mmkd.models.clip import CLIPModel
from mmkd.models.errors import ModelNotFoundError
from mmkd.models.inputs import ImageTextInputs
from mmkd.models.llava import LlavaModel
from mmkd.models.lora import AdaptersOff, LoRA, LoRAStudent
from mmkd.models.mllm import ImageTextModel
from mmkd.models.moe import UpcycleToMoE, count_parameters, upcycle_to_moe
from mmkd.models.student import MLLMStudent
from mmkd.models.vocab import align_vocab

__all__ = [
    "AdaptersOff",
    "CLIPModel",
    "CLIPOutput",
    "ImageTextInputs",
    "ImageTextModel",
    "LlavaModel",
    "LoRA",
    "LoRAStudent",
    "MLLMStudent",
    "ModelNotFoundError",
    "ModelOutput",
    "UpcycleToMoE",
    "align_vocab",
    "count_parameters",
    "upcycle_to_moe",
]
