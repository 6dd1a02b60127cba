"""Cross-layer equalization (DFQ, Nagel et al. 2019), measured and not kept (issue 16).

    .venv/bin/python benchmarks/equalization.py mobilenet   # about 6 minutes
    .venv/bin/python benchmarks/equalization.py lite0       # about 3 minutes

CLE rescales channels between two convs so that their weight ranges match. It needs a
scale-equivariant activation between them, so ReLU6 is first replaced by ReLU (as AIMET
does). Then, for every chain conv1 -> BatchNorm -> ReLU -> [ZeroPad2d] -> conv2 found by
torch.fx, channel c of the BatchNorm's output is divided by s_c and conv2's input channel c
multiplied by it, s_c = sqrt(r1_c / r2_c) (r1: range of conv1's BN-folded weights of output
channel c; r2: range of conv2's weights over input channel c, or of depthwise channel c),
20 rounds over the chains. The float model then computes the same function as the ReLU one.

Three float models are quantized each time: the original, ReLU6 -> ReLU, and ReLU6 -> ReLU
plus CLE; every layer 4-bit weights (fddaq's default affine grid), input 8-bit, seed 0.
mobilenet: the bundled `fddaq:fashion_mobilenet` from its 10-per-class `calib/`, `ptq` at
W4A8 and W4A4 and the default `reconstruct` at W4A4; deployed fake-quant top-1 on the full
Fashion-MNIST test set. lite0: EfficientNet-Lite0 (ImageNet weights) from the 10 labelled
calibration images of `efficientnet.py`, `ptq` at W4A8 and W4A4; agreement, top-5 overlap
and KL against the original float model on its 176 photo views (fake-quant).
Needs `apt-get install dataset-fashion-mnist` (mobilenet) or `benchmarks/requirements.txt` (lite0).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import fx, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples" / "fashion_mnist"), str(ROOT / "benchmarks")]
from tables import header


def relu6_to_relu(model: nn.Module) -> nn.Module:
    """`model` (changed in place) with every nn.ReLU6 module replaced by nn.ReLU."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(module, name, nn.ReLU())
    return model


def chains(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]]:
    """(conv1, its BatchNorm, conv2) for every conv -> BN -> ReLU -> [ZeroPad2d] -> conv whose
    intermediate tensors have no other user."""
    modules = dict(model.named_modules())

    def kind(node: fx.Node) -> type | None:
        return type(modules[node.target]) if node.op == "call_module" else None

    def only_user(node: fx.Node, *kinds: type) -> fx.Node | None:
        users = list(node.users)
        return users[0] if len(users) == 1 and kind(users[0]) in kinds else None

    found = []
    for conv in fx.symbolic_trace(model).graph.nodes:
        if kind(conv) is not nn.Conv2d:
            continue
        bn = only_user(conv, nn.BatchNorm2d)
        relu = bn and only_user(bn, nn.ReLU)
        nxt = relu and only_user(relu, nn.Conv2d, nn.ZeroPad2d)
        if nxt is not None and kind(nxt) is nn.ZeroPad2d:
            nxt = only_user(nxt, nn.Conv2d)
        if nxt is not None:
            found.append((modules[conv.target], modules[bn.target], modules[nxt.target]))
    return found


@torch.no_grad()
def equalize(model: nn.Module, rounds: int = 20) -> tuple[nn.Module, int]:
    """A copy of `model` with ReLU6 -> ReLU and CLE applied; the number of chains."""
    model = relu6_to_relu(copy.deepcopy(model))
    pairs = [(c1, bn, c2) for c1, bn, c2 in chains(model) if c2.groups in (1, c2.in_channels)]
    for _ in range(rounds):
        for conv1, bn, conv2 in pairs:
            a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            r1 = (conv1.weight * a[:, None, None, None]).abs().flatten(1).amax(1)
            depthwise = conv2.groups > 1
            r2 = conv2.weight.abs().flatten(1).amax(1) if depthwise else conv2.weight.abs().amax(dim=(0, 2, 3))
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-12)).clamp(1e-3, 1e3), torch.ones_like(r1))
            bn.weight /= s
            bn.bias /= s
            conv2.weight *= s[:, None, None, None] if depthwise else s[None, :, None, None]
    return model, len(pairs)


def variants(inputs):
    yield "original", inputs
    yield "ReLU6 -> ReLU", replace(inputs, float_model=relu6_to_relu(copy.deepcopy(inputs.float_model)))
    model, pairs = equalize(inputs.float_model)
    yield f"ReLU6 -> ReLU, CLE ({pairs} chains)", replace(inputs, float_model=model)


def settings(with_reconstruct: bool):
    from fddaq.config import QuantConfig
    from fddaq.recipes import recipe_config

    yield "W4A8 ptq", recipe_config("ptq", QuantConfig(4, 8), 0)
    yield "W4A4 ptq", recipe_config("ptq", QuantConfig(4, 4), 0)
    if with_reconstruct:
        yield "W4A4 reconstruct", recipe_config("reconstruct", QuantConfig(4, 4), 0)


def main() -> None:
    from fddaq.data import load_image_folder
    from fddaq.evaluate import predict
    from fddaq.pipeline import Source, load_inputs, quantize_inputs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["mobilenet", "lite0"])
    args = parser.parse_args()
    if args.model == "mobilenet":
        import fmnist

        inputs = load_inputs(Source(*fmnist.model_source("mobilenet"), ROOT / "examples" / "fashion_mnist" / "calib"))
        images, labels = fmnist.read_split("t10k")
        x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - fmnist.MEAN) / fmnist.STD
        y = torch.from_numpy(labels)
        print(header("float model", "float top-1", "setting", "top-1", "wall s"))
        for name, variant in variants(inputs):
            float_top1 = 100.0 * (predict(variant.float_model, x).argmax(1) == y).float().mean().item()
            for label, config in settings(with_reconstruct=True):
                start = time.perf_counter()
                model = quantize_inputs(variant, config).model
                top1 = 100.0 * (predict(model, x).argmax(1) == y).float().mean().item()
                print(f"| {name} | {float_top1:.2f} | {label} | {top1:.2f} | {time.perf_counter() - start:.0f} |", flush=True)
        return
    import efficientnet

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib, held = efficientnet.split_labelled(root)
        efficientnet.natural_images(root / "natural")
        classes = root / "classes.txt"
        classes.write_text("\n".join(str(i) for i in range(1000)))
        inputs = load_inputs(efficientnet.model_source("lite0", calib, held, classes))
        natural = load_image_folder(root / "natural", inputs.info.preprocess).images
    reference = predict(inputs.teacher, natural).numpy()
    print(header("float model", "its agreement with the original (KL)", "setting", "agreement", "top-5 overlap", "KL", "wall s"))
    for name, variant in variants(inputs):
        own = efficientnet.scores(predict(variant.teacher, natural).numpy(), reference)
        for label, config in settings(with_reconstruct=False):
            start = time.perf_counter()
            s = efficientnet.scores(predict(quantize_inputs(variant, config).model, natural).numpy(), reference)
            print(f"| {name} | {own['agreement']:.1f} ({own['kl']:.3f}) | {label} | {s['agreement']:.1f} | "
                  f"{s['top5_overlap']:.1f} | {s['kl']:.3f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
