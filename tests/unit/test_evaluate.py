"""Measures of a quantized model against its float model (`fddaq.evaluate`)."""

import math

import torch
from torch import nn

from fddaq.config import QuantConfig
from fddaq.evaluate import layer_sqnr
from fddaq.quant.calibrate import calibrate_min_max
from fddaq.quant.capture import capture
from fddaq.quant.plan import resolve_layer_plan
from fddaq.quant.prepare import prepare


def test_layer_sqnr_is_the_output_snr_against_the_float_model():
    """10 log10(sum f^2 / sum (f - q)^2) of each layer's output, f from the float model and q
    from the fake-quant one (the second layer's error includes the first's); more bits, more dB."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    found = capture(model, x[:2])
    sqnr = {}
    for bits in (3, 6):
        qmodel = prepare(model, found, resolve_layer_plan(found, QuantConfig(bits, bits)), found.outputs[0].name)
        calibrate_min_max(qmodel, x)
        with torch.no_grad():
            float_out = model(x).double()
            quant_out = qmodel(x).double()
        snr = lambda f, q: 10 * math.log10(f.square().sum().item() / (f - q).square().sum().item())
        sqnr[bits] = layer_sqnr(qmodel, x, batch_size=40)  # one batch, as the forward passes above
        assert math.isclose(sqnr[bits]["2"], snr(float_out, quant_out), rel_tol=1e-6)
        assert set(sqnr[bits]) == {"0", "2"} and math.isfinite(sqnr[bits]["0"])
    assert sqnr[6]["0"] > sqnr[3]["0"] + 10 and sqnr[6]["2"] > sqnr[3]["2"] + 10
