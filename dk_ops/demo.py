"""A tiny tour of the operator: ``python -m dk_ops.demo``.

Prints the identities that define Deformable Kernels and the cost of each zoo
variant.
"""
import torch
import torch.nn.functional as F

from . import backend_info, deform_kernel_conv2d, models


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    scope = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    kw = dict(kernel_size=3, padding=1, groups=8)

    print("dk_ops operator demo")
    for key, value in backend_info().items():
        print(f"  backend {key}: {value}")
    box = F.avg_pool2d(scope, 2, stride=1)
    err = (deform_kernel_conv2d(x, scope, **kw) - F.conv2d(x, box, padding=1, groups=8)).abs().max()
    print(f"  4x4 scope, 3x3 kernel, zero offsets == conv with the 2x2-box-filtered scope: max |diff| = {err:.1e}")
    shift = torch.tensor([0.5, -0.5], dtype=torch.float64).repeat(9).expand(2, 18)
    crop = scope[..., 1:4, 0:3]
    err = (deform_kernel_conv2d(x, scope, shift, **kw) - F.conv2d(x, crop, padding=1, groups=8)).abs().max()
    print(f"  kernel offset (+0.5, -0.5) == conv with the shifted 3x3 crop of the scope: max |diff| = {err:.1e}")

    print("\n  study_net on 64x64 inputs, per operator variant:")
    print(f"  {'op':<10}{'params':>10}{'MACs':>14}{'sampling MACs':>16}")
    for op in models.OPS:
        c = models.complexity(models.create("study_net", op=op, num_classes=10), (3, 64, 64))
        print(f"  {op:<10}{c['params']:>10,}{c['macs']:>14,}{c['sampling_macs']:>16,}")


if __name__ == "__main__":
    main()
