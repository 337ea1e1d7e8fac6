"""Experiments that compare methods end to end (``python -m medclipin.experiments.study``)."""
