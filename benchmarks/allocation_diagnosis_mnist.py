"""Why the budgeted allocation does not beat uniform ratio 2 at equal MACs on the MNIST ResNet-20.

Converts ResNet-20 at the MACs of uniform ratio 2 (0.5388) four ways and prints test top-1,
agreement and KL on the 10,000 test images (calibration: first 512 training images):
the allocation from the `proxy` sensitivity (measured here), and, fitted without sequential
error correction (``sequential=False``, the regime the sensitivity measures), the allocation
from the `alone`/KL table of ``benchmarks/sweep_tradeoffs.py resnet20`` and uniform ratio 2.

    python benchmarks/allocation_diagnosis_mnist.py      # needs sweeps/resnet20/sensitivity-kl.json
"""
import time

import torch

import ghostify
from ghostify.zoo.data import resolve_data
from ghostify.tradeoffs.sensitivity import SensitivityTable, sensitivity
torch.set_num_threads(1)
m = ghostify.get_model("checkpoints/resnet20_mnist.pt").eval()
train = resolve_data("mnist:train", batch_size=64, limit=512)
calib = [x for x, _ in train]
test = resolve_data("mnist:test", batch_size=500)
spec = dict(dw_size=1, init="calib", cheap="mix")
kl = SensitivityTable.load("sweeps/resnet20/sensitivity-kl.json")
t = time.time()
proxy = sensitivity(m, ratios=(2, 3, 4), calib_data=calib, method="proxy", input_size=(1, 1, 28, 28), progress=False, **spec)
print("proxy table", time.time() - t, flush=True)
proxy.save("sweeps/resnet20/sensitivity-proxy.json")
def run(label, **kw):
    g = ghostify.convert(m, calib_data=calib, **kw)
    r = ghostify.evaluate(g, test, baseline=m, progress=False)
    macs = ghostify.count(g, torch.zeros(1, 1, 28, 28)).macs / ghostify.count(m, torch.zeros(1, 1, 28, 28)).macs
    print(f"{label}: MACs {macs:.4f} top1 {r['top1']:.4f} agree {r['agree_top1']:.4f} kl {r['kl']:.4f}", flush=True)
for name, tab in (("proxy", proxy),):
    a = ghostify.allocate(m, target_macs=0.5388, table=tab, ratios=(2, 3, 4), input_size=(1, 1, 28, 28), progress=False, **spec)
    print(name, a.summary(), flush=True)
    run(f"budget-{name} 0.5388", plan=a.plan)
a = ghostify.allocate(m, target_macs=0.5388, table=kl, ratios=(2, 3, 4), input_size=(1, 1, 28, 28), progress=False, **spec)
print("kl", a.summary(), flush=True)
run("budget-kl 0.5388 sequential=False", plan=a.plan, sequential=False)
run("uniform r2 sequential=False", ratio=2, sequential=False, **spec)
