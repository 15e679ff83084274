"""The plain model: fusion modes, masking, losses — no DeepSpeed, no Ray."""

import pytest
import torch

from tessera.train.config import ModelConfig
from tessera.train.losses import TaskLoss
from tessera.train.model import MultimodalModel, contrastive_loss
from tessera.train.tasks import Task

DIMS = {"text": 6, "image": 5, "audio": 4}
TASKS = (Task("label", "label", "classification", ("a", "b", "c")),)


def targets(labels: list[int], weights=None):
    """Packed single-task targets: class indices, all present."""
    n = len(labels)
    return (torch.tensor(labels, dtype=torch.float32)[:, None], torch.ones(n, 1),
            torch.ones(n) if weights is None else torch.tensor(weights))


def batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, sum(DIMS.values()), generator=g)
    mask = torch.ones(n, len(DIMS))
    return features, mask


@pytest.mark.parametrize("fusion", ["concat", "weighted_sum", "attention"])
def test_absent_modalities_are_masked_not_read(fusion):
    torch.manual_seed(0)
    model = MultimodalModel(DIMS, TASKS, ModelConfig(hidden=16, fusion=fusion, dropout=0.0)).eval()
    features, mask = batch()
    mask[:, 2] = 0  # no audio
    other = features.clone()
    other[:, -DIMS["audio"]:] = 123.0  # whatever sits in an absent modality's slot
    out = model((features, mask))
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, model((other, mask)))
    mask_with_audio = mask.clone()
    mask_with_audio[:, 2] = 1
    assert not torch.allclose(out, model((features, mask_with_audio)))


def test_pipeline_layers_compute_the_same_function():
    torch.manual_seed(0)
    model = MultimodalModel(DIMS, TASKS, ModelConfig(hidden=16, dropout=0.0)).eval()
    x = batch()
    out = x
    for layer in model.layers():
        out = layer(out)
    torch.testing.assert_close(out, model(x))


class _Tokens(torch.nn.Module):
    """A stand-in text tower: token ids to a vector of the text slot's width."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(50, DIMS["text"])

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.embed(input_ids * attention_mask + token_type_ids)


class _Pixels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.project = torch.nn.Linear(3 * 4 * 4, DIMS["image"])

    def forward(self, pixels):
        return self.project(pixels.flatten(1))


def test_pipeline_layers_with_towers_compute_the_same_function():
    """Each tower is a layer that takes its own tensors off the flat tuple the stages pass on."""
    torch.manual_seed(0)
    towers = torch.nn.ModuleDict({"image": _Pixels(), "text": _Tokens()})
    cfg = ModelConfig(hidden=16, dropout=0.0, image_branch=True, image_branch_size=8)
    model = MultimodalModel(DIMS, TASKS, cfg, towers=towers).eval()
    features, mask = batch()
    ids = torch.randint(1, 50, (4, 7))
    tower_inputs = {"text": {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                             "token_type_ids": torch.zeros_like(ids)},
                    "image": {"pixels": torch.randn(4, 3, 4, 4)}}
    x = (features, mask, torch.randn(4, 3, 8, 8), tower_inputs)
    out = model.pipeline_inputs(x)
    assert [t.dtype for t in out[3:]] == [torch.float32, *[torch.int64] * 3]  # in the layers' order: image, text
    for layer in model.layers():
        out = layer(out)
    torch.testing.assert_close(out, model(x))
    assert model.layer_names() == ["image tower", "text tower", "fusion", "block", "block", "heads"]


def test_a_videos_vector_is_the_mean_of_its_frames_through_the_image_tower():
    torch.manual_seed(0)
    image = _Pixels()
    dims = {"image": DIMS["image"], "video": DIMS["image"]}
    model = MultimodalModel(dims, TASKS, ModelConfig(hidden=16), towers=torch.nn.ModuleDict({"image": image}))
    pixels, frames = torch.randn(3, 3, 4, 4), torch.randn(5, 3, 4, 4)
    made = model._vectors(torch.zeros(3, 10), {"image": {"pixels": pixels},
                                                "video": {"frames": frames, "counts": torch.tensor([2, 0, 3])}})
    with torch.no_grad():
        torch.testing.assert_close(made[:, :5], image(pixels))
        frame_vectors = image(frames)
        torch.testing.assert_close(made[0, 5:], frame_vectors[:2].mean(0))
        torch.testing.assert_close(made[2, 5:], frame_vectors[2:].mean(0))
    assert not made[1, 5:].any()  # no video: zeros (its mask leaves it out)


def test_image_branch_adds_a_token():
    torch.manual_seed(0)
    model = MultimodalModel(DIMS, TASKS, ModelConfig(hidden=16, image_branch=True, image_branch_size=32)).eval()
    features, mask = batch(2)
    pixels = torch.randn(2, 3, 32, 32)
    assert model((features, mask, pixels)).shape == (2, 3)
    assert not torch.allclose(model((features, mask, pixels)), model((features, mask, pixels * 2)))


def test_padding_rows_carry_no_loss_or_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    loss, _, counts = TaskLoss(TASKS)(logits, targets([0, 1, 2, 0], [1.0, 1.0, 0.0, 0.0]))
    loss.backward()
    assert torch.all(logits.grad[2:] == 0) and counts.tolist() == [2]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 1])))


def test_classification_and_contrastive_terms_add_up():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=16, contrastive_weight=0.5, dropout=0.0)
    model = MultimodalModel(DIMS, TASKS, cfg)
    features, mask = batch(6)
    loss, _, _, logits = model((features, mask), targets([0, 1, 2, 0, 1, 2]))
    classification_only = MultimodalModel(DIMS, TASKS, ModelConfig(hidden=16, dropout=0.0))
    classification_only.load_state_dict(model.state_dict())
    base, *_ = classification_only((features, mask), targets([0, 1, 2, 0, 1, 2]))
    assert loss > base and torch.isfinite(loss)
    loss.backward()
    one = torch.ones(1, 4, dtype=torch.bool)[0, :1]
    assert contrastive_loss(torch.randn(1, 4), torch.randn(1, 4), one, 0.07) == 0
