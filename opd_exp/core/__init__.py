"""The types layer: the data that flows through a step (types.py), the ranks of a job (ranks.py)
and the Protocols the components implement (protocols.py). Imports only opd_exp.config."""
