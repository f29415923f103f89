"""The prefix search shared by ``prefix_inversion`` and ``bisr`` (SipIt-style, position by position).

A causal head's output at position ``t`` depends only on tokens ``0..t``. With the prefix ``0..t-1`` already
recovered (its keys/values in a ``transformers`` KV cache), every candidate for token ``t`` is verified by one
incremental step of the reference head (public, or the colluder's fine-tuned head) and the candidate whose
output is closest to the observed one is kept. Candidates come from

* a proposer: the linear inverter (``attacks.toolkit.linear.LinearInverter``, fitted on its shadow training
  pairs), its top ``candidates`` tokens at each position; and
* widening, where the best match is poor: the gradient of the match score with respect to the input
  embedding at ``t`` (evaluated at the current best token, one backward step through the cached head) ranks
  the **whole vocabulary** by the first-order change ``g · (E_v - E_best)``; the top ``widen`` unseen tokens
  are verified, for up to ``widen_rounds`` rounds (GCG / SipIt-style coordinate search);
* a continuous step after the first gradient round, where the match is still poor (``relax_steps``): a free
  input embedding at ``t``, started at the best token's row, is optimised (Adam) to match the observed output
  and its nearest vocabulary rows are verified (SipIt's relaxation). Measured on SmolLM2 at k = 8 it finds the
  tokens the first-order ranking misses (BENCHMARKS.md);
* optionally (``prior``), the public LM's most likely next tokens given the recovered prefix, verified last,
  where the rounds above left the match poor.

The first token, and the next ``early_positions - 1`` where their match stayed poor, are re-decided last
(``refine_first``) over the proposer's candidates and whole-vocabulary candidates ranked by the gradient of the
outputs after them (``first_candidates``); then every near-tie (a
runner-up within ``tie_margin`` of the chosen token's score) is re-decided by the match of the few outputs
after it (``refine_ties``).

A beam of width ``beam`` keeps the best prefixes by summed score (a wrong early token changes every later
output, so a beam can recover from a near-tie).

Score: cosine similarity of standardised vectors ``w ⊙ (x - mu)``, with ``mu`` the mean and ``w = 1 /
sqrt(rho² sd² + noise_var)`` per hidden dimension (statistics of the reference head's outputs on shadow text;
``noise_var`` the per-dimension variance the deployed defense adds, measured on the attacker's own simulation
of it, 0 for none). Standardising keeps SmolLM2's few "massive activation" dimensions from dominating;
cosine tolerates the scale changes of fine-tuning drift and of norm clipping; ``noise_var`` down-weights
dimensions the defense drowns in noise (a Gaussian likelihood's weighting).

Modules: ``options`` (``PrefixOptions``, every knob, one object each caller builds), ``scorer`` (the score),
``search`` (``PrefixSearch``: the position-by-position beam with widening), ``refine`` (re-deciding the first
positions and near-ties with what follows them), ``calibrate`` (the LoRA drift estimate), ``invert``
(``prefix_invert``: the whole attack on observed head outputs).
"""
