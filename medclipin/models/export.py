"""Export a medclipin model as an open_clip ``local-dir`` folder or a transformers ``CLIPModel`` folder.

The exported model embeds as medclipin's does: a CLIPin pre-projector and the projection after it fold into
one linear map (``W = W_proj · W_pre``; biases fold the same way and must vanish where the target format's
projection has none). What the target format cannot hold exactly is refused in one line naming why; nothing
is approximated.

* ``open_clip``: models whose towers are open_clip's (the ``open_clip`` family: started from an open_clip or
  OpenAI CLIP, BiomedCLIP, ...) → ``open_clip_config.json`` + ``open_clip_model.safetensors`` (+ the tokenizer
  for HF-tokenizer text towers), loaded by ``open_clip.create_model_and_transforms('local-dir:DIR')``.
* ``hf``: CLIP-architecture towers (the ``hf_clip`` family, or open_clip's ViT + causal text transformer) →
  ``config.json`` + ``model.safetensors`` + tokenizer + ``preprocessor_config.json``, loaded by
  ``transformers.CLIPModel.from_pretrained(DIR)``. Converting open_clip's layout is a renaming (the fused
  attention input projection split into q/k/v).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from medclipin.atomic import replace_directory
from medclipin.errors import MedclipinError

FORMATS = ("open_clip", "hf")


class ExportError(MedclipinError, ValueError):
    """A model cannot be exported exactly in the asked format; the message says why."""


def folded_projection(model, modality: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W (embed, width), b or None)`` of pre-projector ∘ projection as one linear map."""
    pre, proj = getattr(model, f"{modality}_pre"), getattr(model, f"{modality}_proj")
    weight, bias = proj.weight.detach().double(), None if proj.bias is None else proj.bias.detach().double()
    if isinstance(pre, torch.nn.Linear):
        pre_weight = pre.weight.detach().double()
        if pre.bias is not None:
            shift = weight @ pre.bias.detach().double()
            bias = shift if bias is None else bias + shift
        weight = weight @ pre_weight
    return weight.float(), None if bias is None else bias.float()


def _no_bias(model, modality: str, target: str) -> torch.Tensor:
    weight, bias = folded_projection(model, modality)
    if bias is not None and float(bias.abs().max()) > 0:
        raise ExportError(f"the {modality} projection has a bias ({float(bias.abs().max()):.2g}) and {target}'s has "
                          "none: only models started from a CLIP base (bias-free projections) export exactly")
    return weight


