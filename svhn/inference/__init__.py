"""From checkpoints to submissions: safe loading, the one prediction path, views, ensembles,
provenance, the CSV.
"""
