"""Split a model over three local worker processes and compare with a local forward.

python examples/quickstart.py
"""

from __future__ import annotations

import torch

from butterfly import Butterfly
from butterfly.model.zoo import small_transformer


def main() -> None:
    x = torch.randn(2, 32, 256)
    with Butterfly.local("butterfly.model.zoo:small_transformer", workers=3, threads=1) as b:
        print(b.cluster())
        y = b.infer(x)
    torch.set_num_threads(1)
    with torch.inference_mode():
        expected = small_transformer()(x)
    print("max difference from a local forward:", (y - expected).abs().max().item())


if __name__ == "__main__":
    main()
