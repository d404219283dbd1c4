"""TeleChat2 configuration.

Self-contained (torch + transformers only) so that it can be copied into exported checkpoints as
remote code. Field names are those of the official `config.json` (`n_layer`, `n_head`,
`ffn_hidden_size`, ...); the standard transformers names are aliases of them.

`loss_chunk_size` and `loss_implementation` (not in the releases' configs) are the number of tokens whose logits
the training loss materialises at once and how it computes its gradients (auto / fused / chunked / liger: see
`chunked_causal_lm_loss` in the modeling file and `Telechat2ForCausalLM.forward`).
"""

from transformers import PretrainedConfig


class Telechat2Config(PretrainedConfig):
    model_type = "telechat"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "intermediate_size": "ffn_hidden_size",
        "rms_norm_eps": "layer_norm_epsilon",
    }

    def __init__(
        self,
        vocab_size: int = 131072,
        hidden_size: int = 4096,
        n_layer: int = 30,
        n_head: int = 32,
        num_key_value_heads: int | None = None,
        ffn_hidden_size: int = 12288,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        training_seqlen: int = 8192,
        base_seqlen: int = 8192,
        rope_theta: float = 10000.0,
        embed_layernorm: bool = False,
        apply_residual_connection_post_layernorm: bool = False,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 3,
        tie_word_embeddings: bool = False,
        loss_chunk_size: int = 1024,
        loss_implementation: str = "auto",
        **kwargs,
    ):
        # Official configs carry fields this implementation does not need (flash_attn, logn, ...):
        # they are kept as plain attributes and otherwise ignored.
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.n_layer = n_layer
        self.n_head = n_head
        # null or absent means multi-head attention (one KV head per query head)
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads else n_head
        self.ffn_hidden_size = ffn_hidden_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.training_seqlen = training_seqlen
        self.base_seqlen = base_seqlen
        self.rope_theta = rope_theta
        self.embed_layernorm = embed_layernorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.loss_chunk_size = loss_chunk_size
        self.loss_implementation = loss_implementation
        if loss_implementation not in ("auto", "fused", "chunked", "liger"):
            raise ValueError(f"loss_implementation {loss_implementation!r}: one of auto, fused, chunked, liger")
        if loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size ({loss_chunk_size}) must be a positive number of tokens")
        if hidden_size % n_head:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of n_head ({n_head})")
        if n_head % self.num_key_value_heads:
            raise ValueError(
                f"n_head ({n_head}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        # handed to PretrainedConfig too: transformers 4.x's sets them from its own arguments (tie_word_embeddings
        # defaulting to true, the token ids to None), overwriting what was set above
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head
