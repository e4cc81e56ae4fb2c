"""Verification: which drafted tokens the target keeps, and the token it adds.

Glossary (used throughout treespec):
- p: the target's processed distribution at a node; q: the draft distribution a proposal was drawn from.
  Both come from the same processing (treespec.sampling.logits_to_probs); exactness is about those rows.
- accepted tokens: draft tokens kept, the tokens of `VerifyResult.path[1:]`.
- bonus token: the one token the target emits after the last accepted node; drawn from the residual when a
  proposal there was rejected, from p otherwise (argmax when greedy).
- tokens per step = accepted + 1.

Greedy (T = 0) reproduces plain greedy decoding exactly; the stochastic rule emits exactly the target's
distribution for i.i.d., without-replacement and deterministic drafts (see stochastic.py). A sampled tree whose
proposals are all one-hot is verified by the greedy walk over the target's own Gumbel-max draws (greedy.py).
"""
from treespec.verify.greedy import follow_target, verify_greedy
from treespec.verify.result import VerifyResult
from treespec.verify.stochastic import NodeRule, verify_stochastic

__all__ = ["NodeRule", "VerifyResult", "follow_target", "verify_greedy", "verify_stochastic"]
