"""Request and response schemas of the API, and the OpenAPI document built from them.

The request bodies are parsed by hand (multipart or JSON on one endpoint), so FastAPI does
not see them: :func:`openapi` adds them to ``components/schemas`` (every ``$ref`` resolves
against the document) and states the limits in force: ``maxLength`` / ``maxItems`` /
``minItems`` in the schemas, and all of them in ``info.x-limits``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

# Feature values: numbers only (no strings, no booleans), finite (no NaN, no Infinity), and within
# +-MAX_FEATURE_VALUE (the features are L2-normalised: every value is in [-1, 1]; far larger values
# would overflow float32 inside the model).
MAX_FEATURE_VALUE = 1e4
FeatureValue = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_FEATURE_VALUE,
                                      le=MAX_FEATURE_VALUE)]
MinConfidence = Optional[Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]]
_MC = ("below this probability of the top place the answer is marked uncertain (its probabilities are kept); "
       "default: the model's own setting (none: never uncertain)")


class PostIn(BaseModel):
    """One raw post. ``images``: base64 strings (a ``data:image/...;base64,`` prefix and MIME line
    breaks are allowed); never paths."""
    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="the post's raw text (may be empty when it has images)")
    images: list[str] = Field(default_factory=list, description="base64-encoded image files")
    on_bad_image: Literal["error", "skip"] = Field(
        "error", description="an image that cannot be used (not an image, empty, truncated, corrupt, over a "
                             "per-image limit): 'error' = 422/413; 'skip' = predict without it, with a warning")
    min_confidence: MinConfidence = Field(None, description=_MC)


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    posts: list[PostIn]
    min_confidence: MinConfidence = Field(None, description=_MC + " (a post's own setting wins)")


class FeaturePostIn(BaseModel):
    """One post as feature vectors from the run's backbone (L2-normalised, length D); null = missing."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    text: Optional[list[FeatureValue]] = None
    image: Optional[list[FeatureValue]] = None


class FeaturesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    posts: list[FeaturePostIn]
    min_confidence: MinConfidence = Field(None, description=_MC)
    explain: bool = Field(False, description="add each post's explanation (which modality decided); it costs "
                                             "two more model forwards, so it is off unless asked")


Verdict = Literal["shows_place", "generic", "other_place", "absent", "supports", "weak"]


class Explanation(BaseModel):
    """Which modality decided the prediction (issue 18): for TrustMix its posterior over the
    joint trust states, for other models the change in the top probability when the text or
    the image is masked out."""
    model_config = ConfigDict(extra="ignore")
    decided_by: Optional[Literal["text", "image", "both", "neither"]] = Field(
        None, description="the modality the prediction rests on")
    text: Optional[Verdict] = Field(None, description="what the text says about the place")
    image: Optional[Verdict] = Field(None, description="what the image says about the place")
    sentence: Optional[str] = Field(None, description="the same in one sentence for a person, e.g. "
                                                      "'Decided by the image; the text looks generic.'")
    method: Optional[Literal["trust_states", "masking"]] = Field(
        None, description="trust_states: TrustMix's posterior; masking: the drop in the top probability")
    scores: Optional[dict[str, float]] = Field(None, description="per modality: the evidence behind the verdict")


class PredictionOut(BaseModel):
    label: str = Field(description="the most probable place")
    prob: float = Field(description="its probability")
    probs: dict[str, float] = Field(description="every place's probability, in the model's label order")
    uncertain: bool = Field(False, description="prob is below min_confidence: act on this answer with care")
    explanation: Optional[Explanation] = Field(None, description="which modality decided (null when the model "
                                                                 "gives no account)")
    text_used: str = Field(description="the cleaned text the model saw ('' = none)")
    image_index: Union[int, list[int], None] = Field(
        description="which of the post's images (0-based, as sent) the image vector came from (a list with "
                    "image choice 'mean'; null = none)")
    image_name: Union[str, list[str], None] = Field(description="that image's file name (base64: 'image N')")
    text_mask: bool = Field(description="a text vector was used")
    image_mask: bool = Field(description="an image vector was used")
    warnings: list[str] = Field(description="missing modalities, skipped images")


class BatchOut(BaseModel):
    predictions: list[PredictionOut]


class FeaturePredictionOut(BaseModel):
    label: str
    prob: float
    probs: dict[str, float]
    uncertain: bool = False
    explanation: Optional[Explanation] = None
    text_mask: bool
    image_mask: bool
    warnings: list[str]


class FeaturesOut(BaseModel):
    predictions: list[FeaturePredictionOut]


class ErrorBody(BaseModel):
    code: str = Field(description="one code per cause (docs/serve.md lists them)")
    message: str = Field(description="a sentence for a person: what is wrong and what to do")
    field: Optional[str] = Field(None, description="the part of the request that is wrong (images[1], body, ...)")
    limit: Optional[Union[int, float]] = Field(None, description="the limit exceeded")
    hint: Optional[str] = Field(None, description="for the client's author or the server's operator")
    details: Optional[list[dict[str, Any]]] = None


class ErrorOut(BaseModel):
    error: ErrorBody


def form_schema(cfg) -> dict:
    return {"type": "object", "required": ["text"], "additionalProperties": False, "properties": {
        "text": {"type": "string", "maxLength": cfg.max_text_chars,
                 "description": "the post's raw text (may be empty)"},
        "images": {"type": "array", "maxItems": cfg.max_images_per_post,
                   "items": {"type": "string", "format": "binary"},
                   "description": f"image files (repeat the field), each at most {cfg.max_image_bytes} bytes and "
                                  f"{cfg.max_image_pixels} pixels"},
        "on_bad_image": {"type": "string", "enum": ["error", "skip"], "default": "error"},
        "min_confidence": {"type": "number", "minimum": 0, "maximum": 1, "description": _MC}}}


def _limits(schemas: dict, cfg, dim: int) -> None:
    """State the limits in the component schemas."""
    post = schemas["PostIn"]["properties"]
    post["text"]["maxLength"] = cfg.max_text_chars
    post["images"]["maxItems"] = cfg.max_images_per_post
    post["images"]["items"]["description"] = (f"base64 of an image file of at most {cfg.max_image_bytes} bytes "
                                              f"and {cfg.max_image_pixels} pixels")
    for name in ("BatchIn", "FeaturesIn"):
        schemas[name]["properties"]["posts"]["maxItems"] = cfg.max_batch_posts
    for m in ("text", "image"):
        for alt in schemas["FeaturePostIn"]["properties"][m]["anyOf"]:
            if alt.get("type") == "array":
                alt["minItems"] = alt["maxItems"] = dim


def openapi(app, cfg, dim: int) -> dict:
    """The app's OpenAPI document with the request schemas in components and the limits stated."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (PostIn, BatchIn, FeaturePostIn, FeaturesIn):
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in s.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas[model.__name__] = s
    _limits(schemas, cfg, dim)
    doc["info"]["x-limits"] = {**cfg.limits(), "feature_dim": dim}
    return doc


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}
