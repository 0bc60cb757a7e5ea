"""The toy world's experiments: Adv-GRPO's claims on the toy domain (docs/EXPERIMENTS.md).

``python -m experiments.toy_world.run`` runs them (``--quick``: ``make demo``);
``experiments.toy_world.metrics`` measures a set of samples, on the features of the network that
``python -m experiments.toy_world.features`` trains (shipped in ``feature_net/``);
``experiments.toy_world.report`` summarises, tabulates and plots the runs.
"""
