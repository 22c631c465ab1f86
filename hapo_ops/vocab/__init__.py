"""Ops over a vocabulary: per-token log-prob and entropy of softmax(z/T) without a full softmax.

``row_statistics`` (the per-row algebra every path shares), ``token_inputs`` (argument
handling), ``truncation`` (top-k/top-p thresholds and kept sets), ``subset_statistics`` (the
one autograd home of log-prob and entropy over a subset of the vocabulary, whole or
sharded), and the three ops: ``logprob_entropy`` (from logits, whole or one vocabulary
shard), ``linear_logprob_entropy`` (from hidden states and the output head) and ``sampling``
(the adaptive-temperature sampler). Each op has a Triton module of the same name in
``hapo_ops.kernels``.
"""

from hapo_ops.vocab.linear_logprob_entropy import linear_logprobs_and_entropy
from hapo_ops.vocab.logprob_entropy import (logprobs_and_entropy, token_entropy, token_logprobs,
                                            vocab_parallel_logprobs_and_entropy)
from hapo_ops.vocab.sampling import SampleOutput, adaptive_temperature_sample

__all__ = ["SampleOutput", "adaptive_temperature_sample", "linear_logprobs_and_entropy",
           "logprobs_and_entropy", "token_entropy", "token_logprobs",
           "vocab_parallel_logprobs_and_entropy"]
