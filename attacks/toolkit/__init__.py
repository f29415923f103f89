"""The attack toolkit: the pieces attacks share, with public names. A new attack imports what it needs from
here and from ``suite.interfaces``; the toolkit never imports a concrete attack.

* ``observe``: what an attacker holds, read as the clients would: ``tokenize`` (the clients' tokenisation),
  ``stacked`` (the observed head outputs), ``public_parts`` / ``reference_parts`` (the public or the
  colluder's head, trunk and tail, frozen, eval mode), ``run_head``, ``decode_rows``;
* ``linear``: the linear inverter (``LinearInverter``, ridge from standardised head outputs to the normalised
  input-embedding row) and its shadow training pairs (``training_pairs``);
* ``decoding``: cosine decoding against an embedding table (``nearest_rows``, ``cosine_topk``) and the public
  LM as a prior (``LMPrior``, ``choose_prior_weight``);
* ``simulate``: a defence simulated on the attacker's own shadow pipeline (``simulate_shadow``,
  ``defense_noise``, ``split_rows``);
* ``gradients``: labels from the client tail's returned gradient (``invert_gradients``,
  ``gradient_evidence``, ``simulate_gradient``);
* ``memorise``: the model views and per-token likelihoods of the memorisation attacks;
* ``prefix``: the position-by-position prefix search (``prefix_invert`` fed by ``PrefixOptions``).

Scores use the project's one token accuracy, ``suite.scoring.metrics.token_accuracy``.
"""
