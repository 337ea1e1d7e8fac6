"""medclipin: medical vision-language pretraining with CLIPin.

Use a trained model::

    import medclipin
    model, processor = medclipin.load("runs/demo")    # a model, run or checkpoint folder
    model, processor = medclipin.load("open_clip:local-dir:biomedclip/")   # or a third-party CLIP
    medclipin.zero_shot(model, processor, ["chest.dcm"], "datasets/synthetic/prompts.yaml")

Train one: ``medclipin pretrain --config configs/cpu_clip_clipin.yaml --out runs/x`` (or
:func:`medclipin.train.trainer.pretrain`).
"""

__version__ = "0.2.0"

# The API imports torch and transformers; loaded on first use so `medclipin --help` stays quick.
_API = ("load", "load_processor", "resolve_model_dir", "embed_images", "embed_texts", "zero_shot", "ZeroShotResult",
        "retrieve", "Hit", "explain")


def __getattr__(name):
    if name in _API:
        from medclipin import api

        return getattr(api, name)
    if name in ("create_model", "list_models"):
        from medclipin.models import factory

        return getattr(factory, name)
    if name == "MedClipModel":
        from medclipin.models.model import MedClipModel

        return MedClipModel
    if name == "Processor":
        from medclipin.data.processor import Processor

        return Processor
    raise AttributeError(f"module 'medclipin' has no attribute {name!r}")


__all__ = ["__version__", "MedClipModel", "Processor", "create_model", "list_models", *_API]