def export_model(model, processor, out: str | Path, fmt: str) -> Path:
    """Write ``model`` (+ its processor) into ``out`` in format ``fmt`` (``open_clip`` or ``hf``), atomically."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    writer = _write_open_clip if fmt == "open_clip" else _write_hf
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        writer(model.float().eval(), processor, staging, out.resolve())
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))


def _families(model) -> tuple[str, str]:
    return model.spec.image_encoder.family, model.spec.text_encoder.family


# ------------------------------------------------------------------------------------ open_clip
def _write_open_clip(model, processor, folder: Path, final: Path) -> None:
    image_family, text_family = _families(model)
    if (image_family, text_family) == ("timm", "hf"):
        return _write_open_clip_timm_hf(model, processor, folder, final)
    if (image_family, text_family) != ("open_clip", "open_clip"):
        raise ExportError(f"open_clip export covers open_clip towers and timm + BERT-family towers; this model's "
                          f"are {image_family} + {text_family}")
    import open_clip

    model_cfg = json.loads(json.dumps(model.spec.image_encoder.kwargs["model_cfg"]))
    if model.kind == "siglip":
        model_cfg["init_logit_bias"] = model.logit_bias.item()
    else:
        model_cfg.pop("init_logit_bias", None)
    state = {f"{k}": v for k, v in model.image_encoder.state_dict().items()}
    visual, text = model.image_encoder.visual, model.text_encoder.text
    weight = _no_bias(model, "image", "open_clip")
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        state["visual.proj"] = weight.T
    elif isinstance(visual, open_clip.timm_model.TimmModel) and model.image_encoder.projection_taken:
        state["visual.head.proj.weight"] = weight
    elif not torch.allclose(weight, torch.eye(weight.shape[0], weight.shape[1]), atol=0):
        raise ExportError("the image tower's head stays inside it and the model's image projection is no longer "
                          "the identity: open_clip has no place for it")
    text_weight = _no_bias(model, "text", "open_clip")
    text_state = model.text_encoder.state_dict()
    form = model.text_encoder.projection_form
    if form is None and not torch.allclose(text_weight, torch.eye(*text_weight.shape), atol=0):
        raise ExportError("the text tower's head stays inside it and the model's text projection is no longer the "
                          "identity: open_clip has no place for it")
    if model.text_encoder.is_hf:
        state.update(text_state)
        if form == "linear":
            state["text.proj.weight"] = text_weight
        text_cfg = model_cfg["text_cfg"]
        # open_clip builds the HF text model from hf_model_name's config.json; the folder carries it
        (folder / "config.json").write_text(json.dumps(model.text_encoder.hf_config(), indent=2))
        processor.tokenizer.save_pretrained(str(folder))
        text_cfg.update(hf_model_name=str(final), hf_tokenizer_name=str(final), hf_model_pretrained=False)
    else:
        state.update({k[len("text."):]: v for k, v in text_state.items()})
        if form == "parameter":
            state["text_projection"] = text_weight.T
        elif form == "linear":
            state["text_projection.weight"] = text_weight
    state["logit_scale"] = model.logit_scale.detach().reshape(())
    if model.kind == "siglip":
        state["logit_bias"] = model.logit_bias.detach().reshape(())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                             "preprocess_cfg": _preprocess_cfg(processor)}, indent=2))
    _save(state, folder / "open_clip_model.safetensors")


def _preprocess_cfg(processor) -> dict:
    image_cfg = processor.image_cfg
    mean = list(image_cfg.mean) * (3 if len(image_cfg.mean) == 1 else 1)
    std = list(image_cfg.std) * (3 if len(image_cfg.std) == 1 else 1)
    return {"size": int(image_cfg.size), "mode": "RGB", "mean": mean, "std": std, "interpolation": "bicubic",
            "resize_mode": "shortest"}


def _write_open_clip_timm_hf(model, processor, folder: Path, final: Path) -> None:
    """A timm image tower + HF BERT-family text tower → open_clip's ``CustomTextCLIP`` (``TimmModel`` +
    ``HFTextEncoder``).

    Exact by construction: a one-channel stem becomes a three-channel one with a third of the weights in each
    channel (open_clip feeds grey images as three equal channels); the image projection keeps its bias
    (``timm_proj_bias``); the text projection of ``HFTextEncoder`` has no bias, so the folded bias ``b`` moves
    into the bias of the text model's last LayerNorm as ``δβ = W⁺ b`` (``W δβ = b``): every pooled feature
    (CLS or masked mean of that layer's output) shifts by ``δβ`` and ``W`` maps the shift onto ``b``.
    """
    image, text = model.image_encoder, model.text_encoder
    encoder_cfg = model.spec.image_encoder
    if encoder_cfg.kwargs:
        raise ExportError(f"open_clip's TimmModel builds timm models without extra arguments; this tower has "
                          f"{sorted(encoder_cfg.kwargs)}")
    from medclipin.models.encoders import is_vit_like

    default_size = (image.model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[-1]
    if is_vit_like(image.model) and int(default_size) != image.image_size:
        raise ExportError(f"open_clip's TimmModel builds {encoder_cfg.name} at {default_size} px; this ViT runs at "
                          f"{image.image_size} px")
    pooling = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}[text.pooling]
    state = {f"visual.trunk.{k}": v for k, v in image.model.state_dict().items()}
    first_conv = (image.model.pretrained_cfg or {}).get("first_conv")
    stem = state.get(f"visual.trunk.{first_conv}.weight") if first_conv else None
    if image.in_chans == 1 and image.replicate_channels == 1:
        if stem is None or stem.shape[1] != 1:
            raise ExportError(f"cannot find the one-channel stem of {encoder_cfg.name} to widen to three channels")
        state[f"visual.trunk.{first_conv}.weight"] = (stem / 3).repeat(1, 3, 1, 1)
    weight, bias = folded_projection(model, "image")
    state["visual.head.proj.weight"] = weight
    state["visual.head.proj.bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
    hf_config = text.hf_config()
    text_state = {f"text.transformer.{k}": v for k, v in text.model.state_dict().items()}
    text_weight, text_bias = folded_projection(model, "text")
    if text_bias is not None and float(text_bias.abs().max()) > 0:
        layers = int(hf_config.get("num_hidden_layers", 0))
        key = f"text.transformer.encoder.layer.{layers - 1}.output.LayerNorm.bias"
        if key not in text_state or text_weight.shape[0] > text_weight.shape[1]:
            raise ExportError("the text projection's bias has no exact place in open_clip's HFTextEncoder (no final "
                              "LayerNorm to absorb it, or a joint space wider than the text tower)")
        shift = torch.linalg.pinv(text_weight.double()) @ text_bias.double()
        text_state[key] = (text_state[key].double() + shift).float()
    state.update(text_state)
    state["text.proj.weight"] = text_weight
    state["logit_scale"] = model.logit_scale.detach().reshape(())
    model_cfg = {
        "embed_dim": model.embed_dim,
        "vision_cfg": {"timm_model_name": encoder_cfg.name, "timm_model_pretrained": False,
                       "timm_pool": "token" if is_vit_like(image.model) else "avg", "timm_proj": "linear",
                       "timm_proj_bias": True, "image_size": image.image_size},
        "text_cfg": {"hf_model_name": str(final), "hf_tokenizer_name": str(final), "hf_model_pretrained": False,
                     "hf_proj_type": "linear", "hf_pooler_type": pooling,
                     "context_length": int(processor.text_cfg.max_length)},
    }
    if model.kind == "siglip":
        model_cfg["init_logit_bias"] = model.logit_bias.item()
        state["logit_bias"] = model.logit_bias.detach().reshape(())
    # open_clip builds the HF text model from hf_model_name's config.json and tokenizer: the folder carries both
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    processor.tokenizer.save_pretrained(str(folder))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                             "preprocess_cfg": _preprocess_cfg(processor)}, indent=2))
    _save(state, folder / "open_clip_model.safetensors")


# ------------------------------------------------------------------------------------------- hf
def _write_hf(model, processor, folder: Path, final: Path) -> None:
    from transformers import CLIPConfig

    image_family, text_family = _families(model)
    if image_family == "hf_clip" and text_family == "hf_clip":
        vision_config = dict(model.spec.image_encoder.kwargs["vision_config"])
        text_config = dict(model.spec.text_encoder.config["text_config"])
        state = {**{k: v for k, v in model.image_encoder.state_dict().items()},
                 **{k: v for k, v in model.text_encoder.state_dict().items()}}
    elif image_family == "open_clip" and text_family == "open_clip":
        vision_config, text_config, state = _open_clip_to_hf(model)
    else:
        raise ExportError(f"hf export needs CLIP-architecture towers (ViT + causal text transformer); this model's "
                          f"are {image_family} + {text_family} (a {model.spec.image_encoder.name} tower has no "
                          "place in transformers' CLIPModel)")
    state["visual_projection.weight"] = _no_bias(model, "image", "transformers' CLIPModel")
    state["text_projection.weight"] = _no_bias(model, "text", "transformers' CLIPModel")
    state["logit_scale"] = model.logit_scale.detach().reshape(())
    if model.kind == "siglip":
        raise ExportError("a SigLIP-trained model has a logit bias that transformers' CLIPModel cannot hold; "
                          "export it with --format open_clip")
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=model.embed_dim,
                        logit_scale_init_value=model.logit_scale.item())
    config.architectures = ["CLIPModel"]
    (folder / "config.json").write_text(config.to_json_string())
    _save(state, folder / "model.safetensors")
    processor.tokenizer.save_pretrained(str(folder))
    image_cfg = processor.image_cfg
    size = int(image_cfg.size)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_normalize": True,
        "image_mean": list(image_cfg.mean), "image_std": list(image_cfg.std), "do_convert_rgb": True,
        "resample": 3, "rescale_factor": 1 / 255, "do_rescale": True}, indent=2))


def _act_name(model_cfg: dict) -> str:
    return "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"


def _open_clip_to_hf(model) -> tuple[dict, dict, dict]:
    """open_clip ViT + text transformer → HF CLIP configs and state dict (a renaming, q/k/v split)."""
    import open_clip

    visual, text = model.image_encoder.visual, model.text_encoder.text
    model_cfg = model.spec.image_encoder.kwargs["model_cfg"]
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    plain_vit = (isinstance(visual, open_clip.transformer.VisionTransformer) and visual.attn_pool is None
                 and getattr(visual, "pool_type", "tok") == "tok" and not isinstance(visual.ln_pre, torch.nn.Identity)
                 and not vision_cfg.get("ls_init_value") and not vision_cfg.get("final_ln_after_pool"))
    plain_text = (not model.text_encoder.is_hf and getattr(text, "pool_type", "argmax") in ("argmax", "eos")
                  and not text_cfg.get("ls_init_value") and not text_cfg.get("no_causal_mask"))
    if not (plain_vit and plain_text):
        raise ExportError("hf export covers OpenAI-CLIP-shaped open_clip models (class-token ViT, causal text "
                          "transformer pooled at end-of-text); this one differs: use --format open_clip")
    act = _act_name(model_cfg)
    width, layers = int(vision_cfg["width"]), int(vision_cfg["layers"])
    vision_config = {
        "hidden_size": width, "intermediate_size": int(width * vision_cfg.get("mlp_ratio", 4.0)),
        "num_hidden_layers": layers, "num_attention_heads": width // int(vision_cfg.get("head_width", 64)),
        "image_size": int(vision_cfg.get("image_size", 224)), "patch_size": int(vision_cfg["patch_size"]),
        "num_channels": 3, "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": model.embed_dim}
    t_width = int(text_cfg.get("width", 512))
    text_config = {
        "vocab_size": int(text_cfg.get("vocab_size", 49408)), "hidden_size": t_width,
        "intermediate_size": int(t_width * text_cfg.get("mlp_ratio", 4.0)),
        "num_hidden_layers": int(text_cfg.get("layers", 12)), "num_attention_heads": int(text_cfg.get("heads", 8)),
        "max_position_embeddings": int(text_cfg.get("context_length", 77)), "hidden_act": act, "layer_norm_eps": 1e-5,
        "projection_dim": model.embed_dim, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    state: dict[str, torch.Tensor] = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight, "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": text.positional_embedding,
        "text_model.final_layer_norm.weight": text.ln_final.weight, "text_model.final_layer_norm.bias": text.ln_final.bias,
    }
    for prefix, blocks in (("vision_model", visual.transformer.resblocks), ("text_model", text.transformer.resblocks)):
        for i, block in enumerate(blocks):
            out = f"{prefix}.encoder.layers.{i}"
            for name, weight in zip(("q", "k", "v"), block.attn.in_proj_weight.chunk(3)):
                state[f"{out}.self_attn.{name}_proj.weight"] = weight
            for name, bias in zip(("q", "k", "v"), block.attn.in_proj_bias.chunk(3)):
                state[f"{out}.self_attn.{name}_proj.bias"] = bias
            pairs = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
            for source, target in pairs:
                module = block.get_submodule(source)
                state[f"{out}.{target}.weight"], state[f"{out}.{target}.bias"] = module.weight, module.bias
    return vision_config, text_config, state
