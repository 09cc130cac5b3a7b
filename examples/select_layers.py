"""Choose which convs become Ghost layers, and with which settings.

Priority of the settings:  global < module type < glob on the name < exact name;
an override of None keeps that conv as it is. Run:  python examples/select_layers.py
"""
import torchvision
from torchvision.models.resnet import BasicBlock

import ghostify


def main():
    model = torchvision.models.resnet18(weights=None).eval()  # weights="DEFAULT" with a network

    # 1. Keyword form, as ghostify.convert takes it (the CLI has the same options).
    ghost = ghostify.convert(
        model, ratio=2,
        include=["layer*"],                # only convs inside the residual stages
        exclude=["*.downsample.*"],        # ...but not the 1x1 shortcut convs
        overrides={"layer4.*": {"ratio": 4},   # glob: stage 4 keeps only 1/4 of the filters
                   "layer1.0.conv1": None},    # exact name: keep this conv
    )
    print("== keyword form ==")
    print(ghost.ghostify_info.plan.table())

    # 2. The same kind of choice as a GhostConfig chain; make_plan decides per conv
    #    without touching the model, so you can look before converting.
    cfg = (ghostify.GhostConfig(ghostify.LayerSpec(ratio=2, dw_size=3))
           .set_type(BasicBlock, {"dw_size": 5})          # every conv inside a BasicBlock
           .set_glob("layer4.*", {"ratio": 4})            # beats the type level
           .set_name("layer4.1.conv2", None)              # beats the glob: keep it
           .set_name("conv1", {})                         # naming the stem converts it too
           .exclude("*.downsample.*"))
    plan = ghostify.make_plan(model, cfg)
    print("\n== GhostConfig chain ==")
    print(plan.table())
    print("layer4.0.conv1 ->", cfg.resolve("layer4.0.conv1", [BasicBlock]))

    # ghostify.convert(model, plan=plan) executes exactly this plan (config=cfg makes it again).
    print(f"{len(plan.converted)} convs would convert; kept: {[e.name for e in plan.skipped]}")

if __name__ == "__main__":
    main()
