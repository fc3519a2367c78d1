"""The tools that work on a run from outside the round loop: `fedtune audit` (audit.py), `fedtune evaluate`
(scoring.py), `fedtune export` (export.py), and `fedtune certs` for a deployment (pki.py)."""
