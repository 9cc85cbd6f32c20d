"""NITP configuration: the paper's knobs and the switches its ablations flip."""

from __future__ import annotations

from dataclasses import dataclass

LOSS_KINDS = ("cosine", "mse", "smooth_l1", "kl")
PROJECTOR_KINDS = ("swiglu", "linear", "none")
OBJECTIVES = ("nitp", "cosine_reg")
HIDDEN_SOURCES = ("final_norm", "last_layer")


@dataclass
class NITPConfig:
    """Configuration of the NITP auxiliary objective.

    Each field's docstring is its command-line help (``--nitp-<field>``).
    """

    enabled: bool = True
    """Add the NITP loss. Off (``--no-nitp``) trains the plain next-token-prediction baseline."""

    target_layer: int = 1
    """k: the target is the output of the k-th transformer layer (1-based); 0 = the embeddings.
    The paper uses about 20% of depth (5 of 24, 6 of 28)."""

    loss_weight: float = 1.0
    """lambda in L = L_NTP + lambda * L_NITP (paper: 1.0; 0.8 at 9B MoE and 3B dense)."""

    start_iter: int = 0
    """Iteration from which lambda applies; before it the NITP weight is 0 (paper: 0)."""

    loss_kind: str = "cosine"
    """Distance between P(h_t) and z_{t+1}: cosine (paper), mse, smooth_l1 or kl (ablations)."""

    shift: int = 1
    """Temporal offset of the target: 1 pairs position t with t+1 (paper); 0 pairs t with t
    (the ablation that collapses)."""

    projector: str = "swiglu"
    """Projection head P: swiglu (d -> 4d -> d, paper), linear (d -> d) or none (identity)."""

    projector_ffn_ratio: int = 4
    """Width of the SwiGLU projector's hidden layer as a multiple of the model's hidden size."""

    stop_gradient: bool = True
    """Detach the target z (paper). Off lets gradients flow into the shallow layers through the
    target (the unstable ablation)."""

    objective: str = "nitp"
    """nitp (the paper), or cosine_reg: the generic baseline that penalizes the mean cosine
    similarity between different tokens' last hidden states of a sequence (no target, no
    projector)."""

    hidden_source: str = "final_norm"
    """Which h_t is projected: final_norm (after the final RMSNorm, the state that feeds the
    unembedding; the paper) or last_layer (the last layer's output, before the norm)."""

    def validate(self, num_layers: int, hidden_size: int, tensor_parallel_size: int = 1) -> None:
        """Raise ValueError naming the bad field and the fix; called before any model is built."""
        if not self.enabled:
            return
        if not 0 <= self.target_layer <= num_layers - 1:
            raise ValueError(
                f"--nitp-target-layer {self.target_layer} is outside 0..{num_layers - 1} for a "
                f"{num_layers}-layer model: use 0 for the embeddings or k < num_layers for the "
                f"k-th layer's output (the paper uses about 20% of depth, e.g. "
                f"{max(1, round(0.2 * num_layers))})."
            )
        if self.loss_weight < 0:
            raise ValueError(
                f"--nitp-loss-weight {self.loss_weight} is negative: lambda must be >= 0 "
                "(use --no-nitp to train without NITP)."
            )
        if self.start_iter < 0:
            raise ValueError(f"--nitp-start-iter {self.start_iter} must be >= 0.")
        if self.loss_kind not in LOSS_KINDS:
            raise ValueError(
                f"unknown --nitp-loss-kind {self.loss_kind!r}: choose one of {', '.join(LOSS_KINDS)}."
            )
        if self.projector not in PROJECTOR_KINDS:
            raise ValueError(
                f"unknown --nitp-projector {self.projector!r}: choose one of "
                f"{', '.join(PROJECTOR_KINDS)}."
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown --nitp-objective {self.objective!r}: choose one of "
                             f"{', '.join(OBJECTIVES)}.")
        if self.hidden_source not in HIDDEN_SOURCES:
            raise ValueError(f"unknown --nitp-hidden-source {self.hidden_source!r}: choose one "
                             f"of {', '.join(HIDDEN_SOURCES)}.")
        if self.shift not in (0, 1):
            raise ValueError(f"--nitp-shift {self.shift} must be 1 (t -> t+1, paper) or 0.")
        if self.projector_ffn_ratio < 1:
            raise ValueError(f"--nitp-projector-ffn-ratio {self.projector_ffn_ratio} must be >= 1.")
        width = self.projector_ffn_ratio * hidden_size
        if self.projector == "swiglu" and width % tensor_parallel_size:
            raise ValueError(
                f"the SwiGLU projector's width {width} is not divisible by "
                f"--tensor-model-parallel-size {tensor_parallel_size}."
            )

    def weight_at(self, iteration: int) -> float:
        """lambda at a 0-based training iteration: 0 before ``start_iter`` or when disabled."""
        if not self.enabled or iteration < self.start_iter:
            return 0.0
        return self.loss_weight
