"""The variant names: which model each starts from (teacher, distilled or pruned student), which
recipe turns it into a file (ONNX fp32, fused, int8 dynamic/static, int8 with 4-bit embeddings,
TensorRT fp16/int8), and which
device it runs on.

Teacher variants keep their historical names (``onnx_fp32`` ... ``tensorrt_int8``). A student's
variants are ``<source>_<recipe>``: ``distilled_fp32``, ``distilled_fp32_fused``, ``distilled_int8``
(dynamic int8, the teacher's ``onnx_int8_dynamic`` recipe), ``distilled_int8_static``,
``distilled_int8_emb4``,
``distilled_tensorrt_fp16``, ``distilled_tensorrt_int8``, and the same with ``pruned_``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TORCH_FP32 = "torch_fp32"
ONNX_FP32 = "onnx_fp32"
ONNX_FP32_FUSED = "onnx_fp32_fused"
ONNX_INT8_DYNAMIC = "onnx_int8_dynamic"
ONNX_INT8_STATIC = "onnx_int8_static"
ONNX_INT8_EMB4 = "onnx_int8_emb4"
TENSORRT_FP16 = "tensorrt_fp16"
TENSORRT_INT8 = "tensorrt_int8"
ONNX_INT8 = ONNX_INT8_DYNAMIC
"""The int8 variant of earlier releases (dynamic quantization)."""

RECIPES = (ONNX_FP32, ONNX_FP32_FUSED, ONNX_INT8_DYNAMIC, ONNX_INT8_STATIC, ONNX_INT8_EMB4, TENSORRT_FP16,
           TENSORRT_INT8)
CPU_VARIANTS = (ONNX_FP32, ONNX_FP32_FUSED, ONNX_INT8_DYNAMIC, ONNX_INT8_STATIC, ONNX_INT8_EMB4)
TENSORRT_VARIANTS = (TENSORRT_FP16, TENSORRT_INT8)

TEACHER = "teacher"
DISTILLED = "distilled"
PRUNED = "pruned"
STUDENT_SOURCES = (DISTILLED, PRUNED)
STUDENT_RECIPE_SUFFIX = {
    ONNX_FP32: "fp32", ONNX_FP32_FUSED: "fp32_fused", ONNX_INT8_DYNAMIC: "int8", ONNX_INT8_STATIC: "int8_static",
    ONNX_INT8_EMB4: "int8_emb4", TENSORRT_FP16: "tensorrt_fp16", TENSORRT_INT8: "tensorrt_int8",
}
RECIPE_PRECISION = {
    ONNX_FP32: "fp32", ONNX_FP32_FUSED: "fp32", ONNX_INT8_DYNAMIC: "int8", ONNX_INT8_STATIC: "int8",
    ONNX_INT8_EMB4: "int8", TENSORRT_FP16: "fp16", TENSORRT_INT8: "int8",
}
RECIPE_FILES = {
    ONNX_FP32: "model_fp32.onnx", ONNX_FP32_FUSED: "model_fp32_fused.onnx",
    ONNX_INT8_DYNAMIC: "model_int8_dynamic.onnx", ONNX_INT8_STATIC: "model_int8_static.onnx",
    ONNX_INT8_EMB4: "model_int8_emb4.onnx",
    TENSORRT_FP16: "model_fp16.plan", TENSORRT_INT8: "model_int8.plan",
}
RUNTIME_DEVICE = {"onnxruntime": "cpu", "tensorrt": "cuda"}
"""Where each runtime's variants run: ONNX Runtime sessions here use the CPU execution provider;
TensorRT engines need a CUDA device."""


@dataclass(frozen=True)
class VariantSpec:
    """What a variant name means: the model it starts from and the recipe that builds its file."""

    name: str
    source: str
    recipe: str

    @property
    def runtime(self) -> str:
        return "tensorrt" if self.recipe in TENSORRT_VARIANTS else "onnxruntime"

    @property
    def device(self) -> str:
        return RUNTIME_DEVICE[self.runtime]

    @property
    def precision(self) -> str:
        return RECIPE_PRECISION[self.recipe]

    @property
    def file(self) -> str:
        prefix = "" if self.source == TEACHER else f"{self.source}_"
        return prefix + RECIPE_FILES[self.recipe]


def _all_specs() -> dict[str, VariantSpec]:
    specs = {recipe: VariantSpec(recipe, TEACHER, recipe) for recipe in RECIPES}
    for source in STUDENT_SOURCES:
        for recipe, suffix in STUDENT_RECIPE_SUFFIX.items():
            name = f"{source}_{suffix}"
            specs[name] = VariantSpec(name, source, recipe)
    return specs


VARIANTS: dict[str, VariantSpec] = _all_specs()
VARIANT_PRECISION = {name: spec.precision for name, spec in VARIANTS.items()}
VARIANT_FILES = {name: spec.file for name, spec in VARIANTS.items()}
FP32_FILE = VARIANT_FILES[ONNX_FP32]
INT8_FILE = VARIANT_FILES[ONNX_INT8_DYNAMIC]


def spec(name: str) -> VariantSpec:
    """The :class:`VariantSpec` of a variant name (``KeyError`` for an unknown one)."""
    return VARIANTS[name]


def fp32_variant(source: str) -> str:
    """The name of the plain fp32 ONNX export of a source model (every other recipe starts from it)."""
    return ONNX_FP32 if source == TEACHER else f"{source}_{STUDENT_RECIPE_SUFFIX[ONNX_FP32]}"


@dataclass
class Candidate:
    """One built variant: its file in the scratch directory, how it runs, and how it was made.

    ``build_seconds`` is the whole cost of this variant from the fine-tuned teacher: for a student's
    variant it includes training the student and exporting it, shared by that student's variants."""

    name: str
    file: str
    runtime: str
    precision: str
    recipe: dict[str, Any] = field(default_factory=dict)
    source: str = TEACHER
    build_seconds: float = 0.0

    @property
    def device(self) -> str:
        return RUNTIME_DEVICE[self.runtime]


def student_sources(names: list[str] | tuple[str, ...]) -> list[str]:
    """The students (``distilled``, ``pruned``) that at least one listed variant starts from."""
    return [source for source in STUDENT_SOURCES if any(VARIANTS[name].source == source for name in names)]
