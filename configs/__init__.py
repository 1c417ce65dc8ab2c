"""Shipped run configs (installed as `pipeline.configs`, so `kdpipe demo` finds demo.yaml without a checkout)."""
