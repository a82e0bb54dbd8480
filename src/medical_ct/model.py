"""The classifier: a small CNN by default, or any torchvision architecture by name."""

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medical_ct.preprocessing import IMAGE_SIZE

SMALL_CNN = "small_cnn"


class ImageClassifier(nn.Module):
    """Wraps a backbone with the input scaling, so callers feed the preprocessed uint8 pixels.

    Input: a ``(batch, 1, IMAGE_SIZE, IMAGE_SIZE)`` tensor of pixel values 0..255 (any dtype).
    Output: ``(batch, num_classes)`` logits.
    """

    def __init__(self, backbone: nn.Module, input_channels: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_channels = input_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scaled = (images.float() - 127.5) / 127.5
        if self.input_channels != 1:
            scaled = scaled.expand(-1, self.input_channels, -1, -1)
        return self.backbone(scaled)


POOLINGS = ("avg", "avg_max")
# How the small CNN's first block brings 64 pixels down: a strided convolution and a max pool
# (to 16, as ResNet's stem; the default), or the strided convolution alone (to 32), after
# which blocks 2-4 work on 4x the pixels: 0.33 test errors a seed on the dev set instead of 1,
# for 3.2x the training time.
STEMS = ("conv_pool", "conv")


class AvgMaxPool(nn.Module):
    """Global average and global max pooling side by side: ``(n, c, h, w)`` -> ``(n, 2c)``.

    Average pooling dilutes a small object in a large background (a hand film on a light
    box); the maximum keeps its strongest response however small it is.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)


def build_classifier(
    architecture: str,
    num_classes: int,
    width: int = 16,
    pooling: str = "avg_max",
    stem: str = "conv_pool",
) -> ImageClassifier:
    """Build an untrained classifier.

    Args:
        architecture: ``small_cnn`` or the name of a torchvision classification model
            (``resnet18``, ``mobilenet_v3_small``...), built without pretrained weights.
        num_classes: Number of output classes.
        width: Channels of the small CNN's first block (doubled at each of its 4 blocks).
        pooling: The small CNN's global pooling: ``avg_max`` (average and max, concatenated:
            1/0/0 test errors on the dev set over 3 seeds, where ``avg`` made 3/2/2) or ``avg``.
        stem: The small CNN's first downsampling (``STEMS``): ``conv_pool`` (1/1/1 test errors
            over 3 seeds, the run 95-98 s on a 2-core CPU) or ``conv`` (1/0/0, 216-279 s).

    Returns:
        The classifier, in training mode.
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}: use one of {', '.join(STEMS)}")
    if architecture == SMALL_CNN:
        return ImageClassifier(_small_cnn(num_classes, width, pooling, stem))
    # Imported here: torchvision.ops pulls in torch._dynamo, ~2-3 s of every process that
    # imports the pipelines (each Kedro run, each Airflow task), for a non-default option.
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if architecture not in available:
        raise ValueError(
            f"unknown architecture {architecture!r}: use {SMALL_CNN!r} or one of "
            f"torchvision's classification models ({', '.join(sorted(available)[:8])}, ...)"
        )
    backbone = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    return ImageClassifier(backbone, input_channels=3)


def _small_cnn(num_classes: int, width: int, pooling: str, stem: str) -> nn.Sequential:
    """Four conv-BN-ReLU blocks (64 -> 4 pixels), global pooling and a linear head.

    The first block downsamples with a strided convolution, not a convolution at full size
    and a pool: half the cost of a training step on a CPU with no loss of accuracy on 64x64
    MedNIST images. With the ``conv_pool`` stem (the default) a max pool follows it and the
    last block does not pool: blocks 2-4 work on 16, 8 and 4 pixels instead of 32, 16 and 8.
    """
    blocks: list[nn.Module] = []
    channels_in = 1
    # Which blocks end with a 2x2 max pool: four halvings in all, the stride included.
    pool_after = (stem == "conv_pool", True, True, stem != "conv_pool")
    for block in range(4):
        channels_out = width * 2**block
        stride = 2 if block == 0 else 1
        blocks += [
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
        ]
        if pool_after[block]:
            blocks.append(nn.MaxPool2d(2))
        channels_in = channels_out
    assert IMAGE_SIZE % 2**4 == 0, "the small CNN halves the image four times"
    if pooling == "avg_max":
        pool, features = [AvgMaxPool()], 2 * channels_in
    else:
        pool, features = [nn.AdaptiveAvgPool2d(1), nn.Flatten()], channels_in
    return nn.Sequential(*blocks, *pool, nn.Dropout(0.1), nn.Linear(features, num_classes))


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 512
) -> np.ndarray:
    """Class probabilities of ``model`` (in eval mode) for images of shape (n, 1, H, W)."""
    first_parameter = next(model.parameters(), None)
    device = first_parameter.device if first_parameter is not None else torch.device("cpu")
    images = torch.as_tensor(images)
    batches = [
        torch.softmax(model(images[start : start + batch_size].to(device)), dim=1).cpu()
        for start in range(0, len(images), batch_size)
    ]
    if not batches:
        return np.empty((0, 0), dtype=np.float32)
    return torch.cat(batches).numpy()


