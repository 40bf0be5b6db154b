"""Latent-structure experiments beside the library (issue 22): the score-function
estimators of :mod:`structdsl.estimators` side by side with relaxations (SST) and
perturb-and-MAP (I-MLE) on models with a structured latent learned from data.

* :mod:`.graph_layout_data` — SST's graph-layout data (maximum spanning tree of Gumbel
  weights, Fruchterman-Reingold frames), batched NumPy, generated from a seed;
* :mod:`.nri` — NRI's factor-graph MLP encoder and MLP interaction decoder;
* :mod:`.baselines` — the baselines, each written once: the MAP oracle from a spec's own
  ``solve``, I-MLE, SST's spanning-tree marginals (matrix-tree theorem), independent
  Bernoulli atoms, the trace KL;
* :mod:`.graph_layout` — experiment 1 (training, evaluation, CSV, table, figures);
* :mod:`.bias_variance` — experiment 3 (bias and variance against the exact gradient).

Command line: ``python -m structdsl.experiments graph-layout --estimator t_reinforce+ --seed
0`` (``--all`` for every estimator and seed) and ``python -m structdsl.experiments
bias-variance``; ``docs/experiments.md`` describes the setups and the results.  Needs the
``toys`` extra (torch, numba, matplotlib, tqdm).
"""
