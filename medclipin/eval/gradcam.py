"""Multimodal Grad-CAM: which image regions and which report words drive an image–text match.

Score: the cosine similarity of the contrastive embeddings, s(x, t) = c_I(x)·c_T(t), so CLIP and
CLIP+CLIPin maps are comparable.

- Image side: Grad-CAM (pytorch-grad-cam) with a target that is the similarity to the text
  embedding. For a ViT the layer is the *input* of the last block (``blocks[-1].norm1``) reshaped to
  the patch grid: with class-token pooling the last block's patch *outputs* never reach the pooled
  feature, so their gradient is zero. α_c = mean ∂s/∂A_c, CAM = ReLU(Σ α_c A_c), upsampled, normalised.
- Text side: gradient × activation on the input of the last text block, summed over channels,
  ReLU, special and padding tokens masked, word pieces merged into words.
- Localisation: pointing game (is the CAM maximum inside the lesion box?) and IoU of the CAM
  thresholded at a fraction of its maximum with the box.

What the colours mean: where a change of the image would most raise the similarity to the text, for
this model — not where disease is, and not a segmentation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medclipin.models.model import MedClipModel


class _ImageEmbedder(nn.Module):
    def __init__(self, model: MedClipModel):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


class SimilarityTarget:
    """pytorch-grad-cam target: cosine similarity of the image embedding to a fixed text embedding."""

    def __init__(self, text_embedding: torch.Tensor):
        self.text_embedding = text_embedding

    def __call__(self, image_embedding: torch.Tensor) -> torch.Tensor:
        return (image_embedding * self.text_embedding.to(image_embedding.device)).sum(-1)


@dataclass
class TextRelevance:
    words: list[str]  # whitespace-separated words of the text (punctuation stays with its word)
    scores: np.ndarray  # (n_words,) in [0, 1]: ReLU(signed) / max; all 0 when no word raises the match
    signed: np.ndarray | None = None  # (n_words,) gradient × activation before the ReLU (negative = lowers it)

    @property
    def any_positive(self) -> bool:
        return bool(self.scores.size and self.scores.max() > 0)


# name → pytorch-grad-cam class. HiResCAM (Draelos & Carin 2020) multiplies gradients and activations
# element-wise instead of averaging the gradients per channel first, which makes it faithful: it shows
# the locations the score was computed from. On the demo model it also localises far better (pointing
# game 0.42 against Grad-CAM's 0.24 on the same layer; docs/evaluation.md).
CAM_METHODS = {"hirescam": "HiResCAM", "gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM"}
DEFAULT_CAM_METHOD = "hirescam"


def image_cam(model: MedClipModel, images: torch.Tensor, text_embeddings: torch.Tensor,
              method: str = DEFAULT_CAM_METHOD) -> np.ndarray:
    """(B, S, S) class-activation maps in [0, 1] of each image w.r.t. its text embedding (rows paired).

    Args:
        method: ``hirescam`` (default), ``gradcam``, ``gradcam++`` or ``layercam`` (pytorch-grad-cam).
    """
    import pytorch_grad_cam

    if method not in CAM_METHODS:
        raise ValueError(f"CAM method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    cam_class = getattr(pytorch_grad_cam, CAM_METHODS[method])
    layer, reshape = model.image_encoder.gradcam_layer()
    was_training = model.training
    model.eval()
    try:
        with _gradient_from(model, layer), \
                cam_class(model=_ImageEmbedder(model), target_layers=[layer], reshape_transform=reshape) as cam:
            maps = cam(input_tensor=images, targets=[SimilarityTarget(t) for t in text_embeddings])
    finally:
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


class _gradient_from:
    """Context: the backward runs from the score down to ``layer``'s output and no further.

    Grad-CAM reads only the gradient at its layer, yet a backward through a model whose parameters require
    grad computes every weight gradient below it too. Inside this context no parameter of ``model``
    requires grad, and ``layer``'s output is made a leaf that does, so autograd records only the layers
    above it: the same maps, without the weight gradients. Registered before pytorch-grad-cam's own hooks,
    so they see the leaf."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        self.model, self.layer = model, layer

    def __enter__(self):
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for parameter, _ in self.saved:
            parameter.requires_grad_(False)
        self.hook = self.layer.register_forward_hook(self._leaf)
        return self

    @staticmethod
    def _leaf(module, args, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Grad-CAM layer {type(module).__name__} returns {type(output).__name__}, not a tensor")
        return output.detach().requires_grad_(True)

    def __exit__(self, *exc):
        self.hook.remove()
        for parameter, flag in self.saved:
            parameter.requires_grad_(flag)
        return False


def text_relevance(model: MedClipModel, processor, image: torch.Tensor, text: str) -> TextRelevance:
    """Per-word relevance of ``text`` for its similarity to one image (C, S, S), tokenised by the processor."""
    model.eval()
    encoded = processor.encode_words(text)
    device = next(model.parameters()).device
    input_ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    with torch.no_grad():
        image_embedding = model.encode_image(image[None].to(device))
    with torch.enable_grad():
        pooled, layer_input = model.text_encoder(input_ids, mask, return_hidden=True)
        layer_input.retain_grad()
        text_embedding = model.project_text(model.text_pre(pooled))
        (text_embedding * image_embedding).sum().backward()
    token_scores = (layer_input.grad * layer_input).sum(-1)[0].detach().cpu().numpy()
    special = set(processor.tokenizer.all_special_ids)
    ids = input_ids[0].tolist()
    word_ids = encoded.word_ids(0)
    words: dict[int, list[int]] = {}
    for position, (token_id, word) in enumerate(zip(ids, word_ids)):
        if token_id in special or word is None:
            continue
        words.setdefault(word, []).append(position)
    # the tokenizer's "words" split punctuation off; show what the reader wrote: pieces not separated
    # by whitespace (e.g. "effusion" + ".") form one displayed word, scored by the sum of its tokens
    pieces: list[str] = []
    signed: list[float] = []
    last_end = None
    for word, positions in words.items():
        span = encoded.word_to_chars(0, word)
        value = float(token_scores[positions].sum())
        if last_end is not None and span.start == last_end and pieces:
            pieces[-1] += text[span.start:span.end]
            signed[-1] += value
        else:
            pieces.append(text[span.start:span.end])
            signed.append(value)
        last_end = span.end
    signed_arr = np.asarray(signed, dtype=np.float32)
    scores_arr = np.clip(signed_arr, 0, None)
    if scores_arr.size and scores_arr.max() > 0:
        scores_arr = scores_arr / scores_arr.max()
    model.zero_grad(set_to_none=True)
    return TextRelevance(words=pieces, scores=scores_arr, signed=signed_arr)


def box_to_input(box, geometry, source_side: int, size: int) -> tuple[float, float, float, float]:
    """Map a box in original-image pixels to model-input pixels.

    Args:
        geometry: the :class:`~medclipin.data.geometry.GeometryInfo` of the loaded image (crop, scale, pad).
        source_side: side of the geometry-normalised image (the cache's size, or the configured size).
        size: the model's input size (the evaluation transform resizes source_side → size).
    """
    factor = size / source_side
    (x0, y0), (x1, y1) = geometry.to_output(box[:2]), geometry.to_output(box[2:])
    return (x0 * factor, y0 * factor, x1 * factor, y1 * factor)


# The pointing game of Zhang et al. (2018, "Top-down neural attention by excitation backprop") counts a hit
# when the map's maximum lies within 15 pixels of the annotated region, in pixels of the original image.
POINTING_TOLERANCE_PX = 15.0


def pointing_game_hit(cam: np.ndarray, box, tolerance: float = 0.0) -> bool:
    """True when the CAM's maximum lies inside ``box`` (x0, y0, x1, y1; input pixels) grown by ``tolerance``."""
    if not cam.size or cam.max() <= 0:
        return False  # an all-zero map points nowhere
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    x0, y0, x1, y1 = box
    return (x0 - tolerance) <= x + 0.5 <= (x1 + tolerance) and (y0 - tolerance) <= y + 0.5 <= (y1 + tolerance)


def cam_box_iou(cam: np.ndarray, box, threshold: float = 0.5) -> float:
    """IoU of {CAM ≥ threshold·max} with the box region."""
    mask = cam >= threshold * cam.max() if cam.max() > 0 else np.zeros_like(cam, dtype=bool)
    box_mask = np.zeros_like(mask)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    box_mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    union = np.logical_or(mask, box_mask).sum()
    return float(np.logical_and(mask, box_mask).sum() / union) if union else 0.0


def save_gradcam_figure(path: str | Path, image: np.ndarray, cam: np.ndarray, relevance: TextRelevance | None,
                        title: str = "", box=None, boxes=None, image_title: str = "image",
                        text_title: str = "which words drive the match",
                        map_title: str = "where the match comes from") -> Path:
    """One PNG for people: the image, the overlay, and the text with words shaded by relevance.

    Args:
        image: (H, W) or (H, W, 3) in [0, 1]; ``cam`` (H, W) in [0, 1] on the same pixel grid.
        box / boxes: one or several (x0, y0, x1, y1) rectangles in the same pixels (drawn in green).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = 3 if relevance is not None else 2
    fig, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 4.6), dpi=110)
    colour = image.ndim == 3
    axes[0].imshow(image, cmap=None if colour else "gray", vmin=0, vmax=1)
    axes[0].set_title(image_title)
    axes[1].imshow(image.mean(-1) if colour else image, cmap="gray", vmin=0, vmax=1)
    # near-zero contribution is left uncoloured, so the anatomy stays visible under the map
    shown = axes[1].imshow(np.ma.masked_less(cam, 0.05), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    axes[1].set_title(map_title)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04, label="relative contribution")
    for rect in ([box] if box is not None else []) + list(boxes or []):
        for ax in axes[:2]:
            x0, y0, x1, y1 = rect
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.5))
    for ax in axes[:2]:
        ax.axis("off")
    if relevance is not None:
        axes[2].axis("off")
        axes[2].set_title(text_title)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if relevance is not None:  # after the layout: word widths are measured in final axes units
        _draw_shaded_words(axes[2], relevance, text_title)
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_shaded_words(ax, relevance: TextRelevance, heading: str = "which words drive the match") -> None:
    """Lay words out left to right, wrapping lines, each on a background whose strength is its relevance."""
    import matplotlib.pyplot as plt

    ax.axis("off")
    ax.set_title(heading)
    if not relevance.any_positive:
        ax.text(0.02, 0.02, "no word raises the match for this model\n(all gradient × activation ≤ 0): no shading",
                transform=ax.transAxes, fontsize=8, color="0.35", va="bottom")
    cmap = plt.get_cmap("Reds")
    x, y, line_height = 0.02, 0.95, 0.075
    renderer = ax.figure.canvas.get_renderer()
    for word, score in zip(relevance.words, relevance.scores):
        text = ax.text(x, y, word, transform=ax.transAxes, fontsize=10, va="top",
                       # capped at mid-red so black text stays readable on the strongest words
                       bbox={"facecolor": cmap(0.05 + 0.55 * float(score)), "edgecolor": "none", "pad": 1.5})
        width = text.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted()).width
        if x + width > 0.98 and x > 0.02:
            text.set_position((0.02, y - line_height))
            x, y = 0.02, y - line_height
        x += width + 0.02


# ------------------------------------------------------------------------------ one image, one text
@dataclass
class Explanation:
    """Grad-CAM of one image for one text, on the model-input grid and on the original image."""

    text: str
    similarity: float  # cosine similarity of the contrastive embeddings
    cam: np.ndarray  # (S, S) on the model input, in [0, 1]
    cam_original: np.ndarray  # (H, W) on the original image, in [0, 1] (0 outside the used region)
    model_input: np.ndarray  # (S, S[, 3]) the model's input, un-normalised to [0, 1]
    original: np.ndarray  # (H, W[, 3]) the decoded original in [0, 1]
    relevance: TextRelevance
    geometry: object  # GeometryInfo: original → geometry-normalised pixels
    source_side: int  # side of the geometry-normalised image
    contrast: str | None = None  # the text the map was contrasted with ("no pleural effusion"), if any
    contrast_similarity: float | None = None  # cosine similarity of the image to the contrast text


def cam_to_original(cam: np.ndarray, geometry, source_side: int, original_shape: tuple[int, int]) -> np.ndarray:
    """Map a model-input CAM back onto the original image (inverse of crop → scale → pad → resize).

    Pixels of the original outside the crop (e.g. a fundus border) get 0.
    """
    import cv2

    height, width = original_shape
    factor = cam.shape[0] / source_side
    x0, y0, x1, y1 = geometry.crop
    # the content's rectangle in CAM pixels
    left, top = geometry.pad[0] * factor, geometry.pad[1] * factor
    right = left + (x1 - x0) * geometry.scale * factor
    bottom = top + (y1 - y0) * geometry.scale * factor
    out = np.zeros((height, width), dtype=np.float32)
    crop_w, crop_h = int(x1 - x0), int(y1 - y0)
    if crop_w <= 0 or crop_h <= 0:
        return out
    # sample the CAM at the centre of every original pixel of the crop
    xs = (np.arange(crop_w) + 0.5) / crop_w * (right - left) + left - 0.5
    ys = (np.arange(crop_h) + 0.5) / crop_h * (bottom - top) + top - 0.5
    map_x, map_y = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    region = cv2.remap(cam.astype(np.float32), map_x, map_y, interpolation=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    out[int(y0):int(y0) + crop_h, int(x0):int(x0) + crop_w] = region
    return np.clip(out, 0.0, 1.0)


def model_input(processor, image, image_cache: str = ""):
    """(tensor (C, S, S), geometry-normalised pixels, GeometryInfo) of one image (a path or an array), exactly
    as evaluation sees it."""
    pixels, geometry = processor.load_image(image, image_cache)
    return processor.image_transform(train=False)(pixels), pixels, geometry


def display_image(tensor: torch.Tensor, image_cfg) -> np.ndarray:
    """Undo the input normalisation for display: (S, S) or (S, S, 3) in [0, 1]."""
    from medclipin.data.transforms import normalization

    mean, std = normalization(image_cfg)
    array = tensor.detach().cpu().float().numpy()
    array = array * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    array = np.clip(array, 0, 1)
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def text_embedding(model: MedClipModel, processor, text: str) -> torch.Tensor:
    """(D,) contrastive embedding of one sentence (no prompt ensemble: the sentence as typed)."""
    device = next(model.parameters()).device
    encoded = processor.texts([text])
    with torch.no_grad():
        return model.encode_text(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))[0]


def explain(model: MedClipModel, processor, image, text: str, image_cache: str = "", store=None,
            method: str = DEFAULT_CAM_METHOD, contrast: str | None = None) -> Explanation:
    """Where in ``image`` and which words of ``text`` drive their similarity, for this model.

    ``image`` is a file path (decoded with :func:`~medclipin.data.readers.read_image` for display and
    loaded through the processor for the model, so the map is computed on exactly what evaluation sees
    and then mapped back onto the original) or an array (shown as given).

    Args:
        store: an :class:`~medclipin.eval.embeddings.EmbeddingStore` of this model; when given, the text
            embedding is read through it (cached like every other evaluation's).
        method: the class-activation method (:data:`CAM_METHODS`).
        contrast: explain s(image, text) − s(image, contrast) instead of s(image, text): with
            ``text="pleural effusion"``, ``contrast="no pleural effusion"`` the map shows what makes the model
            prefer the finding over its absence — the zero-shot decision — rather than everything the image
            shares with any sentence about a chest.
    """
    from medclipin.data.readers import read_image

    model.eval()
    tensor, pixels, geometry = model_input(processor, image, image_cache)
    device = next(model.parameters()).device
    def embed(sentence: str) -> torch.Tensor:
        return store.texts([sentence])[0].to(device) if store is not None else text_embedding(model, processor, sentence)

    embedding = embed(text)
    direction = embedding - embed(contrast) if contrast else embedding
    cam = image_cam(model, tensor[None].to(device), direction[None], method=method)[0]
    with torch.no_grad():
        image_embedding = model.encode_image(tensor[None].to(device))[0]
        similarity = float((image_embedding * embedding).sum())
        contrast_similarity = float((image_embedding * (embedding - direction)).sum()) if contrast else None
    relevance = text_relevance(model, processor, tensor, text)
    if isinstance(image, (str, os.PathLike)):
        original = read_image(image, window=processor.image_cfg.window).pixels
    else:
        original = np.asarray(image, dtype=np.float32) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)
    cam_original = cam_to_original(cam, geometry, pixels.shape[0], original.shape[:2])
    return Explanation(text=text, similarity=similarity, cam=cam, cam_original=cam_original,
                       model_input=display_image(tensor, processor.image_cfg), original=original,
                       relevance=relevance, geometry=geometry, source_side=int(pixels.shape[0]),
                       contrast=contrast, contrast_similarity=contrast_similarity)


def save_explanation(explanation: Explanation, png_path: str | Path, boxes=None, title: str | None = None) -> dict:
    """Write the side-by-side PNG (original, overlay, shaded words) and the raw arrays (.npz next to it).

    Args:
        boxes: optional (x0, y0, x1, y1) rectangles in original-image pixels, drawn in green.

    Returns: ``{"png": path, "npz": path}``.
    """
    png_path = Path(png_path)
    if title is None and explanation.contrast:
        title = (f"\"{explanation.text}\" ({explanation.similarity:+.3f}) rather than \"{explanation.contrast}\" "
                 f"({explanation.contrast_similarity:+.3f}): cosine similarities")
    elif title is None:
        title = f"similarity {explanation.similarity:+.3f} (cosine; higher = better match)"
    map_title = "what favours the text over its contrast" if explanation.contrast else "where the match comes from"
    save_gradcam_figure(png_path, explanation.original, explanation.cam_original, explanation.relevance,
                        title=title, boxes=boxes, image_title="original image",
                        text_title="text, words shaded by relevance", map_title=map_title)
    npz_path = png_path.with_suffix(".npz")
    np.savez_compressed(
        npz_path, cam=explanation.cam, cam_original=explanation.cam_original,
        model_input=explanation.model_input.astype(np.float32),
        words=np.array(explanation.relevance.words, dtype=str), word_scores=explanation.relevance.scores,
        word_signed=explanation.relevance.signed,
        similarity=np.float32(explanation.similarity),
        boxes=np.array(boxes if boxes else np.zeros((0, 4)), dtype=np.float32),
    )
    return {"png": str(png_path), "npz": str(npz_path)}
