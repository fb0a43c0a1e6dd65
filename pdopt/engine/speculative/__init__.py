"""Speculative decoding inside the continuous-batching engine.

A proposer guesses up to k tokens for each running decode; the target model then runs the last real token
plus the k guesses of every such sequence in the step's one forward pass (a chunk of k+1 tokens in the
ragged batch, with logits at all k+1 positions), and accepts a prefix of the guesses by the rejection rule
of Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding", Algorithm 1):

  guess x_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection the token is
  drawn from norm(max(0, p_j - q_j)) instead and the rest is dropped; if all guesses are accepted a bonus
  token is drawn from p_k.

p is the target's sampling distribution and q the proposer's, both after the request's temperature, top-k
and top-p filtering (`sampler.filter_logits`; the draft model samples from exactly the filtered q it
reports, so the output follows the target's filtered distribution exactly, filters included). At
temperature 0 the rule reduces to "accept while the guess equals the target's argmax, then emit the
argmax", so greedy output is token-identical to decoding without speculation.

Randomness stays per request and deterministic: token `i` of a request with seed `s` draws from
`fold_in(fold_in(PRNGKey(s), i), stream)` with one stream per purpose (draft sample, acceptance coin,
residual sample); the bonus token (and every token of a sequence that has no guesses this step) is drawn
exactly as the non-speculative sampler draws it, from `fold_in(PRNGKey(s), i)`.

Proposers (`SpeculativeMethod`):
  draft   a small model with the target's vocabulary and its own paged KV cache (own `BlockManager` and
          `ModelRunner`). Per step one device program (`draft_impl`) catches up on the tokens the draft
          has not seen (the whole prompt on a request's first decode, afterwards the last accepted guess
          and the corrected token) and runs the k-1 further one-token steps, batched over the speculating
          sequences; its guesses (and q rows) stay on the device and go straight into the verification, so
          a speculative step costs the host two dispatches and one wait. After verification the draft's
          KV is rolled back to the accepted prefix (`BlockManager.truncate`).
  ngram   prompt lookup (no model): the longest suffix n-gram (prompt_lookup_max down to
          prompt_lookup_min tokens) that occurred earlier in the sequence proposes what followed its most
          recent earlier occurrence; it may propose fewer than k tokens, or none.

How it fits the engine: the policies still schedule a decode as one token, so every policy works
unchanged. The speculative executor (`executor.SpeculativeExecutor`, the engine's executor when
`EngineConfig.speculative` is set) then widens each decode chunk to 1 + d tokens (d <= k) where the step's token budget
(`max_num_batched_tokens`), the free pages and the request's remaining `max_tokens` allow, verifies, and
gives back the pages of rejected positions (`BlockManager.truncate`; their K/V in the target cache are
simply overwritten later). A step without any guesses runs the ordinary compiled step, so the
non-speculative shapes are unchanged. Verification and the draft pass are further jitted functions, each
in a greedy variant (argmax only: no sort, softmax or random draw) and a sampled one, used when some
request of the step samples; one compile per shape bucket and variant, with k fixed per engine.

Modules: `config` (settings and counters), `acceptance` (the rejection rule), `programs` (the verification
and draft device programs), `proposers` (n-gram lookup, the draft model), `executor` (the executor).

Limitations: no mesh (tensor-parallel) support yet; the draft prefix is computed lazily at a request's
first decode rather than alongside the target's prefill.
"""

from pdopt.engine.speculative.config import SpecStats, SpeculativeConfig, SpeculativeMethod
from pdopt.engine.speculative.proposers import DraftModelProposer, NgramProposer, Proposals, Proposer

__all__ = ["DraftModelProposer", "NgramProposer", "Proposals", "Proposer", "SpecStats", "SpeculativeConfig",
           "SpeculativeMethod"]
