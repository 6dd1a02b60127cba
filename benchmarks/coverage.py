"""Which architectures fddaq quantizes and exports: one row per model of the coverage list
(random weights, nothing downloads), at W8A8 and W4A4 on every layer, first and last included.

    .venv/bin/python benchmarks/coverage.py [--quick] [--only NAME ...] [--json FILE]

For each model and bit width: the float model is built from its architecture spec (its
BatchNorm statistics then set from its own activations on 32 random images, as training would
leave them), captured, planned, quantized (ranges from the images' min/max: coverage is about
export, not accuracy), exported as QDQ ONNX and verified in onnxruntime on 8 other random
images, graph optimizations off and on. A row gives:

- the layers whose weights are integers in the graph, against the layers the model runs (its
  executed Conv/ConvTranspose/Linear modules and every other weight fddaq finds in a
  convolution or matrix product);
- export and verify seconds, and the QDQ file's size against the float ONNX;
- the arithmetic check (`verify`'s local counts): each PyTorch layer fed the graph's inputs
  computes the graph's integers but for rounding ties (largest difference in steps, share of
  values), and top-1 agreement of every output of the graph with that fed PyTorch model;
- end-to-end top-1 agreement of every output (per image, per pixel of a map), optimizations off
  and on, and the share of activation values that differ when both run freely. Random weights
  amplify one-step differences: a few ties early on move a large share of the later values by
  a step, so the free-running agreement of a random network says how it amplifies, not whether
  the export is right.

`tests/coverage` runs the same checks.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import markdown_table

from exporters.onnx_export import export_float, export_qdq
from exporters.runtime import verify
from fddaq.config import QuantConfig
from fddaq.models import build_model
from fddaq.quant.calibrate import calibrate_min_max
from fddaq.quant.capture import capture, resolve_output
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare

IMAGES = 8


@dataclass(frozen=True)
class Architecture:
    name: str
    spec: str
    args: tuple[str, ...] = ()
    size: int = 64
    num_classes: int | None = 10
    slow: bool = False  # 8 s or more a bit width on 2 cores: run by `make test`, not the quick loop


ARCHITECTURES = [
    # torchvision: the smallest builder of every classification family
    # (their adaptive pooling to 6x6 / 7x7 exports only from a multiple of that size: 224 px)
    Architecture("alexnet", "torchvision:alexnet", size=224, slow=True),
    Architecture("vgg11", "torchvision:vgg11", size=224, slow=True),
    Architecture("resnet18", "torchvision:resnet18"),
    Architecture("resnext50_32x4d", "torchvision:resnext50_32x4d"),
    Architecture("wide_resnet50_2", "torchvision:wide_resnet50_2", slow=True),
    Architecture("squeezenet1_1", "torchvision:squeezenet1_1"),
    Architecture("densenet121", "torchvision:densenet121"),
    Architecture("googlenet", "torchvision:googlenet", args=("aux_logits=False", "init_weights=True")),
    Architecture("inception_v3", "torchvision:inception_v3", args=("aux_logits=False", "init_weights=True"), size=96),
    Architecture("shufflenet_v2_x0_5", "torchvision:shufflenet_v2_x0_5"),
    Architecture("mobilenet_v2", "torchvision:mobilenet_v2"),
    Architecture("mobilenet_v3_small", "torchvision:mobilenet_v3_small"),
    Architecture("mnasnet0_5", "torchvision:mnasnet0_5"),
    Architecture("efficientnet_b0", "torchvision:efficientnet_b0"),
    Architecture("efficientnet_v2_s", "torchvision:efficientnet_v2_s", slow=True),
    Architecture("regnet_x_400mf", "torchvision:regnet_x_400mf"),
    Architecture("regnet_y_400mf", "torchvision:regnet_y_400mf"),
    Architecture("convnext_tiny", "torchvision:convnext_tiny"),
    Architecture("maxvit_t", "torchvision:maxvit_t", size=224, slow=True),
    Architecture("swin_t", "torchvision:swin_t", slow=True),
    Architecture("vit_b_16", "torchvision:vit_b_16", args=("image_size=64",), slow=True),
    # timm
    Architecture("tf_efficientnet_lite0", "timm:tf_efficientnet_lite0"),
    Architecture("mobilenetv3_large_100", "timm:mobilenetv3_large_100"),
    Architecture("convnext_atto", "timm:convnext_atto"),
    Architecture("ghostnet_100", "timm:ghostnet_100"),
    Architecture("regnety_002", "timm:regnety_002"),
    Architecture("repvgg_a0", "timm:repvgg_a0"),
    Architecture("efficientvit_b0", "timm:efficientvit_b0"),
    Architecture("mobilevitv2_050", "timm:mobilevitv2_050"),
    Architecture("fastvit_t8", "timm:fastvit_t8"),
    # EfficientNet-PyTorch, built as its README shows
    Architecture("efficientnet-b0 (EfficientNet-PyTorch)", "efficientnet_pytorch:EfficientNet.from_name",
                 args=("efficientnet-b0",)),
    # segmentation (dict outputs)
    Architecture("lraspp_mobilenet_v3_large", "torchvision:lraspp_mobilenet_v3_large", num_classes=4),
    Architecture("deeplabv3_mobilenet_v3_large", "torchvision:deeplabv3_mobilenet_v3_large", args=("aux_loss=True",),
                 num_classes=4),
    # users' own files
    Architecture("UNet (examples/architectures/unet.py)", "examples/architectures/unet.py:unet", num_classes=4),
    Architecture("YOLO-style neck (examples/architectures/yolo_neck.py)", "examples/architectures/yolo_neck.py:yolo_neck",
                 num_classes=3),
]


def layers_run(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Names of the Conv/ConvTranspose/Linear modules a forward pass calls."""
    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: called.add(name))
               for name, m in model.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return called


