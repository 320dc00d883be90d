"""Parsers and handlers of the ``torchsphere`` subcommands beyond train / compare / evaluate / predict
(torchsphere.cli), and the training flags they share (``arguments``)."""
