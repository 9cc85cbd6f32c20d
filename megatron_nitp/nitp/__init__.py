"""Next Implicit Token Prediction, read top to bottom.

1. `config`    - what the method is configured by (target layer k, lambda, ablation switches).
2. `capture`   - the layer-k output, taken inside the forward pass, detached (the target z).
3. `projector` - P, a tensor-parallel SwiGLU d -> 4d -> d, used in training only.
4. `loss`      - per-token 1 - cos(P(h_t), z_{t+1}), masked, in fp32.

Total loss = NTP + lambda * NITP, each normalized by its own count of contributing positions
(see `megatron_nitp.training.step`).
"""

from megatron_nitp.nitp.config import NITPConfig
from megatron_nitp.nitp.loss import implicit_token_loss, num_contributing_positions

__all__ = ["NITPConfig", "implicit_token_loss", "num_contributing_positions"]