@torch.no_grad()
def trained_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics of the model's own activations on `images` (as training
    leaves them): a randomly initialized network whose BatchNorms normalize nothing grows its
    activations layer after layer, and its outputs then swing on any one-step rounding tie."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches
    model.train()(images)
    return model.eval()


def measure(arch: Architecture, bits: int) -> dict:
    """Quantize, export and verify `arch` at W`bits`A`bits` (see the module doc)."""
    torch.manual_seed(0)
    model = build_model(arch.spec, arch.num_classes, arch.args)
    images = torch.randn(IMAGES, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(1))
    trained_statistics(model, torch.randn(4 * IMAGES, *images.shape[1:], generator=torch.Generator().manual_seed(2)))
    start = time.perf_counter()
    found = capture(model, images[:1])
    plan = resolve_layer_plan(found, QuantConfig(bits, bits))
    qmodel = prepare(model, found, plan, resolve_output(found.outputs))
    calibrate_min_max(qmodel, images)
    prepared = time.perf_counter()
    proto = export_qdq(qmodel)
    exported = time.perf_counter()
    report = verify(proto, qmodel, images)
    verified = time.perf_counter()
    integer = {t.name[: -len(".w_q")] for t in proto.graph.initializer if t.name.endswith(".w_q")}
    total = layers_run(model, images[:1]) | {layer.name for layer in found.layers} | {f.name for f in found.float_layers}
    float_bytes = len(export_float(model, found.input_shape).SerializeToString())
    return {
        "name": arch.name, "spec": arch.spec, "args": list(arch.args), "size": arch.size, "bits": bits,
        "layers": len(total), "integer_layers": len(integer & total), "float_layers": sorted(total - integer),
        "outputs": list(found.output_names), "prepare_s": prepared - start, "export_s": exported - prepared,
        "verify_s": verified - exported, "agreement": report.agreement, "optimized_agreement": report.optimized_agreement,
        "activation_mismatches": report.activation_mismatches,
        "local_max_step_diff": report.local_max_step_diff, "local_mismatches": report.local_mismatches,
        "local_agreement": report.local_agreement,
        "activation_values": report.activation_values, "qdq_bytes": len(proto.SerializeToString()),
        "float_bytes": float_bytes,
    }


def table(rows: list[dict]) -> str:
    """Markdown, one row per architecture and bit width."""
    columns = ("architecture", "bits", "px", "layers integer / run", "export s", "verify s",
               "local: max step diff, values differing", "local top-1 agreement", "top-1 agreement off / on",
               "values differing, free-running", "size vs float")
    return markdown_table(columns, (
        (r["name"], f"W{r['bits']}A{r['bits']}", r["size"], f"{r['integer_layers']} / {r['layers']}",
         f"{r['export_s']:.1f}", f"{r['verify_s']:.1f}",
         f"{r['local_max_step_diff']}, {100 * r['local_mismatches'] / r['activation_values']:.4f}%",
         f"{r['local_agreement']:.0f}", f"{r['agreement']:.0f} / {r['optimized_agreement']:.0f}",
         f"{100 * r['activation_mismatches'] / r['activation_values']:.2f}%", f"{r['qdq_bytes'] / r['float_bytes']:.3f}x")
        for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the architectures not marked slow")
    parser.add_argument("--only", nargs="*", help="architecture names to run")
    parser.add_argument("--json", type=Path, help="also write every row as JSON")
    options = parser.parse_args()
    torch.set_num_threads(2)
    chosen = [a for a in ARCHITECTURES if (not options.quick or not a.slow) and (not options.only or a.name in options.only)]
    rows = []
    for arch in chosen:
        for bits in (8, 4):
            try:
                row = measure(arch, bits)
            except Exception as error:  # a row that fails is reported, the others still run
                row = {"name": arch.name, "spec": arch.spec, "bits": bits, "error": f"{type(error).__name__}: {error}"}
                print(f"{arch.name} W{bits}A{bits}: FAILED {row['error']}", file=sys.stderr, flush=True)
            else:
                print(f"{arch.name} W{bits}A{bits}: {row['integer_layers']}/{row['layers']} layers, agreement "
                      f"{row['agreement']:.0f}/{row['optimized_agreement']:.0f}, export {row['export_s']:.1f}s, "
                      f"verify {row['verify_s']:.1f}s", file=sys.stderr, flush=True)
            rows.append(row)
    print(f"\nfddaq coverage, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print(table([row for row in rows if "error" not in row]))
    for row in rows:
        if "error" in row:
            print(f"\n- {row['name']} W{row['bits']}A{row['bits']}: {row['error']}")
    if options.json:
        options.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
