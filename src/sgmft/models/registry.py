"""Model and fusion-module registries.

A model factory takes a :class:`~sgmft.config.ModelConfig` and returns an ``nn.Module``
whose ``forward(text, image, text_mask=None, image_mask=None)`` returns a
:class:`~sgmft.models.output.ModelOutput`.  A fusion factory takes the config and returns
a module mapping token tensors (B, n, d) x 2 to (B, out_dim), with an ``out_dim`` attribute.
"""

from sgmft.registry import Registry

MODELS: Registry = Registry("model")
FUSIONS: Registry = Registry("fusion module")


def build_model(cfg):
    """Instantiate the registered model ``cfg.arch`` (after validating the config)."""
    cfg.validate()
    return MODELS.get(cfg.arch)(cfg)


def list_models() -> list[str]:
    return MODELS.names()


def forward_batch(model, batch: dict):
    """Run a registered model on a batch dict (``text``, ``image``, optional ``*_mask``)."""
    return model(batch["text"], batch["image"], batch.get("text_mask"), batch.get("image_mask"))