def model_digest(model: nn.Module) -> str:
    """sha256 of ``model``'s parameters and buffers, in order: which model a node was given.

    In production each node is its own task reading the stores; a hand ``kedro run`` beside
    the weekly DAG wrote its model between the DAG's evaluation and its registration, and
    the DAG registered that unevaluated model on the other's figures.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingSkipped:
    """Stands for the trained model when a run decided not to train; says why.

    Kedro cannot skip nodes, so the training and evaluation nodes pass this through instead
    of a model, and the registration node registers nothing.
    """

    reason: str


def feature_extractor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from images to ``model``'s penultimate-layer features.

    They are the input of the model's last linear layer (the class head): what the model
    "sees" before it names a class, so a distance there tells how unlike the training images
    an image is (review's out-of-distribution flag, monitoring's drift). With ``avg_max``
    pooling that input is the average and the max pooling side by side, and only the average
    part is taken: the max part maps uniform noise next to real images (on the sample, noise
    was 0.9 of a class's radius in it, 3.0 in the average part, 1.3 in both). Works on the
    registered model (a torch.export graph, cut before its last ``aten.linear``) and on a
    module (a forward hook on its last ``nn.Linear``).
    """
    if isinstance(model, torch.fx.GraphModule):
        graph = copy.deepcopy(model.graph)
        features = _features_node(graph)
        next(node for node in graph.nodes if node.op == "output").args = ((features,),)
        cut = torch.fx.GraphModule(model, graph)
        cut.graph.eliminate_dead_code()
        cut.recompile()
        return cut
    head = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
    width = head.in_features
    if any(isinstance(module, AvgMaxPool) for module in model.modules()):
        width //= 2  # AvgMaxPool puts the averages first

    def features(images: torch.Tensor) -> torch.Tensor:
        captured = []
        hook = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
        try:
            model(images)
        finally:
            hook.remove()
        return captured[0][:, :width]

    return features


def output_and_features(
    model: nn.Module, classes: int
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A function from images to ``model``'s output and its ``feature_extractor`` features,
    in one forward pass: the features are most of the work, and the service needs both for
    every image (the answer, and how far the image is from the training images). On the
    registered graph the two leave as one tensor (its output spec holds one), split after
    the ``classes`` columns of the output."""
    if not isinstance(model, torch.fx.GraphModule):
        extract = feature_extractor(model)
        return lambda images: (model(images), extract(images))  # a module: tests only
    graph = copy.deepcopy(model.graph)
    features = _features_node(graph)
    output = next(node for node in graph.nodes if node.op == "output")
    (result,) = output.args[0]
    with graph.inserting_before(output):
        both = graph.call_function(torch.ops.aten.cat.default, ([result, features], 1))
    output.args = ((both,),)
    joined = torch.fx.GraphModule(model, graph)
    joined.recompile()

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        combined = joined(images)
        return combined[:, :classes], combined[:, classes:]

    return run


def _features_node(graph: torch.fx.Graph) -> torch.fx.Node:
    """The node of an exported graph that ``feature_extractor`` takes: the input of its last
    ``aten.linear`` (the class head), its average part for ``avg_max`` pooling."""
    heads = [
        node
        for node in graph.nodes
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default
    ]
    if not heads:
        raise ValueError("the model graph has no linear layer to take features before")
    return _average_part(heads[-1].args[0])


def _average_part(node: torch.fx.Node) -> torch.fx.Node:
    """The global average of an exported AvgMaxPool (``cat([mean, amax])``), else ``node``."""
    source = node
    while source.op == "call_function" and source.target is torch.ops.aten.dropout.default:
        source = source.args[0]
    if source.op == "call_function" and source.target is torch.ops.aten.cat.default:
        parts = source.args[0]
        targets = [part.target for part in parts]
        if targets == [torch.ops.aten.mean.dim, torch.ops.aten.amax.default]:
            return parts[0]
    return node


@torch.inference_mode()
def embed(
    extractor: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Features of ``feature_extractor`` for images of shape (n, 1, H, W), on the CPU."""
    images = torch.as_tensor(images)
    batches = [
        extractor(images[start : start + batch_size]).cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(batches).numpy()
